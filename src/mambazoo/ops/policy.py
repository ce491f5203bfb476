"""The one place that decides which implementation an op runs, under one policy object.

Every fused op (``selective_scan``, ``cross_selective_scan``, the Mamba mixer's ``mamba_inner_conv`` and
``mamba_inner_scan``) asks ``choose_implementation`` and gets one of:

    'ref'       the sequential definition (``scan_reference``): slow, the test oracle.
    'chunked'   pure PyTorch, differentiable, any device (``scan_chunked``).
    'compiled'  numba-compiled CPU loops (``scan_numba``): float32 on a CPU; in training only for ops whose
                compiled kernels have a backward (the caller says so with ``compiled_grad``).
    'parallel'  the loop-free log-depth scan (``scan_parallel``): what tracers and exporters get.
    'triton'    fused Triton kernels (``scan_triton``): CUDA tensors.

The choice depends on the device, the dtype, whether a gradient is needed, whether a tracer is watching, and the
policy: a ``ScanPolicy`` read from the environment once, at import (``MAMBAZOO_SCAN``, ``MAMBAZOO_NUMBA``,
``MAMBAZOO_SCAN_THREADS``, ``MAMBAZOO_CPU_LINEAR``), and changed in code with ``set_scan_policy`` or, for a block
of code, ``with scan_policy(...)``. Models never ask: they call the ops.
"""
import contextlib
import dataclasses
import os
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ['ScanPolicy', 'get_scan_policy', 'set_scan_policy', 'scan_policy', 'policy_from_environment',
           'choose_implementation', 'tracer_active', 'exporting', 'compute_dtype', 'SCAN_BACKEND_NAMES', 'fx_leaf_call',
           'IMPLEMENTATIONS']

SCAN_BACKEND_NAMES = ['auto', 'chunked', 'ref', 'parallel', 'triton']  # grows by ``register_scan_backend``
IMPLEMENTATIONS = ('ref', 'chunked', 'compiled', 'parallel', 'triton')
CPU_LINEAR_ROUTES = ('auto', 'onednn', 'aten')


@dataclasses.dataclass(frozen=True)
class ScanPolicy:
    """How the ops choose their implementation.

    Attributes:
        backend: 'auto' (by device, dtype, tracing), or one of 'chunked', 'ref', 'parallel', 'triton' for every
            call. 'chunked' still runs the compiled CPU loops for float32 inference unless ``compiled_cpu`` is off.
        compiled_cpu: allow the numba-compiled CPU kernels (float32 inference on a CPU).
        scan_threads: threads of a compiled kernel call (None: PyTorch's, for calls large enough to split).
        cpu_linear: the GEMM of float32 CPU inference in ``ops.linear`` (and of the linear layers of a model
            passed to ``mambazoo.optimize_for_cpu``): 'onednn', 'aten' (PyTorch's default) or 'auto' (the faster
            of the two on this machine, measured once).
    """
    backend: str = 'auto'
    compiled_cpu: bool = True
    scan_threads: Optional[int] = None
    cpu_linear: str = 'auto'

    def __post_init__(self):
        if self.backend not in SCAN_BACKEND_NAMES:
            raise ValueError(f'unknown scan backend {self.backend!r}; choose from {", ".join(SCAN_BACKEND_NAMES)}')
        if self.cpu_linear not in CPU_LINEAR_ROUTES:
            raise ValueError(f'unknown cpu_linear route {self.cpu_linear!r}; choose from {", ".join(CPU_LINEAR_ROUTES)}')
        if self.scan_threads is not None and self.scan_threads < 1:
            raise ValueError(f'scan_threads must be >= 1 or None, got {self.scan_threads}')


def _flag(value: Optional[str]) -> Optional[bool]:
    if value is None or value == '':
        return None
    return value.strip().lower() not in ('0', 'false', 'no', 'off')


def policy_from_environment(environ: Mapping[str, str]) -> ScanPolicy:
    """The policy the environment variables describe (unset ones keep the defaults)."""
    threads = environ.get('MAMBAZOO_SCAN_THREADS')
    linear = environ.get('MAMBAZOO_CPU_LINEAR')
    if linear is None and _flag(environ.get('MAMBAZOO_ONEDNN_LINEAR')) is False:
        linear = 'aten'  # the earlier switch, kept
    compiled = _flag(environ.get('MAMBAZOO_NUMBA'))
    return ScanPolicy(backend=environ.get('MAMBAZOO_SCAN', 'auto') or 'auto',
                      compiled_cpu=True if compiled is None else compiled,
                      scan_threads=int(threads) if threads else None,
                      cpu_linear=linear or 'auto')


