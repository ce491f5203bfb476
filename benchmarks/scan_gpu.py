"""GPU benchmark (issue 7): the Triton selective scan against mamba_ssm's figures and the pure-PyTorch path, then
every family's tiny model against timm's baselines, end to end. One run prints everything; a summary table last.

Part 1, the scan kernel (``--part scan``), for each row of issue 7's performance table: bf16 u, delta, z, B, C
(contiguous; B and C per step, (batch, N, L), or for the VMamba row "4 directions folded" grouped, (batch, 4, N, L),
dim 384 = 4 groups of 96 channels), float32 A (negative), D and delta_bias (as model parameters are under AMP),
delta_softplus=True, z where the row has it.

* Correctness first, on fresh random inputs at batch 2 (the row's dim and L): the Triton output and every gradient
  against the 'chunked' path in float64 on the same device (the bf16 values upcast), relative error
  ||got - ref|| / ||ref||; a row passes when everything is finite and each error is under 1e-2 (bf16). Poisoned
  outputs (unwritten elements) are the test suite's job (tests/ops/test_scan_triton.py), not this script's.
* Times, in ms: forward (under no_grad: the inference call) and forward+backward (``torch.autograd.grad`` of the
  output against a random cotangent, every input a leaf: no gradient accumulation is timed) of our Triton kernel
  and of the pure-PyTorch 'chunked' path, both through ``selective_scan(..., backend=...)``. On CUDA the Triton
  times are medians of ``triton.testing.do_bench`` (events; it flushes L2 before every timed call), taken twice
  to show the spread; when one input set fits in L2 a few sets are rotated as well. The chunked path is launch
  bound and slow, so it gets a few calls (synchronised wall clock, median; as many as fit in ~5 s after a warm-up
  call, at most 10); its forward+backward is skipped, with a note, when it would take over ~20 s a call (estimated
  as 4x its forward). Without CUDA (``--smoke``) every time is one ``time.perf_counter`` call after a warm-up.
* mamba_ssm's figures for the same rows, "given in issue 7, measured on an H100 with mamba_ssm's CUDA kernel"
  (constants below, not measured here), and the speed-ups of our kernel over them (target >= 1.5x) and over the
  chunked path (target >= 50x).
* The bytes-moved roofline: the fewest bytes a scan must move (every input read once, the output written once;
  the backward reads dout and every forward input again and writes one gradient per input), divided by the copy
  bandwidth measured at the start of the run (one large device-to-device copy, bytes read + written over the
  median time) gives a floor in ms; floor / measured time is the fraction of copy bandwidth reached.
* The compiled Triton kernels' resource report (registers, spills, shared memory, warps, block sizes); with
  ``--asm-dir`` their PTX / SASS are written there too.

Part 2, end to end (``--part models``): mambavision_tiny, vim_tiny, vmamba_tiny, mambaout_tiny, hybrid_tiny against
timm's convnext_tiny, swin_tiny_patch4_window7_224, deit_tiny_patch16_224, random weights, batch 128, 224x224,
AMP bf16, channels-last, cudnn.benchmark on: inference and training images/s (and latency, peak memory, FLOPs),
measured by ``mambazoo.analysis.benchmark.run_benchmark``. Channels-last: the models are converted
(``model.to(memory_format=torch.channels_last)``) as they are built; the input batch stays contiguous NCHW, and the
first convolution, whose weight is channels-last, returns channels-last activations from then on. Ratios ('x ref')
are against convnext_tiny. The scan backend is the dispatcher's 'auto' (the Triton kernel on CUDA).

    .venv/bin/python benchmarks/scan_gpu.py [--part scan|models|all] [--rows vim_t vmamba_t_s1 ...] [--json PATH]
        [--asm-dir DIR] [--models NAME ...] [--smoke]

``--smoke``: the whole script on tiny shapes (scan rows at batch 2, dim 4, L 16 with each row's N, grouping and z;
models at 64x64, batch 2, one iteration, two models), runnable without a GPU (~45 s on a 2-core CPU): on CPU it
sets TRITON_INTERPRET=1 itself before Triton is imported, so the Triton kernels run in Triton's interpreter on CPU
tensors. Its numbers mean nothing; it checks that the script runs (tests/test_benchmark_scripts_gpu.py). The exit
status is 1 when a correctness check failed or a row or model raised (everything is still printed).

Without the package installed (the device machine's image), the script imports mambazoo from the checkout's src/.
Part 1 takes a few minutes on an H100 (Triton compiles each kernel variant at its first call); part 2 a few more:
``--part scan`` and ``--part models`` split it where one command has a time limit.
"""
import os
import sys

import torch

