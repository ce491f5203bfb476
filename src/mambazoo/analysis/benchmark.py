"""Speed and memory of our models and any timm model, side by side in one run (``mambazoo benchmark``).

For each model and input size: inference images/s (eval, no grad, at the batch size), latency at batch 1 (median),
training images/s (one forward + backward + AdamW step, random labels), peak memory of an inference pass and of a
training step, parameters and FLOPs (``count_flops`` on the meta device: one multiply-add = 1 FLOP). Timings are
medians over ``iters`` runs after ``warmup`` runs, synchronised on CUDA. The training step is
``measure_training_step``, which ``benchmarks/cpu_latency.py``'s training rows call too: the two agree by
construction.

Peak memory is the growth above the level before the measured pass (the weights, and the optimizer state of the
training step, already resident): on CUDA ``torch.cuda.max_memory_allocated`` after a reset of the peak counter;
on CPU the resident-set high-water mark (``VmHWM`` in /proc, reset through /proc/self/clear_refs, after
``malloc_trim`` so that freed memory must be faulted in again). The CPU figure includes allocator slack; it is
unavailable (None) outside Linux.

The high-resolution sweep (``sizes``, e.g. ``DEFAULT_SWEEP``) repeats everything at each size, as in Vim's Fig. 1
(Vim-Ti vs DeiT-Ti, 512 to 1248: 2.8x faster and 86.8% less GPU memory at 1248). Vim's 738 is not a multiple of the
patch size 16 here (our Vim rejects it), so 768 stands in. A model that fails at a size (out of memory, a size its
architecture rejects) gets an ``error`` instead of numbers, and the run goes on.
"""
import contextlib
import ctypes
import gc
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

# A name of this module, looked up at each call: benchmarks/scan_gpu.py swaps it to build channels-last models.
from ..models import create_any_model
from ..runtime import optimize_for_cpu

__all__ = ['BenchmarkResult', 'DEFAULT_SWEEP', 'benchmark_model', 'TrainingStep', 'measure_training_step',
           'run_benchmark', 'format_benchmark_table', 'benchmark_report', 'PeakMemory', 'saved_storages',
           'saved_activation_bytes']

DEFAULT_SWEEP = (224, 512, 640, 768, 1024, 1248)


@dataclass
class BenchmarkResult:
    """One model at one input size. Throughputs in images/s, times in ms, memory in MiB (growth, see module doc)."""
    model: str
    library: str
    img_size: int
    batch_size: int
    device: str
    precision: str
    params_m: Optional[float] = None
    gflops: Optional[float] = None
    infer_images_per_s: Optional[float] = None
    infer_ms_per_batch: Optional[float] = None
    latency_ms: Optional[float] = None
    infer_peak_memory_mb: Optional[float] = None
    train_images_per_s: Optional[float] = None
    train_ms_per_step: Optional[float] = None
    train_peak_memory_mb: Optional[float] = None
    error: Optional[str] = None
    ratios: Dict[str, Optional[float]] = field(default_factory=dict)


# The measurements compared with the reference model (each row's value / the reference's, at the same size).
RATIO_FIELDS = ('infer_images_per_s', 'latency_ms', 'infer_peak_memory_mb', 'train_images_per_s',
                'train_peak_memory_mb')


def _is_known(name: str) -> bool:
    import timm
    from ..models import is_model
    return is_model(name) or timm.is_model(name)


def _library(name: str) -> str:
    from ..models import is_model
    return 'mambazoo' if is_model(name) else 'timm'


