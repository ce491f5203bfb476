"""``selective_scan``: the one entry point every model calls for a scan.

Implementations (``ops.policy.choose_implementation`` picks one per call, by device, dtype, grad mode, tracing and
the policy):
    "chunked"  pure PyTorch, fast on CPU, any device, differentiable (``scan_chunked``); the default.
    "compiled" float32 on a CPU by numba-compiled loops (``scan_numba``; under autograd with the compiled backward
               of ``scan_numba_grad``), where "chunked" would run.
    "ref"      the sequential definition (``scan_reference``); slow, for tests.
    "parallel" a log-depth associative scan without a loop over time (``scan_parallel``); what "auto" picks
               while a model is exported or traced (ONNX, torch.jit tracing, torch.export).
    "triton"   fused Triton kernels (``scan_triton``), a registered custom op; what "auto" picks for CUDA tensors
               (not float64) when Triton is importable.
The backend can be forced with ``set_scan_backend``, ``with ops.scan_policy(backend=...)`` or MAMBAZOO_SCAN.
"""
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .policy import SCAN_BACKEND_NAMES, choose_implementation, fx_leaf_call, get_scan_policy, set_scan_policy
from .scan_chunked import selective_scan_chunked
from .scan_numba import scan_kernel_takes, selective_scan_compiled
from .scan_parallel import selective_scan_parallel
from .scan_reference import selective_scan_ref
from .scan_triton import selective_scan_triton

__all__ = ['selective_scan', 'set_scan_backend', 'get_scan_backend', 'resolve_scan_backend', 'SCAN_BACKENDS',
           'implementation_function', 'register_scan_backend']

SCAN_BACKENDS: Dict[str, Callable] = {
    'chunked': selective_scan_chunked,
    'ref': selective_scan_ref,
    'parallel': selective_scan_parallel,
    'triton': selective_scan_triton,
}


def implementation_function(name: str) -> Callable:
    """The scan that runs implementation ``name`` (what ``choose_implementation`` returned)."""
    return selective_scan_compiled if name == 'compiled' else SCAN_BACKENDS[name]


def set_scan_backend(name: str) -> None:
    """Use ``name`` ('auto' or one of SCAN_BACKENDS) for every later op call (the policy's ``backend``)."""
    set_scan_policy(backend=name)


def get_scan_backend() -> str:
    return get_scan_policy().backend


def resolve_scan_backend(u: Tensor, backend: Optional[str] = None, others: Tuple[Optional[Tensor], ...] = ()) -> str:
    """The implementation a ``selective_scan`` call on ``u`` (and the ``others`` inputs) would run."""
    return choose_implementation((u, *others), backend)


def register_scan_backend(name: str, fn: Optional[Callable]) -> None:
    """Add a scan backend (a function with ``selective_scan_ref``'s signature) that the policy may then name, as the
    FLOP counter does; ``fn=None`` removes it."""
    if name in ('auto', 'compiled') or (name in ('chunked', 'ref', 'parallel', 'triton')):
        raise ValueError(f'{name!r} is a built-in backend name')
    if fn is None:
        SCAN_BACKENDS.pop(name, None)
        if name in SCAN_BACKEND_NAMES:
            SCAN_BACKEND_NAMES.remove(name)
        return
    SCAN_BACKENDS[name] = fn
    if name not in SCAN_BACKEND_NAMES:
        SCAN_BACKEND_NAMES.append(name)


@torch.library.custom_op('mambazoo::selective_scan', mutates_args=())
def _selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                       backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    """``selective_scan`` as a registered op (output and last state), what TorchScript calls: a scripted model
    runs the same implementations and saves with a reference to this op, not to Python code."""
    return _dispatch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, backend)


@_selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.promote_types(
        torch.float32, u.dtype))


def _dispatch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend):
    name = choose_implementation((u, delta, A, B, C, D, z, delta_bias), backend, scan_kernel_takes(B, C),
                                 compiled_grad=True)
    return implementation_function(name)(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                         delta_softplus=delta_softplus, return_last_state=return_last_state)


def selective_scan(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor] = None,
        z: Optional[Tensor] = None,
        delta_bias: Optional[Tensor] = None,
        delta_softplus: bool = False,
        return_last_state: bool = False,
        backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The selective scan of Mamba, with the arguments and semantics of mamba_ssm's ``selective_scan_fn``.

    Args:
        u: (batch, dim, L) input.
        delta: (batch, dim, L) step sizes (before ``delta_bias`` and softplus).
        A: (dim, N) real state matrix (diagonal per channel).
        B, C: (dim, N) fixed, (batch, N, L) per step, or (batch, G, N, L) per step and channel group.
        D: (dim,) skip connection.
        z: (batch, dim, L) gate: the output is multiplied by silu(z).
        delta_bias: (dim,) added to delta.
        delta_softplus: apply softplus to delta (after the bias).
        return_last_state: also return the final state (batch, dim, N).
        backend: override the policy's backend for this call.
    Returns:
        (batch, dim, L) in u's dtype (accumulated in float32, or float64 for float64 inputs), and the last
        state in the compute dtype when ``return_last_state``.

    The implementation is chosen by ``ops.policy.choose_implementation``. Under TorchScript this is the registered
    op ``torch.ops.mambazoo.selective_scan``; under FX tracing one leaf node.
    """
    if torch.jit.is_scripting():
        y, last = torch.ops.mambazoo.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend)
        if return_last_state:
            return y, last
        return y
    traced = fx_leaf_call(selective_scan, (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                           backend), {})
    if traced is not None:
        return traced
    return _dispatch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend)