SMOKE = '--smoke' in sys.argv[1:]
if SMOKE and not torch.cuda.is_available():
    # Triton reads this when it is imported, and mambazoo imports it (through torch._dynamo): set it first.
    os.environ['TRITON_INTERPRET'] = '1'

import argparse  # noqa: E402
import contextlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: E402

from pathlib import Path  # noqa: E402

import timm  # noqa: E402
import triton  # noqa: E402
from torch import Tensor  # noqa: E402

try:
    import mambazoo  # noqa: E402
except ImportError:  # a checkout where the package is not installed (the device machine's image): its src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'src'))
    import mambazoo  # noqa: E402
from mambazoo.analysis import benchmark as model_bench  # noqa: E402
from mambazoo.ops import get_scan_backend, selective_scan  # noqa: E402

BF16 = torch.bfloat16
REL_TOL = 1e-2  # bf16 inputs and outputs, float32 state and accumulation
CHECK_BATCH = 2
TARGET_VS_MAMBA_SSM = 1.5
TARGET_VS_CHUNKED = 50.0
CHUNKED_SKIP_S = 20.0  # skip the chunked forward+backward when one call would take longer (estimated)
CHUNKED_BUDGET_S = 5.0  # wall time spent on each chunked measurement after its warm-up call
CHUNKED_MAX_CALLS = 10
MAX_INPUT_SETS = 8
SMOKE_SHAPE = (2, 4, 16)  # batch, dim, L: Triton's interpreter takes ~0.2-0.7 s a call here (~5x that at dim 8, L 40)
SMOKE_CALLS = 1  # calls per measurement without CUDA

BASELINES = ('convnext_tiny', 'swin_tiny_patch4_window7_224', 'deit_tiny_patch16_224')
OURS = ('mambavision_tiny', 'vim_tiny', 'vmamba_tiny', 'mambaout_tiny', 'hybrid_tiny')
SMOKE_MODELS = ('deit_tiny_patch16_224', 'vim_tiny')  # the whole list takes ~2 min on a 2-core CPU


@dataclass(frozen=True)
class ScanRow:
    """One row of issue 7's table, with mamba_ssm's figures as given there."""
    name: str
    label: str
    batch: int
    dim: int
    length: int
    d_state: int
    groups: int  # 0: B/C per step (batch, N, L); G: grouped (batch, G, N, L)
    z: bool
    mamba_ssm_fwd_ms: float  # given in issue 7, measured on an H100 with mamba_ssm's CUDA kernel
    mamba_ssm_fwdbwd_ms: float  # likewise


# Given in issue 7 (not measured here): mamba_ssm's CUDA `selective_scan_fn` (built for sm_90) on an H100, torch
# 2.11, bf16, delta_softplus with delta_bias, median of triton.testing.do_bench, fwd / fwd+bwd in ms.
ROWS: Tuple[ScanRow, ...] = (
    ScanRow('vim_t', 'Vim-T layer', 128, 384, 197, 16, 0, True, 0.40, 1.60),
    ScanRow('vmamba_t_s1', 'VMamba-T stage 1, 4 directions folded', 128, 384, 3136, 1, 4, False, 1.06, 3.91),
    ScanRow('b32_l3136', '32x384x3136 N16', 32, 384, 3136, 16, 0, False, 1.35, 6.19),
    ScanRow('mambavision_t_s3', 'MambaVision-T stage 3', 128, 160, 196, 16, 0, False, 0.16, 0.66),
    ScanRow('b8_d1536_l4096', '8x1536x4096 N16, z', 8, 1536, 4096, 16, 0, True, 0.89, 4.53),
    ScanRow('vim_t_1248', 'Vim-T at 1248^2', 8, 384, 6085, 16, 0, True, 0.58, 2.97),
)
ROW_BY_NAME = {row.name: row for row in ROWS}


# -- timing ----------------------------------------------------------------------------------------------------

class Timer:
    """Medians in ms: ``triton.testing.do_bench`` on CUDA, else ``time.perf_counter`` over a few calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == 'cuda'

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall_ms(self, fn: Callable[[], Any]) -> float:
        """One call, synchronised, in ms."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3

    def fast_ms(self, fn: Callable[[], Any]) -> float:
        """Median of a short kernel's calls (do_bench: warm-up, L2 flushed before each timed call; without CUDA
        the caller has made the warm-up call)."""
        if self.cuda:
            return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode='median'))
        return statistics.median(self.wall_ms(fn) for _ in range(SMOKE_CALLS))

    def slow_ms(self, fn: Callable[[], Any], budget_s: float = CHUNKED_BUDGET_S,
                max_calls: int = CHUNKED_MAX_CALLS) -> Tuple[float, int]:
        """Median of a slow path's calls, as many as fit in ``budget_s`` after one warm-up call (1 to max_calls)."""
        first = self.wall_ms(fn)
        calls = SMOKE_CALLS if not self.cuda else max(1, min(max_calls, int(budget_s * 1e3 / max(first, 1e-3))))
        return statistics.median(self.wall_ms(fn) for _ in range(calls)), calls