def _proc_status_bytes(key: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakMemory:
    """Context manager: ``.mb`` is the peak memory growth (MiB) inside the block, None where it cannot be read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: Optional[float] = None

    def __enter__(self) -> 'PeakMemory':
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        self._before = None
        try:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL('libc.so.6').malloc_trim(0)  # hand freed heap back, so reuse shows as growth
            self._before = _proc_status_bytes('VmRSS:')
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset VmHWM to the current resident size
        except (OSError, KeyError):
            self._before = None
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._before) / 2 ** 20
        elif self._before is not None:
            self.mb = max(0, _proc_status_bytes('VmHWM:') - self._before) / 2 ** 20


def _median_seconds(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _amp_dtype(device: torch.device, amp_dtype: Optional[str]) -> torch.dtype:
    if amp_dtype:
        return {'float16': torch.float16, 'bfloat16': torch.bfloat16}[amp_dtype]
    return torch.float16 if device.type == 'cuda' else torch.bfloat16


def benchmark_model(
        model: nn.Module,
        batch_size: int = 32,
        img_size: int = 224,
        device: Any = 'cpu',
        amp: bool = False,
        amp_dtype: Optional[str] = None,
        train: bool = False,
        latency: bool = True,
        warmup: int = 2,
        iters: int = 5,
        in_chans: Optional[int] = None,
) -> Dict[str, Optional[float]]:
    """Time and measure ``model`` (moved to ``device``; left in eval mode) on random inputs.

    Returns the measurement fields of ``BenchmarkResult`` (training ones None unless ``train``, latency None
    unless ``latency``).
    """
    device = torch.device(device)
    model.to(device)
    if in_chans is None:
        in_chans = getattr(model, 'pretrained_cfg', {}).get('input_size', (3,))[0]
    autocast = (lambda: torch.autocast(device.type, dtype=_amp_dtype(device, amp_dtype))) if amp \
        else contextlib.nullcontext
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    out: Dict[str, Optional[float]] = {k: None for k in (
        'infer_images_per_s', 'infer_ms_per_batch', 'latency_ms', 'infer_peak_memory_mb', 'train_images_per_s',
        'train_ms_per_step', 'train_peak_memory_mb')}

    model.eval()
    def infer(inputs: Tensor = x) -> None:
        with torch.no_grad(), autocast():
            model(inputs)
    seconds = _median_seconds(infer, warmup, iters, device)
    out['infer_ms_per_batch'] = seconds * 1e3
    out['infer_images_per_s'] = batch_size / seconds
    with PeakMemory(device) as mem:
        infer()
    out['infer_peak_memory_mb'] = mem.mb
    if latency:
        one = x[:1].clone()
        out['latency_ms'] = _median_seconds(lambda: infer(one), warmup, iters, device) * 1e3

    if train:
        seconds, out['train_peak_memory_mb'] = measure_training_step(model, batch_size, img_size, device, amp,
                                                                     amp_dtype, warmup, iters, in_chans)
        out['train_ms_per_step'] = seconds * 1e3
        out['train_images_per_s'] = batch_size / seconds
    return out


class TrainingStep:
    """The training step of ``mambazoo benchmark --train``, ready to run: one forward on a fixed random batch,
    cross-entropy on random labels, backward and an AdamW step (grads set to None first), torch's fused AdamW on the
    CPU and CUDA as the trainer's default (``optim.fused``), so a step here is a step of ``mambazoo train``. Call it
    to run a step (the first creates AdamW's state); ``close()`` drops the optimizer and leaves the model in eval
    mode. ``measure_training_step`` times one model's; ``benchmarks/cpu_latency.py`` lets two take turns."""

    def __init__(self, model: nn.Module, batch_size: int = 32, img_size: int = 224, device: Any = 'cpu',
                 amp: bool = False, amp_dtype: Optional[str] = None, in_chans: Optional[int] = None):
        self.device = device = torch.device(device)
        self.model = model.to(device)
        if in_chans is None:
            in_chans = getattr(model, 'pretrained_cfg', {}).get('input_size', (3,))[0]
        self._autocast = (lambda: torch.autocast(device.type, dtype=_amp_dtype(device, amp_dtype))) if amp \
            else contextlib.nullcontext
        self.x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
        self.target = torch.randint(0, 2, (batch_size,), device=device)
        model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ('cpu', 'cuda'))
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=amp and _amp_dtype(device, amp_dtype) == torch.float16)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.model(self.x)
        if logits.ndim == 2 and logits.shape[1] > 1:
            loss = nn.functional.cross_entropy(logits.float(), self.target)
        else:
            loss = logits.float().mean()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def close(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer = None
        self.model.eval()


def measure_training_step(
        model: nn.Module,
        batch_size: int = 32,
        img_size: int = 224,
        device: Any = 'cpu',
        amp: bool = False,
        amp_dtype: Optional[str] = None,
        warmup: int = 2,
        iters: int = 5,
        in_chans: Optional[int] = None,
) -> Tuple[float, Optional[float]]:
    """The median seconds of ``iters`` ``TrainingStep`` calls after ``max(warmup, 1)`` untimed ones, and the peak
    memory growth (MiB, ``PeakMemory``) of one more step, above the weights and the optimizer state
    (``benchmark_model``'s training fields come from here). The model is left in eval mode, the optimizer dropped.
    """
    step = TrainingStep(model, batch_size, img_size, device, amp, amp_dtype, in_chans)
    try:
        seconds = _median_seconds(step, max(warmup, 1), iters, step.device)
        with PeakMemory(step.device) as mem:
            step()
    finally:
        step.close()
    return seconds, mem.mb


def saved_storages(model: nn.Module, x: Tensor) -> Dict[int, int]:
    """{storage address: bytes} of the distinct storages that autograd keeps for the backward of ``model(x)`` in
    training mode, the model's own parameters and buffers not counted. The model is left in the mode it was in."""
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: Dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        model.train(was_training)
    return kept


def saved_activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of ``saved_storages``: the activation memory of a training step, whatever the memory allocator makes of
    it (glibc's heap can hold a third more than this at its peak, in freed holes between live blocks)."""
    return sum(saved_storages(model, x).values())


def _error_text(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e).lower():
        return 'out of memory'
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f'{type(e).__name__}: {text}'[:200]


def _flops_and_params(name: str, img_size: int, model_kwargs: Dict[str, Any]) -> Tuple[Optional[float], Optional[float]]:
    """GFLOPs per image and millions of parameters, from a meta-device copy (None, None if that fails)."""
    from .flops import count_flops
    try:
        meta = create_any_model(name, img_size, device='meta', **model_kwargs)
        params = sum(p.numel() for p in meta.parameters()) / 1e6
        in_chans = getattr(meta, 'pretrained_cfg', {}).get('input_size', (3,))[0]
        return count_flops(meta, (in_chans, img_size, img_size)).gflops, params
    except Exception:  # noqa: BLE001 -- a count that fails (an op meta tensors lack) leaves the column empty
        return None, None


def run_benchmark(
        models: Sequence[str],
        baselines: Sequence[str] = (),
        sizes: Sequence[int] = (224,),
        batch_size: int = 32,
        device: Any = 'cpu',
        amp: bool = False,
        amp_dtype: Optional[str] = None,
        train: bool = False,
        latency: bool = True,
        warmup: int = 2,
        iters: int = 5,
        model_kwargs: Optional[Dict[str, Any]] = None,
        flops: bool = True,
        log: Optional[Callable[[str], None]] = None,
) -> List[BenchmarkResult]:
    """Benchmark ``models`` then ``baselines`` (mambazoo or timm names) at each of ``sizes``.

    ``model_kwargs`` go to the mambazoo models only (small configurations); each result's ``ratios`` compare it
    with the first model at the same size (ours / reference).
    """
    if not models:
        raise ValueError('give at least one model')
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ValueError(f'batch size and iters must be >= 1 and warmup >= 0 (got {batch_size}, {iters}, {warmup})')
    unknown = [n for n in list(models) + list(baselines) if not _is_known(n)]
    if unknown:
        raise ValueError(f'unknown model {unknown[0]!r}: neither a mambazoo model (`mambazoo list`) nor a timm model')
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('CUDA requested but torch.cuda.is_available() is False')
    precision = f'amp-{str(_amp_dtype(device, amp_dtype)).split(".")[-1]}' if amp else 'float32'
    results: List[BenchmarkResult] = []
    for size in sizes:
        for name in list(models) + [b for b in baselines if b not in models]:
            kwargs = dict(model_kwargs or {}) if _library(name) == 'mambazoo' else {}
            result = BenchmarkResult(model=name, library=_library(name), img_size=size, batch_size=batch_size,
                                     device=str(device), precision=precision)
            if log:
                log(f'benchmarking {name} at {size}x{size}, batch {batch_size}, {device}, {precision}')
            if flops:
                result.gflops, result.params_m = _flops_and_params(name, size, kwargs)
            model = None
            try:
                torch.manual_seed(0)
                model = create_any_model(name, size, **kwargs)
                if _library(name) == 'mambazoo' and device.type == 'cpu':
                    optimize_for_cpu(model)  # ours as a user runs them on a CPU (timm's as timm gives them)
                result.params_m = sum(p.numel() for p in model.parameters()) / 1e6
                measured = benchmark_model(model, batch_size, size, device, amp, amp_dtype, train, latency,
                                           warmup, iters)
                for key, value in measured.items():
                    setattr(result, key, value)
            except (RuntimeError, ValueError, AssertionError, torch.cuda.OutOfMemoryError) as e:
                result.error = _error_text(e)
            finally:
                del model
                gc.collect()
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
            results.append(result)
    _fill_ratios(results)
    return results


def _fill_ratios(results: List[BenchmarkResult]) -> None:
    reference = {}
    for r in results:
        reference.setdefault(r.img_size, r)
    for r in results:
        ref = reference[r.img_size]
        for key in RATIO_FIELDS:
            ours, theirs = getattr(r, key), getattr(ref, key)
            r.ratios[key] = ours / theirs if ours is not None and theirs else None


def _fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_benchmark_table(results: Sequence[BenchmarkResult]) -> str:
    """A markdown table; 'x ref' columns are ratios to the first model at the same size."""
    if not results:
        return '(no results)'
    head = ['model', 'size', 'params M', 'GFLOPs', 'infer img/s', 'x ref', 'latency ms', 'x ref', 'infer peak MB',
            'x ref']
    train = any(r.train_images_per_s is not None for r in results)
    if train:
        head += ['train img/s', 'x ref', 'train peak MB', 'x ref']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in results:
        row = [r.model, f'{r.img_size}', _fmt(r.params_m, '.2f'), _fmt(r.gflops, '.2f')]
        if r.error:
            row += [f'error: {r.error}'] + [''] * (len(head) - len(row) - 1)
        else:
            row += [_fmt(r.infer_images_per_s, '.1f'), _fmt(r.ratios.get('infer_images_per_s'), '.2f'),
                    _fmt(r.latency_ms, '.1f'), _fmt(r.ratios.get('latency_ms'), '.2f'),
                    _fmt(r.infer_peak_memory_mb, '.1f'), _fmt(r.ratios.get('infer_peak_memory_mb'), '.2f')]
            if train:
                row += [_fmt(r.train_images_per_s, '.1f'), _fmt(r.ratios.get('train_images_per_s'), '.2f'),
                        _fmt(r.train_peak_memory_mb, '.1f'), _fmt(r.ratios.get('train_peak_memory_mb'), '.2f')]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def benchmark_report(results: Sequence[BenchmarkResult], device: Any = 'cpu') -> Dict[str, Any]:
    """The JSON document of ``mambazoo benchmark --json``: the environment, the field list, and the results."""
    import timm
    device = torch.device(device)
    env = {
        'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
        'machine': platform.machine(), 'processor': platform.processor() or platform.machine(),
        'threads': torch.get_num_threads(),
        'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        'memory_method': 'cuda max_memory_allocated growth' if device.type == 'cuda' else 'RSS high-water growth',
        'flops_convention': 'one multiply-add = 1 FLOP (GFLOPs per image)',
        'ratios': 'each result / the first model at the same size',
    }
    return {'environment': env, 'fields': [f.name for f in fields(BenchmarkResult)],
            'results': [asdict(r) for r in results]}
