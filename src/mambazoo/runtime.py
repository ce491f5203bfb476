"""Opt-in CPU inference speed: process settings (``tune_cpu_allocator``) and a model's GEMM route
(``optimize_for_cpu``).

``tune_cpu_allocator``: opt-in, because it changes the whole process.

glibc's malloc serves large blocks (above a threshold that adapts up to 32 MB) with fresh mmap'd pages and
trims the top of the heap when more than twice that threshold is free. A network's activations are exactly
such blocks, allocated and freed in turn, so each op's output is paid again in page faults: measured on a
2-core VM, 20-25% of Vim-T's and VMamba-T's CPU latency (a freshly mapped 600 kB output costs more than the
elementwise op that fills it). Keeping freed memory in the heap removes that; the price is that the
process's resident memory stays at its peak. timm models in the same process profit too, so comparisons
stay fair. (jemalloc or tcmalloc through LD_PRELOAD do the same from outside the process.)
"""
import ctypes
import ctypes.util
import functools
import logging
import sys

from torch import Tensor, nn

from .ops.linear import linear

__all__ = ['tune_cpu_allocator', 'optimize_for_cpu']

_LOG = logging.getLogger(__name__)
# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30,
                       top_pad: int = 64 << 20) -> bool:
    """Keep freed large blocks in glibc's heap (no mmap below ``mmap_threshold``, no trimming below
    ``trim_threshold``). Returns True when applied; False where the C library is not glibc (nothing changes).
    Idempotent. The command-line tools call it; library users on CPU may call it once at start-up.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))
    if not ok:
        _LOG.warning('mallopt refused the allocator settings; CPU speed unchanged')
    _tuned = ok
    return ok


def _routed_linear_forward(module: nn.Linear, x: Tensor) -> Tensor:
    return linear(x, module.weight, module.bias)


def optimize_for_cpu(model: nn.Module, enable: bool = True) -> nn.Module:
    """Route the forward of every ``nn.Linear`` in ``model`` through ``ops.linear`` (the machine's faster GEMM
    for float32 CPU inference: oneDNN's where it wins, measured once; PyTorch's default otherwise and for
    training, other dtypes and devices). In place; returns ``model``; ``enable=False`` undoes it.

    Module types, parameters, state_dict keys and hooks are unchanged (each layer gets an instance-level forward),
    so quantization and timm's tools still see ``nn.Linear``. It is for eager inference: script, trace or export
    the model without it (TorchScript compiles the class's forward). The command-line tools apply it for CPU
    inference; the outputs agree with the plain model's to float32 rounding.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            if enable:
                module.forward = functools.partial(_routed_linear_forward, module)
            else:
                module.__dict__.pop('forward', None)
    return model