def copy_bandwidth(timer: Timer, nbytes: int) -> Dict[str, float]:
    """One large device-to-device copy: (bytes read + bytes written) / median time, in GB/s."""
    src = torch.randn(nbytes // 4, device=timer.device)  # random, never zeros
    dst = torch.empty_like(src)
    ms = timer.fast_ms(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return dict(bytes=moved, ms=ms, gb_per_s=moved / ms / 1e6)


def l2_bytes(device: torch.device) -> int:
    if device.type == 'cuda':
        return int(getattr(torch.cuda.get_device_properties(device), 'L2_cache_size', 50 * 2 ** 20))
    return 32 * 2 ** 20  # a CPU stand-in, so that the smoke run rotates sets too


# -- inputs ----------------------------------------------------------------------------------------------------

ScanInputs = Dict[str, Tensor]  # u, delta, A, B, C, D, [z,] delta_bias: leaves that require grad


def row_shape(row: ScanRow, smoke: bool) -> Tuple[int, int, int]:
    return SMOKE_SHAPE if smoke else (row.batch, row.dim, row.length)


def make_scan_inputs(row: ScanRow, batch: int, dim: int, length: int, device: torch.device,
                     seed: int) -> Tuple[ScanInputs, Tensor]:
    """Fresh random inputs of a row (leaves requiring grad) and a random output cotangent, on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    N = row.d_state

    def randn(*shape: int, dtype: torch.dtype = BF16, scale: float = 1.0) -> Tensor:
        return (scale * torch.randn(shape, generator=gen, device=device)).to(dtype)

    bc_shape = (batch, row.groups, N, length) if row.groups else (batch, N, length)
    # dt = softplus(bias) log-uniform in [1e-3, 1e-1] as Mamba initialises it; A near S4D-real's -(n + 1)
    dt = torch.exp(math.log(1e-3) + math.log(100.0) * torch.rand(dim, generator=gen, device=device))
    x = dict(
        u=randn(batch, dim, length),
        delta=randn(batch, dim, length, scale=0.5),  # raw, before bias and softplus
        A=-torch.arange(1, N + 1, device=device, dtype=torch.float32) * torch.exp(
            0.2 * torch.randn(dim, N, generator=gen, device=device)),
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(dim, dtype=torch.float32),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )
    if row.z:
        x['z'] = randn(batch, dim, length)
    dout = randn(batch, dim, length)
    return {k: v.requires_grad_() for k, v in x.items()}, dout


def run_scan(backend: str, x: ScanInputs) -> Tensor:
    return selective_scan(x['u'], x['delta'], x['A'], x['B'], x['C'], D=x['D'], z=x.get('z'),
                          delta_bias=x['delta_bias'], delta_softplus=True, backend=backend)


def scan_grads(backend: str, x: ScanInputs, dout: Tensor) -> Tuple[Tensor, ...]:
    """The gradients of every input (no accumulation into .grad)."""
    return torch.autograd.grad(run_scan(backend, x), list(x.values()), dout)


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def min_bytes(x: ScanInputs, dout: Tensor) -> Tuple[int, int]:
    """Fewest bytes moved by (forward, forward+backward): inputs read once and the output written once; the
    backward reads dout and every input again and writes a gradient of each input's size."""
    inputs, out = sum(nbytes(t) for t in x.values()), nbytes(dout)
    return inputs + out, (inputs + out) + (out + inputs + inputs)


def input_set_count(set_bytes: int, l2: int) -> int:
    """Input sets to rotate: enough for ~4x the L2 size, 1 when one set is that large already."""
    return max(1, min(MAX_INPUT_SETS, math.ceil(4 * l2 / set_bytes)))


# -- part 1: the scan ------------------------------------------------------------------------------------------

def rel_err(got: Tensor, ref: Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_row(row: ScanRow, device: torch.device, smoke: bool) -> Dict[str, Any]:
    """Triton output and gradients vs the float64 chunked path, fresh inputs at batch 2."""
    _, dim, length = row_shape(row, smoke)
    x, dout = make_scan_inputs(row, CHECK_BATCH, dim, length, device, seed=1234)
    out = run_scan('triton', x)
    grads = torch.autograd.grad(out, list(x.values()), dout)
    x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    out64 = run_scan('chunked', x64)
    grads64 = torch.autograd.grad(out64, list(x64.values()), dout.double())
    errors = {'out': rel_err(out, out64)}
    errors.update({f'd{k}': rel_err(g, g64) for k, g, g64 in zip(x, grads, grads64)})
    finite = all(torch.isfinite(t).all().item() for t in (out, *grads))
    worst = max(errors, key=errors.get)
    ok = finite and all(e < REL_TOL for e in errors.values())
    return dict(ok=ok, finite=finite, errors=errors, worst=worst, max_error=errors[worst])


def time_row(row: ScanRow, timer: Timer, smoke: bool, seed: int = 0) -> Dict[str, Any]:
    """Times of the Triton kernel and the chunked path on one row (see the module docstring)."""
    batch, dim, length = row_shape(row, smoke)
    first, dout = make_scan_inputs(row, batch, dim, length, timer.device, seed)
    fwd_bytes, fwdbwd_bytes = min_bytes(first, dout)
    sets = [(first, dout)] + [make_scan_inputs(row, batch, dim, length, timer.device, seed + i)
                              for i in range(1, input_set_count(fwd_bytes + nbytes(dout), l2_bytes(timer.device)))]
    res: Dict[str, Any] = dict(shape=[batch, dim, length], d_state=row.d_state, groups=row.groups, z=row.z,
                               input_sets=len(sets), fwd_bytes=fwd_bytes, fwdbwd_bytes=fwdbwd_bytes, notes=[])

    def rotating(fn: Callable[[ScanInputs, Tensor], Any]) -> Callable[[], Any]:
        cycle = itertools.cycle(sets)
        return lambda: fn(*next(cycle))

    fwd = {b: rotating(lambda x, _, b=b: run_scan(b, x)) for b in ('triton', 'chunked')}
    fwdbwd = {b: rotating(lambda x, d, b=b: scan_grads(b, x, d)) for b in ('triton', 'chunked')}
    with torch.no_grad():
        res['triton_first_call_s'] = timer.wall_ms(fwd['triton']) / 1e3  # includes compiling this variant
        res['triton_fwd_ms_runs'] = [timer.fast_ms(fwd['triton']) for _ in range(2)]
    first_bwd = timer.wall_ms(fwdbwd['triton'])
    res['triton_fwdbwd_first_call_s'] = first_bwd / 1e3
    res['triton_fwdbwd_ms_runs'] = [timer.fast_ms(fwdbwd['triton']) for _ in range(2)]
    res['triton_fwd_ms'] = statistics.mean(res['triton_fwd_ms_runs'])
    res['triton_fwdbwd_ms'] = statistics.mean(res['triton_fwdbwd_ms_runs'])
    with torch.no_grad():
        res['chunked_fwd_ms'], res['chunked_fwd_calls'] = timer.slow_ms(fwd['chunked'])
    estimate_s = 4 * res['chunked_fwd_ms'] / 1e3
    if estimate_s > CHUNKED_SKIP_S:
        res['chunked_fwdbwd_ms'], res['chunked_fwdbwd_calls'] = None, 0
        res['notes'].append(f'chunked fwd+bwd skipped: ~{estimate_s:.0f} s a call (4x its forward)')
    else:
        res['chunked_fwdbwd_ms'], res['chunked_fwdbwd_calls'] = timer.slow_ms(fwdbwd['chunked'])
    del sets, fwd, fwdbwd
    return res


def add_ratios(row: ScanRow, res: Dict[str, Any], copy_gb_per_s: float, smoke: bool) -> None:
    """Floors, fractions of copy bandwidth and speed-ups, into ``res``."""
    for part in ('fwd', 'fwdbwd'):
        ours = res[f'triton_{part}_ms']
        floor = res[f'{part}_bytes'] / (copy_gb_per_s * 1e6)
        res[f'{part}_floor_ms'] = floor
        res[f'triton_{part}_copy_fraction'] = floor / ours
        chunked = res[f'chunked_{part}_ms']
        res[f'{part}_vs_chunked'] = chunked / ours if chunked else None
        mamba = None if smoke else getattr(row, f'mamba_ssm_{part}_ms')  # other shapes in a smoke run
        res[f'{part}_vs_mamba_ssm'] = mamba / ours if mamba else None
        res[f'mamba_ssm_{part}_copy_fraction'] = floor / mamba if mamba else None


def _kernel_entry(fn: Any, variant: int, compiled: Any, asm_dir: Optional[str]) -> Dict[str, Any]:
    """One compiled variant's resources (and, with ``asm_dir``, its PTX, SASS and cubin written there)."""
    compiled._init_handles()  # loads the binary: sets n_regs and n_spills
    meta = compiled.metadata
    consts = {fn.arg_names[k[0]] if isinstance(k, tuple) else str(k): v
              for k, v in getattr(compiled.src, 'constants', {}).items()}
    entry = dict(kernel=fn.__name__, variant=variant, registers=compiled.n_regs, spills=compiled.n_spills,
                 shared_bytes=meta.shared, num_warps=meta.num_warps, num_stages=meta.num_stages,
                 blocks={k: consts[k] for k in ('BLOCK_D', 'BLOCK_N', 'BLOCK_L') if k in consts},
                 flags=[k for k in ('HAS_Z', 'B_FIXED', 'C_FIXED') if consts.get(k)])
    if asm_dir:
        os.makedirs(asm_dir, exist_ok=True)
        for kind in ('ptx', 'sass', 'cubin'):
            with contextlib.suppress(Exception):  # SASS needs the CUDA binutils
                text = compiled.asm[kind]
                with open(os.path.join(asm_dir, f'{fn.__name__}_{variant}.{kind}'),
                          'wb' if isinstance(text, bytes) else 'w') as f:
                    f.write(text)
    return entry


def kernel_resources(asm_dir: Optional[str]) -> List[Dict[str, Any]]:
    """Registers, spills, shared memory, warps and block sizes of every compiled scan kernel (none when the
    kernels were interpreted). Best effort: reads Triton's kernel cache, whose layout changes between versions."""
    from mambazoo.ops import scan_triton_kernels as kernels
    report: List[Dict[str, Any]] = []
    for fn in (kernels.selective_scan_fwd_kernel, kernels.selective_scan_bwd_kernel):
        try:
            compiled_variants = [k for cache in getattr(fn, 'device_caches', {}).values() for k in cache[0].values()]
        except Exception as e:  # noqa: BLE001
            report.append(dict(kernel=fn.__name__, variant=-1, error=f'{type(e).__name__}: {e}'[:200]))
            continue
        for i, compiled in enumerate(compiled_variants):
            try:
                report.append(_kernel_entry(fn, i, compiled, asm_dir))
            except Exception as e:  # noqa: BLE001
                report.append(dict(kernel=fn.__name__, variant=i, error=f'{type(e).__name__}: {e}'[:200]))
    return report


def scan_part(rows: Sequence[ScanRow], timer: Timer, smoke: bool, asm_dir: Optional[str],
              log: Callable[[str], None]) -> Dict[str, Any]:
    copy = copy_bandwidth(timer, (32 if smoke or not timer.cuda else 2048) * 2 ** 20)
    log(f'copy bandwidth {copy["gb_per_s"]:.0f} GB/s ({copy["bytes"] / 2 ** 20:.0f} MiB read+written in '
        f'{copy["ms"]:.3f} ms)')
    results: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        start = time.perf_counter()
        res: Dict[str, Any] = dict(shape=list(row_shape(row, smoke)))
        try:
            res['check'] = check_row(row, timer.device, smoke)
            if timer.cuda:
                torch.cuda.empty_cache()
            res.update(time_row(row, timer, smoke))
            add_ratios(row, res, copy['gb_per_s'], smoke)
        except Exception as e:  # noqa: BLE001 -- report the row and go on with the others
            res['error'] = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
            traceback.print_exc()
        if timer.cuda:
            torch.cuda.empty_cache()
        res['seconds'] = time.perf_counter() - start
        results[row.name] = res
        log(f'scan row {row.name}: {res["seconds"]:.1f} s' + (f' ERROR {res["error"]}' if 'error' in res else ''))
    return dict(copy_bandwidth=copy, rows=results,
                kernels=kernel_resources(asm_dir))


# -- part 2: models --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def channels_last_models() -> Iterator[None]:
    """Inside, ``run_benchmark`` builds its models channels-last (see the module docstring)."""
    build = model_bench.create_any_model

    def build_channels_last(*args: Any, **kwargs: Any) -> torch.nn.Module:
        return build(*args, **kwargs).to(memory_format=torch.channels_last)

    model_bench.create_any_model = build_channels_last
    try:
        yield
    finally:
        model_bench.create_any_model = build


def models_part(names: Sequence[str], device: torch.device, smoke: bool, batch: int, warmup: int, iters: int,
                log: Callable[[str], None]) -> List[model_bench.BenchmarkResult]:
    """``run_benchmark`` over all the models, channels-last (ratios vs the first). It records only some error
    types per model and lets others through: if it raises, the models are run again one at a time, so that one
    failing model leaves the others' numbers."""
    size = 64 if smoke else 224
    kwargs = dict(sizes=(size,), batch_size=batch, device=device, amp=True, amp_dtype='bfloat16', train=True,
                  latency=True, warmup=warmup, iters=iters, log=log)
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    try:
        with channels_last_models():
            try:
                return model_bench.run_benchmark(names, **kwargs)
            except Exception as e:  # noqa: BLE001
                log(f'run_benchmark raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}; '
                    'again, one model at a time')
            results: List[model_bench.BenchmarkResult] = []
            for name in names:
                try:
                    results += model_bench.run_benchmark([name], **kwargs)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    results.append(model_bench.BenchmarkResult(
                        model=name, library=model_bench._library(name), img_size=size, batch_size=batch,
                        device=str(device), precision='amp-bfloat16',
                        error=f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]))
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
            model_bench._fill_ratios(results)  # vs the first model, as run_benchmark computes them
            return results
    finally:
        torch.backends.cudnn.benchmark = previous


# -- printing --------------------------------------------------------------------------------------------------

def fmt(value: Optional[float], spec: str = '.3f', suffix: str = '') -> str:
    return '-' if value is None else f'{value:{spec}}{suffix}'


def times(value: Optional[float]) -> str:
    """A speed-up: 2 decimals under 10x, none above."""
    return '-' if value is None else f'{value:.{0 if value >= 10 else 2}f}x'


def pct(value: Optional[float]) -> str:
    return '-' if value is None else f'{100 * value:.0f}%'


def verdict(ratio: Optional[float], target: float) -> str:
    if ratio is None:
        return '-'
    return f'{times(ratio)} {"met" if ratio >= target else "NOT met"}'


def shape_text(res: Dict[str, Any], row: ScanRow) -> str:
    b, d, length = res['shape']
    bc = f'B/C (b,{row.groups},N,L)' if row.groups else 'B/C (b,N,L)'
    return f'{row.label}: {b}x{d}x{length} N{row.d_state} {"z" if row.z else "no z"}, {bc}'


def print_scan_tables(rows: Sequence[ScanRow], scan: Dict[str, Any]) -> None:
    results = scan['rows']
    print('\n## Scan: correctness (Triton vs the float64 chunked path, batch 2, ||got - ref|| / ||ref||, '
          f'bf16 tolerance {REL_TOL:g})\n')
    keys = ['out', 'du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'dz', 'ddelta_bias']
    print('| row | ' + ' | '.join(keys) + ' | finite | result |')
    print('|---|' + '---|' * (len(keys) + 2))
    for row in rows:
        res = results[row.name]
        check = res.get('check')
        if check is None:
            print(f'| {row.name} | error: {res.get("error")} |' + ' |' * (len(keys) + 1))
            continue
        errs = [fmt(check['errors'].get(k), '.1e') for k in keys]
        result = 'ok' if check['ok'] else f'FAIL ({check["worst"]})'
        print(f'| {row.name} | ' + ' | '.join(errs) + f' | {check["finite"]} | {result} |')

    for part, title in (('fwd', 'forward'), ('fwdbwd', 'forward+backward')):
        print(f'\n## Scan {title}, ms (mamba_ssm: given in issue 7, measured on an H100 with mamba_ssm\'s CUDA '
              'kernel; not measured here)\n')
        print('| row | shape | Triton ms (2 runs spread) | chunked ms (calls) | mamba_ssm ms (issue 7) | x mamba_ssm '
              '| x chunked | floor ms | Triton % copy bw | mamba_ssm % copy bw |')
        print('|---|---|---|---|---|---|---|---|---|---|')
        for row in rows:
            res = results[row.name]
            if f'triton_{part}_ms' not in res or f'{part}_floor_ms' not in res:
                print(f'| {row.name} | {shape_text(res, row)} | error: {res.get("error", "?")} |' + ' |' * 7)
                continue
            runs = res[f'triton_{part}_ms_runs']
            spread = abs(runs[0] - runs[1]) / min(runs)
            chunked = res[f'chunked_{part}_ms']
            chunked_text = f'{chunked:.2f} ({res[f"chunked_{part}_calls"]})' if chunked else 'skipped'
            mamba = getattr(row, f'mamba_ssm_{part}_ms') if res[f'{part}_vs_mamba_ssm'] else None
            print(f'| {row.name} | {shape_text(res, row)} | {res[f"triton_{part}_ms"]:.3f} (±{100 * spread:.1f}%) '
                  f'| {chunked_text} | {fmt(mamba, ".2f")} | {times(res[f"{part}_vs_mamba_ssm"])} '
                  f'| {times(res[f"{part}_vs_chunked"])} | {res[f"{part}_floor_ms"]:.3f} '
                  f'| {pct(res[f"triton_{part}_copy_fraction"])} | {pct(res[f"mamba_ssm_{part}_copy_fraction"])} |')
    copy = scan['copy_bandwidth']
    print(f'\nFloor = fewest bytes (fwd: inputs once + out; fwd+bwd: that + dout + inputs again + one gradient per '
          f'input) / measured copy bandwidth {copy["gb_per_s"]:.0f} GB/s. "x" = their ms / our ms.')
    notes = [f'{row.name}: {n}' for row in rows for n in results[row.name].get('notes', [])]
    notes += [f'{row.name}: first Triton call {results[row.name]["triton_first_call_s"]:.1f} s fwd, '
              f'{results[row.name]["triton_fwdbwd_first_call_s"]:.1f} s fwd+bwd (compiles new variants), '
              f'{results[row.name]["input_sets"]} input set(s) rotated'
              for row in rows if 'triton_first_call_s' in results[row.name]]
    for note in notes:
        print(f'# {note}')

    if scan['kernels']:
        print('\n## Compiled Triton scan kernels\n')
        print('| kernel | blocks (D, N, L) | flags | warps | stages | registers | spills | shared bytes |')
        print('|---|---|---|---|---|---|---|---|')
        for k in scan['kernels']:
            if 'error' in k:
                print(f'| {k["kernel"]} #{k["variant"]} | error: {k["error"]} | | | | | | |')
                continue
            blocks = ', '.join(str(v) for v in k['blocks'].values())
            print(f'| {k["kernel"]} #{k["variant"]} | {blocks} | {" ".join(k["flags"]) or "-"} | {k["num_warps"]} '
                  f'| {k["num_stages"]} | {k["registers"]} | {k["spills"]} | {k["shared_bytes"]} |')


def print_summary(rows: Sequence[ScanRow], scan: Optional[Dict[str, Any]],
                  models: Optional[List[model_bench.BenchmarkResult]], device_name: str) -> None:
    print(f'\n## Summary ({device_name})\n')
    if scan is not None:
        print(f'| scan row | check | fwd ms | x mamba_ssm (>= {TARGET_VS_MAMBA_SSM:g}) | x chunked '
              f'(>= {TARGET_VS_CHUNKED:g}) | fwd+bwd ms | x mamba_ssm (>= {TARGET_VS_MAMBA_SSM:g}) | x chunked '
              f'(>= {TARGET_VS_CHUNKED:g}) | % copy bw fwd / fwd+bwd |')
        print('|---|---|---|---|---|---|---|---|---|')
        for row in rows:
            res = scan['rows'][row.name]
            if 'fwd_floor_ms' not in res:
                print(f'| {row.name} | error: {res.get("error")} |' + ' |' * 7)
                continue
            check = 'ok' if res['check']['ok'] else f'FAIL {res["check"]["worst"]} {res["check"]["max_error"]:.1e}'
            print(f'| {row.name} | {check} | {res["triton_fwd_ms"]:.3f} '
                  f'| {verdict(res["fwd_vs_mamba_ssm"], TARGET_VS_MAMBA_SSM)} '
                  f'| {verdict(res["fwd_vs_chunked"], TARGET_VS_CHUNKED)} | {res["triton_fwdbwd_ms"]:.3f} '
                  f'| {verdict(res["fwdbwd_vs_mamba_ssm"], TARGET_VS_MAMBA_SSM)} '
                  f'| {verdict(res["fwdbwd_vs_chunked"], TARGET_VS_CHUNKED)} '
                  f'| {pct(res["triton_fwd_copy_fraction"])} / {pct(res["triton_fwdbwd_copy_fraction"])} |')
    if models is not None:
        if scan is not None:
            print()
        ref = models[0].model if models else '-'
        print(f'| model | infer img/s | x {ref} | train img/s | x {ref} |')
        print('|---|---|---|---|---|')
        for r in models:
            if r.error:
                print(f'| {r.model} | error: {r.error} | | | |')
                continue
            print(f'| {r.model} | {fmt(r.infer_images_per_s, ".0f")} '
                  f'| {fmt(r.ratios.get("infer_images_per_s"), ".2f")} '
                  f'| {fmt(r.train_images_per_s, ".0f")} | {fmt(r.ratios.get("train_images_per_s"), ".2f")} |')


def header(device: torch.device) -> Tuple[str, str]:
    """(one-line description of the machine and software, the device's name)."""
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        dev = (f'{name}, {p.multi_processor_count} SMs, {p.total_memory / 2 ** 30:.0f} GiB, '
               f'L2 {l2_bytes(device) / 2 ** 20:.0f} MiB, CUDA {torch.version.cuda}')
    else:
        name = f'CPU ({platform.processor() or platform.machine()}), no GPU'
        dev = f'{name}, {os.cpu_count()} CPUs, TRITON_INTERPRET={os.environ.get("TRITON_INTERPRET", "unset")}'
    line = (f'# {dev}; torch {torch.__version__}, triton {triton.__version__}, timm {timm.__version__}, '
            f'mambazoo {mambazoo.__version__}, Python {platform.python_version()}, {time.strftime("%Y-%m-%d %H:%M")}')
    return line, name


# -- main ------------------------------------------------------------------------------------------------------

def select_rows(names: Optional[Sequence[str]]) -> List[ScanRow]:
    if not names:
        return list(ROWS)
    wanted = [n for name in names for n in name.split(',') if n]
    unknown = [n for n in wanted if n not in ROW_BY_NAME]
    if unknown:
        raise SystemExit(f'unknown row {unknown[0]!r}; choose from {", ".join(ROW_BY_NAME)}')
    return [row for row in ROWS if row.name in wanted]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--part', choices=('scan', 'models', 'all'), default='all')
    parser.add_argument('--rows', nargs='+', metavar='ROW', help=f'scan rows (default all): {", ".join(ROW_BY_NAME)}')
    parser.add_argument('--models', nargs='+', metavar='NAME',
                        help='models for part 2 (default: the timm baselines, then ours; ratios vs the first)')
    parser.add_argument('--model-batch', type=int, default=None, help='batch size of part 2 (default 128; smoke 2)')
    parser.add_argument('--model-warmup', type=int, default=None, help='warm-up passes (default 3; smoke 0)')
    parser.add_argument('--model-iters', type=int, default=None, help='timed passes (default 10; smoke 1)')
    parser.add_argument('--json', metavar='PATH', help='write every number as JSON (after each part)')
    parser.add_argument('--asm-dir', metavar='DIR', help='write the compiled scan kernels\' PTX and SASS there')
    parser.add_argument('--smoke', action='store_true', help='tiny shapes, runs without a GPU (see the docstring)')
    args = parser.parse_args()
    smoke = args.smoke
    if not torch.cuda.is_available() and not smoke:
        raise SystemExit('no CUDA device: this benchmark needs a GPU (--smoke runs it on tiny shapes without one)')
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rows = select_rows(args.rows)
    models = args.models or (SMOKE_MODELS if smoke else BASELINES + OURS)
    batch = args.model_batch or (2 if smoke else 128)
    warmup = args.model_warmup if args.model_warmup is not None else (0 if smoke else 3)
    iters = args.model_iters or (1 if smoke else 10)

    start = time.perf_counter()

    def log(text: str) -> None:
        print(f'# [{time.perf_counter() - start:6.1f} s] {text}', flush=True)

    line, device_name = header(device)
    print(line, flush=True)
    if smoke:
        print('# SMOKE RUN: tiny shapes, the numbers mean nothing', flush=True)
    report: Dict[str, Any] = dict(environment=line.lstrip('# '), device=device_name, smoke=smoke,
                                  mamba_ssm_reference='given in issue 7, measured on an H100 with mamba_ssm\'s CUDA '
                                                      'kernel (not measured here)',
                                  rows={row.name: asdict(row) for row in rows})

    def save() -> None:
        if args.json:
            report['elapsed_s'] = time.perf_counter() - start
            with open(args.json, 'w') as f:
                json.dump(report, f, indent=2)

    scan = model_results = None
    if args.part in ('scan', 'all'):
        scan = scan_part(rows, Timer(device), smoke, args.asm_dir, log)
        report['scan'] = scan
        save()
        print_scan_tables(rows, scan)
    if args.part in ('models', 'all'):
        log(f'models: {", ".join(models)}; batch {batch}, {"64" if smoke else "224"}x, AMP bf16, channels-last, '
            f'warm-up {warmup}, {iters} timed passes; scan backend {get_scan_backend()!r}')
        model_results = models_part(models, device, smoke, batch, warmup, iters, log)
        report['models'] = model_bench.benchmark_report(model_results, device)
        save()
        print(f'\n## End to end: batch {batch}, AMP bf16, channels-last ("x ref" = / {model_results[0].model})\n')
        print(model_bench.format_benchmark_table(model_results))

    print_summary(rows, scan, model_results, device_name)
    failures = []
    if scan is not None:
        for name, res in scan['rows'].items():
            if 'error' in res:
                failures.append(f'scan row {name}: {res["error"]}')
            elif not res['check']['ok']:
                failures.append(f'scan row {name}: check failed ({res["check"]["worst"]} '
                                f'{res["check"]["max_error"]:.1e}, finite {res["check"]["finite"]})')
    failures += [f'model {r.model}: {r.error}' for r in model_results or [] if r.error]
    for failure in failures:
        print(f'# FAILED: {failure}')
    log('done')
    save()
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
