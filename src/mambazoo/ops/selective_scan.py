"""``selective_scan``: the one entry point every model calls; it picks the implementation.

Backends:
    "chunked"  pure PyTorch, fast on CPU, any device, differentiable (``scan_chunked``); the default. Its
               float32 CPU inference runs a numba-compiled loop (``scan_numba``) when numba is installed.
    "ref"      the sequential definition (``scan_reference``); slow, for tests.
    "parallel" a log-depth associative scan without a loop over time (``scan_parallel``); what "auto" picks
               while a model is exported or traced (ONNX, TorchScript, torch.export).
    "triton"   fused Triton kernels (``scan_triton``), a registered custom op; what "auto" picks for CUDA tensors
               (not float64) when Triton is importable.
The process-wide default can be changed with ``set_scan_backend`` or the MAMBAZOO_SCAN environment variable.
"""
import os
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .scan_chunked import selective_scan_chunked
from .scan_parallel import selective_scan_parallel
from .scan_reference import compute_dtype, selective_scan_ref
from .scan_triton import selective_scan_triton, triton_available

__all__ = ['selective_scan', 'set_scan_backend', 'get_scan_backend', 'resolve_scan_backend', 'SCAN_BACKENDS']

SCAN_BACKENDS: Dict[str, Callable] = {
    'chunked': selective_scan_chunked,
    'ref': selective_scan_ref,
    'parallel': selective_scan_parallel,
    'triton': selective_scan_triton,
}

_backend: str = os.environ.get('MAMBAZOO_SCAN', 'auto')


def set_scan_backend(name: str) -> None:
    """Use ``name`` ('auto' or one of SCAN_BACKENDS) for every later ``selective_scan`` call."""
    global _backend
    if name != 'auto' and name not in SCAN_BACKENDS:
        raise ValueError(f'unknown scan backend {name!r}; choose from auto, {", ".join(SCAN_BACKENDS)}')
    _backend = name


def get_scan_backend() -> str:
    return _backend


def resolve_scan_backend(u: Tensor, backend: Optional[str] = None, others: Sequence[Optional[Tensor]] = ()) -> str:
    """The backend name a ``selective_scan`` call on ``u`` (and the ``others`` inputs) with this ``backend``
    argument would use."""
    name = backend or _backend
    if name == 'auto':
        # A traced Python loop over time would unroll into O(L) graph nodes: export the loop-free scan.
        exporting = (torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()
                     or torch.compiler.is_exporting())
        if exporting:
            name = 'parallel'
        elif u.is_cuda and compute_dtype(u, *others) != torch.float64 and triton_available():
            name = 'triton'
        else:
            name = 'chunked'
    if name not in SCAN_BACKENDS:
        raise ValueError(f'unknown scan backend {name!r}; choose from auto, {", ".join(SCAN_BACKENDS)}')
    return name


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
        *,
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
        backend: override the process-wide backend for this call.
    Returns:
        (batch, dim, L) in u's dtype (accumulated in float32, or float64 for float64 inputs), and the last
        state in the compute dtype when ``return_last_state``.
    """
    fn = SCAN_BACKENDS[resolve_scan_backend(u, backend, (delta, A, B, C, D, z, delta_bias))]
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state)
