"""The machine's measured limits, against which the benchmarks put our kernels and models: the float32 FMA peak per
core, a large GEMM's rate, and the selective scan's per-core limit in state updates per second.

**FMA peak.** A numba loop of 8 x 8 independent ``v = v * a + b`` chains per element, over 8 rows of 256 float32
(8 KiB: in L1), compiled as the scan kernels are (``fastmath={'contract'}`` so that ``v * a + b`` is one FMA, for
the host's ISA: LLVM vectorises the element loop, 16-lane zmm FMAs on an AVX-512 machine, 8-lane ymm on AVX2).
The unrolled body has 64 FMAs per vector against 8 loads and 8 stores, and 8 independent chains per vector (x the
vectoriser's interleave) cover the FMA latency (4 cycles) on two FMA pipes, so the loop runs at the FMA issue
rate. Timed for about ``seconds`` per run, the best of ``repeats`` runs; on one thread, and on ``threads`` Python
threads at once (the loop releases the GIL), each on its own rows. Reported as GFLOP/s (2 per FMA) per core, and
all threads together. Measured with the compiler and target of the scan kernels, it is a peak those kernels could
reach. (On a Zen 4 EPYC VM: ~50 GFMA/s = ~100 GFLOP/s per core, 16 FMA lanes a cycle at ~3.1-3.6 GHz; two
threads 2.0x one.)

**GEMM.** ``torch.mm`` (MKL's sgemm on x86, what ``F.linear`` runs) and oneDNN's linear (``mkldnn::_linear_pointwise``,
the route ``optimize_for_cpu`` takes where it is faster: ``ops/linear.py``) on ``gemm_size``^3 float32 (2048:
8.6 G multiply-adds), on ``threads`` of PyTorch's threads; the best of three after a warm-up, in GMAC/s (one
multiply-add = 1, the FLOP convention of ``analysis/flops.py``). The faster library's rate is ``gemm_gmacs``: the
ceiling of the models' GEMMs and convolutions. (Zen 4 VM, 2 threads: torch.mm ~70, oneDNN ~96 GMAC/s: MKL runs
its AVX2 code on AMD processors.)

**The scan's per-core limit** is the FMA peak (lane-FMAs/s) divided by the vector instructions one state update
issues in the compiled kernel (``ops/scan_numba.py``: ``_step``'s loop over channels, one lane per channel,
``state = exp2(step * A) * h + step_u * B; acc += state * C`` with ``_exp2`` inlined), each counted as one slot of
the FMA throughput. Counted in the assembly numba 0.68 / LLVM emits for znver4 (``_scan_channels.inspect_asm``
with the on-disk cache off; the innermost loop, one 16-lane vector an iteration): **20 vector instructions per
update**:

=====================================  ==  ===================================================================
step * A                                1  vmulps
exp2: clamp to [-126, 128]              2  vmaxps, vminps
exp2: NaN mask (``x == x``)             1  vcmpordps (the select folds into the masked multiply below)
exp2: k = floor(c + 1/2), f = c - k     3  vaddps, vrndscaleps, vsubps
exp2: degree-6 polynomial in f          6  vfmadd213ps (Horner; the leading coefficient is a constant)
exp2: 2**k from the bits                3  vcvttps2dq, vpslld (<< 23), vpaddd (+ 127 << 23)
exp2: p * 2**k                          1  vmulps (masked: NaN stays NaN)
state = e * h + step_u * B              2  vmulps, vfmadd231ps
acc += state * C                        1  vfmadd213ps
=====================================  ==  ===================================================================

11 of the 20 are multiplies or FMAs, none a division; besides them the loop has 5 vector loads (h, A, step,
step_u, acc), 2 stores and constant broadcasts. Where every vector instruction issues on the FMA ports (Intel's
AVX-512 cores: ports 0 and 5 for zmm) the count is exact and the limit is FMA peak / 20; Zen 4 has two more FP
pipes for adds, min/max and compares, so there the loop could in principle go faster, up to FMA peak / 11
(the multiplies alone): the limit is the honest count of the arithmetic, not a bound no code can pass.

What it leaves out, per (channel, step), amortised over the N states of a channel: softplus of delta (~37
instructions, two divisions), step * u and D * u, and the silu gate (~20, one division), about 60 in all:
+4 per update at N = 16 (Vim's, the hybrid's), but ~3x the update's own work at N = 1, where VMamba's cross scan
also projects its step sizes (rank FMAs per channel and step): its kernel reaches a smaller fraction of this
limit by construction.
"""
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

__all__ = ['MachineLimits', 'measure_machine_limits', 'measure_fma_peak', 'measure_gemm', 'cpu_model', 'cpu_isa',
           'SCAN_UPDATE_VECTOR_OPS', 'scan_update_limit']

