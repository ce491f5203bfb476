"""The plain selective scan: a step-by-step recurrence, the oracle every fast path is tested against.

Semantics follow mamba_ssm's ``selective_scan_ref`` (state-spaces/mamba,
``mamba_ssm/ops/selective_scan_interface.py``):

    delta = softplus(delta + delta_bias)                      (each part optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t  (h: (batch, dim, N), h_{-1} = 0)
    y_t   = <h_t, C_t> + D * u_t
    out   = y * silu(z)                                       (if z is given)

One difference from mamba_ssm, on purpose: float64 inputs are computed in float64 (mamba_ssm would
downcast to float32), so that gradcheck can run against it. Everything else accumulates in float32.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .policy import compute_dtype

__all__ = ['selective_scan_ref', 'check_scan_args', 'prepare_scan_inputs',
           'skip_and_gate']


def check_scan_args(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor]) -> None:
    """Validate shapes at the boundary, with messages that name the offending argument."""
    if u.dim() != 3:
        raise ValueError(f'u must be (batch, dim, L), got shape {tuple(u.shape)}')
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError('the sequence must have at least one step (u.shape[2] >= 1)')
    if delta.shape != u.shape:
        raise ValueError(f'delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}')
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f'A must be (dim={dim}, N), got {tuple(A.shape)}')
    if A.is_complex():
        raise NotImplementedError('complex A is not supported: vision Mamba models use a real A')
    n_state = A.shape[1]
    for name, M in (('B', B), ('C', C)):
        if M.dim() == 2:
            ok = tuple(M.shape) == (dim, n_state)
        elif M.dim() == 3:
            ok = tuple(M.shape) == (batch, n_state, length)
        elif M.dim() == 4:
            ok = (M.shape[0] == batch and M.shape[2] == n_state and M.shape[3] == length
                  and M.shape[1] > 0 and dim % M.shape[1] == 0)
        else:
            ok = False
        if not ok:
            raise ValueError(
                f'{name} must be (dim, N)=({dim}, {n_state}), (batch, N, L)=({batch}, {n_state}, {length}) '
                f'or (batch, G, N, L) with G dividing dim; got {tuple(M.shape)}')
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f'D must be (dim,)=({dim},), got {tuple(D.shape)}')
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f'delta_bias must be (dim,)=({dim},), got {tuple(delta_bias.shape)}')
    if z is not None and z.shape != u.shape:
        raise ValueError(f'z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}')


def prepare_scan_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, torch.dtype]:
    """Checked u, delta (bias and softplus applied) and A in the compute dtype, and that dtype: the common start
    of the whole-tensor scans."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A, ct


def skip_and_gate(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor], ct: torch.dtype) -> Tensor:
    """y + u * D, then times silu(z): the common end of the whole-tensor scans."""
    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y


def _per_channel(M: Tensor, dim: int) -> Tensor:
    """B or C as (batch or 1, dim, N, L or 1): one row per channel, grouped layouts repeated over their group."""
    if M.dim() == 2:  # (dim, N): the same for every batch and step
        return M[None, :, :, None]
    if M.dim() == 3:  # (batch, N, L): shared by all channels
        return M[:, None]
    return M.repeat_interleave(dim // M.shape[1], dim=1)  # (batch, G, N, L): channel d uses group d // (dim / G)


def selective_scan_ref(
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
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Sequential selective scan (slow; for tests and as the definition).

    Args:
        u, delta, z: (batch, dim, L).
        A: (dim, N), real.
        B, C: (dim, N), (batch, N, L) or (batch, G, N, L).
        D, delta_bias: (dim,).
    Returns:
        out (batch, dim, L) in u's dtype, and the last state (batch, dim, N) in the compute dtype if asked.
    """
    dtype_in = u.dtype
    u, delta, A, ct = prepare_scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dim = u.shape[1]
    B_ch, C_ch = _per_channel(B.to(ct), dim), _per_channel(C.to(ct), dim)

    # As mamba_ssm's reference does: both (batch, dim, L, N) factors up front, then one step per position.
    decay = torch.exp(delta[..., None] * A[:, None, :])
    drive = (delta * u)[..., None] * B_ch.transpose(-1, -2)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append((h * C_ch[..., min(t, C_ch.shape[-1] - 1)]).sum(-1))
    y = skip_and_gate(torch.stack(ys, dim=2), u, D, z, ct).to(dtype_in)
    return (y, h) if return_last_state else y