_policy: ScanPolicy = policy_from_environment(os.environ)


def get_scan_policy() -> ScanPolicy:
    return _policy


def set_scan_policy(policy: Optional[ScanPolicy] = None, **changes) -> ScanPolicy:
    """Replace the process-wide policy (or change some of its fields); returns the previous one."""
    global _policy
    previous = _policy
    _policy = dataclasses.replace(policy if policy is not None else _policy, **changes)
    return previous


@contextlib.contextmanager
def scan_policy(policy: Optional[ScanPolicy] = None, **changes) -> Iterator[ScanPolicy]:
    """``with scan_policy(backend='ref'): ...`` runs the block under a changed policy, restored after."""
    previous = set_scan_policy(policy, **changes)
    try:
        yield _policy
    finally:
        set_scan_policy(previous)


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (half and bfloat16 inputs accumulate in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def exporting() -> bool:
    """Whether an exporter or tracer records the ops (ONNX, torch.jit tracing, torch.export): a Python loop over
    time would unroll into O(L) graph nodes, so they get the loop-free scan."""
    return (torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting())


def tracer_active() -> bool:
    """Whether torch.compile, torch.export, torch.jit tracing, the ONNX exporter or a Python dispatch mode (a
    FLOP counter, say) is watching: they cannot see inside an op that leaves PyTorch (a numba loop) or do not
    know one by its internal name (oneDNN's linear), so the fast CPU inference paths step aside for plain ops."""
    return (torch.compiler.is_compiling() or exporting() or _get_current_dispatch_mode() is not None)


def _triton_available() -> bool:
    from .scan_triton import triton_available
    return triton_available()


def _compiled_applies(tensors: Sequence[Optional[Tensor]], compiled_grad: bool) -> bool:
    from .scan_numba import numba_importable
    present = [t for t in tensors if t is not None]
    return (_policy.compiled_cpu and numba_importable() and all(t.device.type == 'cpu' for t in present)
            and compute_dtype(*present) == torch.float32
            and (compiled_grad or not (torch.is_grad_enabled() and any(t.requires_grad for t in present)))
            and not tracer_active())


def fx_leaf_call(fn: Callable, args: tuple, kwargs: dict):
    """If an FX tracer is recording (some argument is a Proxy), record ``fn`` as one call_function node (a leaf: its
    Python control flow is not traced) and return the node's Proxy; else None. Every op starts with it, so
    ``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor`` and timm's FX features trace models
    without wrapping anything."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            value = next((v for v in value if isinstance(v, torch.fx.Proxy)), None)
        if isinstance(value, torch.fx.Proxy):
            return value.tracer.create_proxy('call_function', fn, args, kwargs)
    return None


def choose_implementation(tensors: Sequence[Optional[Tensor]], backend: Optional[str] = None,
                          compiled_layout: bool = True, compiled_grad: bool = False) -> str:
    """The implementation (one of IMPLEMENTATIONS) an op runs on ``tensors``.

    Args:
        tensors: the op's tensor inputs (None for absent optional ones).
        backend: the caller's override of the policy's backend for this call (None: the policy's).
        compiled_layout: whether the op's compiled kernel takes these inputs' layout (each op knows its kernel).
        compiled_grad: whether the op's compiled implementation has a backward (then it runs under autograd too).
    """
    name = backend or _policy.backend
    if name not in SCAN_BACKEND_NAMES:
        raise ValueError(f'unknown scan backend {name!r}; choose from {", ".join(SCAN_BACKEND_NAMES)}')
    if name == 'auto':
        present = [t for t in tensors if t is not None]
        if exporting():
            name = 'parallel'
        elif present[0].is_cuda and compute_dtype(*present) != torch.float64 and _triton_available():
            name = 'triton'
        else:
            name = 'chunked'
    if name == 'chunked' and compiled_layout and _compiled_applies(tensors, compiled_grad):
        return 'compiled'
    return name
