"""Linear layers of float32 CPU inference through the machine's faster GEMM: oneDNN's or PyTorch's default.

Why: on a CPU, ``F.linear`` is MKL's sgemm, and MKL runs its AVX2 code on AMD processors whatever they support;
oneDNN (PyTorch's other CPU backend, already used for every convolution) picks its AVX-512 kernels by the ISA.
Measured on a 2-core AMD EPYC (Zen 5) VM at the tiny models' GEMM shapes: 85-110 GMAC/s by ``F.linear``,
200-240 GMAC/s by oneDNN's ``mkldnn::_linear_pointwise``. On an Intel Xeon (AVX-512) MKL runs AVX-512 too and
oneDNN's route was the slower one (Vim-T 61.8 ms against 51.0 ms). So the route is a property of the machine:
the policy's ``cpu_linear`` ('auto' by default) measures both once per process on a tiny model's GEMM shapes and
keeps oneDNN where it takes 5% less time; 'onednn' or 'aten' (or MAMBAZOO_CPU_LINEAR) force one.

``linear`` is ``F.linear`` with that route for float32 CPU inference: no tensor needing a gradient, no tracer
(torch.compile, export, a dispatch mode) watching, not under autocast, on x86 where PyTorch has oneDNN; anywhere
else it is ``F.linear``. The results agree to float32 rounding (another order of the sums). Models call plain
``nn.Linear`` modules; ``mambazoo.optimize_for_cpu(model)`` routes their forward through ``linear`` explicitly.
"""
import functools
import platform
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .policy import fx_leaf_call, get_scan_policy, tracer_active

__all__ = ['linear', 'onednn_linear_applies', 'cpu_linear_route']


@functools.lru_cache(maxsize=None)
def _onednn_linear_op():
    """oneDNN's linear op, or None where PyTorch lacks it or the CPU is not x86 (ARM builds route oneDNN
    through other libraries; not measured there)."""
    if platform.machine().lower() not in ('x86_64', 'amd64') or not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, '_linear_pointwise', None)


def _median_seconds(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# The probe: a tiny model's GEMMs at batch 1 (197 tokens): Vim-T's in_proj, an MLP's fc1 and fc2 at width 384.
_PROBE_SHAPES = ((197, 192, 768), (197, 384, 1536), (197, 1536, 384))


@functools.lru_cache(maxsize=None)
def _measured_route(threads: int) -> str:
    """'onednn' when oneDNN's linear takes at least 5% less time than F.linear over the probe's GEMMs (medians of
    seven each, after a warm-up), else 'aten'. About 20 ms, once per thread count and process."""
    op = _onednn_linear_op()
    if op is None:
        return 'aten'
    generator = torch.Generator().manual_seed(0)
    aten = onednn = 0.0
    with torch.no_grad():
        for rows, k, n in _PROBE_SHAPES:
            x, w, b = (torch.randn(rows, k, generator=generator), torch.randn(n, k, generator=generator),
                       torch.randn(n, generator=generator))
            for _ in range(3):  # warm-up: oneDNN creates its primitive at the first call of a shape
                F.linear(x, w, b)
                op(x, w, b, 'none', [], '')
            aten += _median_seconds(lambda: F.linear(x, w, b))
            onednn += _median_seconds(lambda: op(x, w, b, 'none', [], ''))
    return 'onednn' if onednn * 1.05 < aten else 'aten'


def cpu_linear_route() -> str:
    """The GEMM route of float32 CPU inference on this machine under the current policy: 'onednn' or 'aten'."""
    route = get_scan_policy().cpu_linear
    if route == 'auto':
        route = _measured_route(torch.get_num_threads())
    return 'aten' if _onednn_linear_op() is None else route


def onednn_linear_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``linear(x, weight, bias)`` takes oneDNN (see the module docstring)."""
    # the tracer test first: under torch.compile nothing after it is traced (dynamo refuses torch.backends)
    return (not tracer_active() and x.device.type == 'cpu' and x.dim() >= 2 and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and not torch.is_autocast_enabled('cpu')
            and cpu_linear_route() == 'onednn')


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, by the machine's faster GEMM for float32 inference on an x86 CPU; with
    ``gelu``, ``F.gelu(F.linear(x, weight, bias))`` (the exact, erf GELU), which oneDNN applies as the GEMM writes
    its output (one pass over a 4x wider tensor less, in an MLP)."""
    if not torch.jit.is_scripting():
        traced = fx_leaf_call(linear, (x, weight, bias, gelu), {})
        if traced is not None:
            return traced
        if onednn_linear_applies(x, weight, bias):
            return _onednn_linear_op()(x, weight, bias, 'gelu' if gelu else 'none', [], 'none' if gelu else '')
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y
