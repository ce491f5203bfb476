"""A loop-free selective scan: a log-depth (Hillis-Steele) associative scan over time, for export.

The recurrence h_t = a_t * h_{t-1} + b_t (a_t = exp(delta_t * A), b_t = delta_t * B_t * u_t) composes pairs
associatively: applying (a1, b1) then (a2, b2) is (a1 * a2, a2 * b1 + b2). After round k of the scan, position t
holds the composition of the 2^k steps ending at t; ceil(log2 L) rounds of shift (slice + pad) / multiply / add
give every h_t. Traced (ONNX, TorchScript), the graph has O(log L) nodes instead of the O(L) that a Python loop
over time unrolls into, and needs no loop or custom operator in the runtime. (Shifting by padding, rather than
updating the tail and concatenating the untouched head, gives ONNX graphs about a third smaller, which the
exporter's optimiser processes about twice as fast.)

Why it is not the default: it materialises (batch, dim, L, N) tensors and does O(L log L) work, which is slower
on a CPU than the cache-resident chunked scan (``scan_chunked``). It is what ``selective_scan`` uses while a model
is being exported or traced.

Numerics: only products of decays a_t in (0, 1] (exp of non-positive numbers, for the usual negative A and positive
delta) and sums of bounded terms; no division and no exp of a cumulative sum, so large delta * |A| underflows to 0
instead of overflowing.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan_reference import prepare_scan_inputs, skip_and_gate

__all__ = ['selective_scan_parallel']


def _per_channel_steps(M: Tensor, dim: int) -> Tensor:
    """B or C as (batch or 1, dim or 1, L or 1, N), broadcastable against (batch, dim, L, N)."""
    if M.dim() == 2:  # (dim, N): the same for every batch and step
        return M[None, :, None, :]
    if M.dim() == 3:  # (batch, N, L): shared by all channels
        return M.transpose(1, 2)[:, None]
    # (batch, G, N, L): channel d uses group d // (dim / G). expand + reshape rather than repeat_interleave,
    # which some ONNX opsets lower to a loop.
    batch, groups, n_state, length = M.shape
    per_channel = M[:, :, None].expand(batch, groups, dim // groups, n_state, length).reshape(
        batch, dim, n_state, length)
    return per_channel.transpose(2, 3)


def _associative_scan(decay: Tensor, drive: Tensor) -> Tensor:
    """All states h_t of h_t = decay_t * h_{t-1} + drive_t (h_{-1} = 0), along dim -2, in ceil(log2 L) rounds.

    Hillis-Steele: in the round with offset s, every t composes its segment with the one ending at t - s; for
    t < s that one is the identity (decay 1, drive 0), which the padding supplies, so a round is one shift (slice
    + pad) and one multiply-add per tensor.
    """
    length = drive.shape[-2]
    offset = 1
    while offset < length:
        # (decay, drive)_t of the segment ending at t - s, then the one ending at t: drive_t += decay_t * drive_{t-s}
        drive = torch.addcmul(drive, decay, F.pad(drive[..., :length - offset, :], (0, 0, offset, 0)))
        if 2 * offset < length:  # the last round needs no decay products
            decay = decay * F.pad(decay[..., :length - offset, :], (0, 0, offset, 0), value=1.0)
        offset *= 2
    return drive


def selective_scan_parallel(
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
    """Selective scan with the semantics of ``selective_scan_ref``, as log2(L) rounds of tensor ops (no loop over L).

    Differentiable by plain autograd. Memory: a few (batch, dim, L, N) tensors in the compute dtype.

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

    decay = torch.exp(delta[..., None] * A[:, None, :])  # (batch, dim, L, N)
    drive = (delta * u)[..., None] * _per_channel_steps(B.to(ct), dim)
    states = _associative_scan(decay, drive)
    y = (states * _per_channel_steps(C.to(ct), dim)).sum(-1)
    y = skip_and_gate(y, u, D, z, ct).to(dtype_in)
    return (y, states[:, :, -1]) if return_last_state else y