# Vector instructions one state update issues in the compiled scan (the module docstring's table).
SCAN_UPDATE_VECTOR_OPS = 20

_ROWS = 8  # independent rows (chains per vector lane); the body below unrolls 8 FMAs on each
_WIDTH = 256  # float32 per row: 8 rows x 1 KiB stay in L1
_FMAS_PER_ELEMENT_ROUND = _ROWS * 8

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the FMA probe needs it
    numba = None

if numba is not None:
    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _fma_chains(x, a, b, rounds):
        """``rounds`` times, 8 dependent FMAs on each of the 8 rows of x, element by element (vectorised)."""
        x0, x1, x2, x3, x4, x5, x6, x7 = x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]
        for _ in range(rounds):
            for j in range(x0.shape[0]):
                v0, v1, v2, v3, v4, v5, v6, v7 = x0[j], x1[j], x2[j], x3[j], x4[j], x5[j], x6[j], x7[j]
                for _ in range(8):  # a constant trip count: LLVM unrolls it, the j loop is then innermost
                    v0 = v0 * a + b
                    v1 = v1 * a + b
                    v2 = v2 * a + b
                    v3 = v3 * a + b
                    v4 = v4 * a + b
                    v5 = v5 * a + b
                    v6 = v6 * a + b
                    v7 = v7 * a + b
                x0[j], x1[j], x2[j], x3[j], x4[j], x5[j], x6[j], x7[j] = v0, v1, v2, v3, v4, v5, v6, v7


@dataclass
class MachineLimits:
    """The measured limits of this machine (see the module docstring for how each is measured).

    fma_gflops_per_core: float32 FMA peak of one core, GFLOP/s (2 per FMA), measured on one thread.
    fma_gflops_all: the same loop on ``threads`` threads at once, all together.
    gemm_gmacs: the faster library's large float32 GEMM on ``threads`` threads, GMAC/s (``gemm_library``);
    ``gemm_gmacs_by_library`` has each library's.
    scan_updates_per_s_per_core: the scan's per-core limit, fma_gflops_per_core / 2 * 1e9 / scan_ops_per_update.
    """
    cpu_model: str
    isa: str
    llvm_cpu: str
    threads: int
    fma_gflops_per_core: float
    fma_gflops_all: float
    gemm_gmacs: float
    gemm_library: str
    scan_ops_per_update: int
    scan_updates_per_s_per_core: float
    gemm_size: int = 2048
    gemm_gmacs_by_library: Dict[str, float] = field(default_factory=dict)

    @property
    def fma_gfmas_per_core(self) -> float:
        return self.fma_gflops_per_core / 2

    @property
    def thread_scaling(self) -> float:
        """All threads' FMA rate over one thread's."""
        return self.fma_gflops_all / self.fma_gflops_per_core

    @property
    def gemm_fraction_of_fma_peak(self) -> float:
        """The GEMM's multiply-adds/s over ``threads`` times one core's FMA peak (the physical limit: the measured
        all-thread rate also says how free the other cores were)."""
        return self.gemm_gmacs / (self.threads * self.fma_gfmas_per_core)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    def describe(self) -> List[str]:
        """Lines for a benchmark's header (without a leading '#')."""
        libraries = ', '.join(f'{name} {rate:.1f}' for name, rate in self.gemm_gmacs_by_library.items())
        return [
            f'machine limits: {self.cpu_model} ({self.llvm_cpu}, {self.isa}); float32 FMA peak '
            f'{self.fma_gflops_per_core:.1f} GFLOP/s = {self.fma_gfmas_per_core:.1f} GFMA/s per core (1 thread), '
            f'{self.fma_gflops_all:.1f} GFLOP/s on {self.threads} threads ({self.thread_scaling:.2f}x)',
            f'machine limits: GEMM {self.gemm_size}^3 on {self.threads} threads {self.gemm_gmacs:.1f} GMAC/s '
            f'({self.gemm_library}; {libraries}), {self.gemm_fraction_of_fma_peak:.0%} of {self.threads} x the '
            f'per-core FMA peak; scan limit {self.scan_updates_per_s_per_core / 1e9:.2f} G state updates/s per core '
            f'(FMA peak / {self.scan_ops_per_update} vector ops per update)',
        ]


def scan_update_limit(fma_gflops_per_core: float, ops_per_update: int = SCAN_UPDATE_VECTOR_OPS) -> float:
    """State updates/s one core can make: its lane-FMAs/s over the vector instructions of one update."""
    return fma_gflops_per_core / 2 * 1e9 / ops_per_update


def cpu_model() -> str:
    """The processor's name: /proc/cpuinfo's 'model name' where there is one, else the platform's."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('model name', 'Model')):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest float SIMD the processor has: avx512f, avx2, avx, asimd (ARM), sse2, or 'unknown'."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = set()
            for line in f:
                if line.startswith(('flags', 'Features')):
                    flags.update(line.split(':', 1)[1].split())
    except OSError:
        flags = set()
    return next((isa for isa in ('avx512f', 'avx2', 'avx', 'asimd', 'sse2') if isa in flags), 'unknown')


def _llvm_cpu() -> str:
    try:
        import llvmlite.binding as llvm
        return llvm.get_host_cpu_name()
    except Exception:  # noqa: BLE001 -- informational only
        return 'unknown'


def _fma_rate(threads: int, seconds: float, repeats: int) -> float:
    """Lane-FMAs per second of the loop on ``threads`` threads at once (the best of ``repeats`` runs)."""
    rows = [np.full((_ROWS, _WIDTH), 1.0, np.float32) for _ in range(threads)]
    a, b = np.float32(0.999), np.float32(0.001)  # converges to 1: no overflow, no subnormals
    _fma_chains(rows[0], a, b, 16)  # compiled (or loaded from the cache) and warm
    start = time.perf_counter()
    _fma_chains(rows[0], a, b, 256)
    per_round = max((time.perf_counter() - start) / 256, 1e-9)
    rounds = max(16, int(seconds / per_round))
    best = 0.0
    for _ in range(repeats):
        if threads == 1:
            start = time.perf_counter()
            _fma_chains(rows[0], a, b, rounds)
            elapsed = time.perf_counter() - start
        else:
            barrier = threading.Barrier(threads + 1)

            def work(x):
                barrier.wait()
                _fma_chains(x, a, b, rounds)
            workers = [threading.Thread(target=work, args=(x,)) for x in rows]
            for w in workers:
                w.start()
            barrier.wait()
            start = time.perf_counter()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - start
        best = max(best, threads * rounds * _WIDTH * _FMAS_PER_ELEMENT_ROUND / elapsed)
    return best


def measure_fma_peak(threads: int = 1, seconds: float = 0.1, repeats: int = 3) -> float:
    """The float32 FMA peak in GFLOP/s (2 per FMA) of ``threads`` threads together."""
    if numba is None:  # pragma: no cover
        raise RuntimeError('the FMA probe needs numba')
    return 2 * _fma_rate(threads, seconds, repeats) / 1e9


def _gemm_calls(size: int) -> Dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    calls: Dict[str, Callable[[], object]] = {'torch.mm': lambda: torch.mm(x, w)}
    onednn = getattr(torch.ops.mkldnn, '_linear_pointwise', None) if (
        platform.machine().lower() in ('x86_64', 'amd64') and torch.backends.mkldnn.is_available()) else None
    if onednn is not None:
        bias = torch.zeros(size)
        calls['oneDNN'] = lambda: onednn(x, w, bias, 'none', [], '')
    return calls


def measure_gemm(size: int = 2048, repeats: int = 3) -> Dict[str, float]:
    """GMAC/s of a ``size``^3 float32 GEMM per library, on PyTorch's current thread count (best of ``repeats``
    after one warm-up call; a library that fails is left out)."""
    rates = {}
    with torch.no_grad():
        for name, call in _gemm_calls(size).items():
            try:
                call()
            except RuntimeError:
                continue
            best = float('inf')
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - start)
            rates[name] = size ** 3 / best / 1e9
    return rates


def measure_machine_limits(threads: Optional[int] = None, gemm_size: int = 2048, seconds: float = 0.1,
                           repeats: int = 3) -> MachineLimits:
    """Measure this machine's limits (about 2 s with the defaults): the FMA peak on one thread and on ``threads``
    (default: PyTorch's thread count), the GEMM on ``threads`` of PyTorch's threads (restored after), and the
    scan's per-core limit derived from the first."""
    previous = torch.get_num_threads()
    threads = threads or previous
    per_core = measure_fma_peak(1, seconds, repeats)
    all_threads = per_core if threads == 1 else measure_fma_peak(threads, seconds, repeats)
    torch.set_num_threads(threads)
    try:
        gemm = measure_gemm(gemm_size, repeats)
    finally:
        torch.set_num_threads(previous)
    library = max(gemm, key=gemm.get) if gemm else 'none'
    return MachineLimits(
        cpu_model=cpu_model(), isa=cpu_isa(), llvm_cpu=_llvm_cpu(), threads=threads,
        fma_gflops_per_core=per_core, fma_gflops_all=all_threads,
        gemm_gmacs=gemm.get(library, float('nan')), gemm_library=library,
        scan_ops_per_update=SCAN_UPDATE_VECTOR_OPS, scan_updates_per_s_per_core=scan_update_limit(per_core),
        gemm_size=gemm_size, gemm_gmacs_by_library=gemm)
