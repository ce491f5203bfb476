"""A fast selective scan in pure PyTorch: chunked, cache-resident, with a hand-written backward.

Why this design (measured on a 2-core CPU, batch 2, dim 384, L 3136, N 16; see benchmarks/RESULTS.md):
the cost of the reference is not arithmetic but memory: it materialises two (batch, dim, L, N) float32
tensors (150 MB each at that size) and walks them with three small ops per step. Tree scans
(Blelloch, Hillis-Steele) and log-space cumulative sums need several full passes over such tensors,
which is slower still on a CPU. What is fast is to keep everything in cache:

* time is cut into chunks of ``chunk_size`` steps; per chunk, exp(delta*A) and delta*B*u are written
  into two reusable (chunk, batch, dim, N) buffers (a few MB, they stay in cache);
* the recurrence h_t = a_t * h_{t-1} + b_t runs in place in the second buffer, one fused ``addcmul``
  per step on a (batch, dim, N) state;
* the output of the whole chunk is one batched matmul with C;
* only the state at each chunk boundary is kept for the backward pass, which recomputes the chunk's
  states and runs the adjoint recurrence G_t = C_t*dy_t + a_{t+1}*G_{t+1} backwards the same way.

No (batch, dim, L, N) tensor is ever allocated (except the gradient of a fixed, per-channel B or C,
which has that shape before autograd sums it). Products of decays in [0, 1] can underflow to zero
but never overflow, so any delta*|A| is safe (no exp of a cumulative sum).

Tensors in "time-major" layout are (L, batch, ...): one time step is then a contiguous slab.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan_reference import check_scan_args, compute_dtype

__all__ = ['selective_scan_chunked', 'DEFAULT_CHUNK_SIZE']

DEFAULT_CHUNK_SIZE = 64


def _time_major_bc(M: Tensor, batch: int, dim: int, length: int) -> Tensor:
    """B or C as a (L, batch, G, N) view: G groups of dim // G channels (G = dim for a fixed (dim, N) matrix)."""
    if M.dim() == 2:  # (dim, N), the same at every step: a stride-0 view, never copied
        return M[None, None].expand(length, batch, dim, M.shape[1])
    if M.dim() == 3:  # (batch, N, L): one group
        return M.permute(2, 0, 1).unsqueeze(2)
    return M.permute(3, 0, 1, 2)  # (batch, G, N, L)


def _chunk_states(a: Tensor, hs: Tensor, d_tm: Tensor, du_tm: Tensor, A: Tensor, B_tm: Tensor,
                  h0: Tensor, s: int, e: int) -> None:
    """Fill a[:n] = exp(delta*A) and hs[:n] = the states h_s..h_{e-1} of one chunk, starting from h0."""
    n, batch, dim, N = e - s, h0.shape[0], h0.shape[1], h0.shape[2]
    g = B_tm.shape[2]
    a, hs = a[:n], hs[:n]
    torch.mul(d_tm[s:e, :, :, None], A, out=a)
    a.exp_()
    torch.mul(du_tm[s:e].view(n, batch, g, dim // g, 1), B_tm[s:e].unsqueeze(3),
              out=hs.view(n, batch, g, dim // g, N))
    prev = h0
    for t in range(n):
        torch.addcmul(hs[t], a[t], prev, out=hs[t])
        prev = hs[t]


def _contract_c(hs: Tensor, C_chunk: Tensor) -> Tensor:
    """y_t[d] = sum_n h_t[d, n] * C_t[group(d), n] for a chunk: (n, batch, dim, N) x (n, batch, G, N) -> (n, batch, dim)."""
    n, batch, dim, N = hs.shape
    g = C_chunk.shape[2]
    y = torch.matmul(hs.view(n, batch, g, dim // g, N), C_chunk.unsqueeze(-1))
    return y.view(n, batch, dim)


def _scan_forward(u: Tensor, delta: Tensor, A: Tensor, B_tm: Tensor, C_tm: Tensor, chunk_size: int,
                  keep_chunk_states: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    batch, dim, length = u.shape
    N = A.shape[1]
    T = min(chunk_size, length)
    d_tm = delta.permute(2, 0, 1).contiguous()
    du_tm = (delta * u).permute(2, 0, 1).contiguous()
    a = u.new_empty(T, batch, dim, N)
    hs = u.new_empty(T, batch, dim, N)
    y_tm = u.new_empty(length, batch, dim)
    starts = list(range(0, length, T))
    chunk_states = u.new_empty(len(starts), batch, dim, N) if keep_chunk_states else None
    h = u.new_zeros(batch, dim, N)
    for c, s in enumerate(starts):
        e = min(s + T, length)
        if chunk_states is not None:
            chunk_states[c] = h
        _chunk_states(a, hs, d_tm, du_tm, A, B_tm, h, s, e)
        y_tm[s:e] = _contract_c(hs[:e - s], C_tm[s:e])
        h = hs[e - s - 1].clone()
    return y_tm.permute(1, 2, 0), h, chunk_states


class _ChunkedScanFn(torch.autograd.Function):
    """y = scan(u, delta, A, B, C) without the D, z, bias and softplus parts (plain autograd handles those)."""

    @staticmethod
    def forward(ctx, u, delta, A, B_tm, C_tm, chunk_size):
        with torch.autocast(device_type=u.device.type, enabled=False):
            y, last, chunk_states = _scan_forward(u, delta, A, B_tm, C_tm, chunk_size, keep_chunk_states=True)
        ctx.save_for_backward(u, delta, A, B_tm, C_tm, chunk_states)
        ctx.chunk_size = chunk_size
        return y, last

    @staticmethod
    def backward(ctx, gy, g_last):
        u, delta, A, B_tm, C_tm, chunk_states = ctx.saved_tensors
        with torch.autocast(device_type=u.device.type, enabled=False):
            return _scan_backward(u, delta, A, B_tm, C_tm, chunk_states, ctx.chunk_size, gy, g_last) + (None,)


def _scan_backward(u, delta, A, B_tm, C_tm, chunk_states, chunk_size, gy, g_last):
    batch, dim, length = u.shape
    N = A.shape[1]
    T = min(chunk_size, length)
    gb, gc = B_tm.shape[2], C_tm.shape[2]
    d_tm = delta.permute(2, 0, 1).contiguous()
    du_tm = (delta * u).permute(2, 0, 1).contiguous()
    gy_tm = (gy if gy is not None else torch.zeros_like(u)).to(u.dtype).permute(2, 0, 1).contiguous()

    a = u.new_empty(T, batch, dim, N)
    hs = u.new_empty(T, batch, dim, N)
    G = u.new_empty(T, batch, dim, N)  # G_t = dLoss/dh_t
    g_d_tm = u.new_empty(length, batch, dim)  # gradient w.r.t. delta through exp(delta*A)
    g_du_tm = u.new_empty(length, batch, dim)  # gradient w.r.t. delta*u
    gA = torch.zeros_like(A)
    gB_tm = u.new_empty(B_tm.shape)
    gC_tm = u.new_empty(C_tm.shape)
    carry = g_last.to(u.dtype) if g_last is not None else u.new_zeros(batch, dim, N)

    starts = list(range(0, length, T))
    for c in reversed(range(len(starts))):
        s = starts[c]
        e = min(s + T, length)
        n = e - s
        h0 = chunk_states[c]
        _chunk_states(a, hs, d_tm, du_tm, A, B_tm, h0, s, e)
        an, hn, Gn = a[:n], hs[:n], G[:n]
        hc = dim // gc
        # Adjoint recurrence, backwards in time.
        torch.mul(gy_tm[s:e].view(n, batch, gc, hc, 1), C_tm[s:e].unsqueeze(3), out=Gn.view(n, batch, gc, hc, N))
        Gn[n - 1] += carry
        for t in range(n - 2, -1, -1):
            torch.addcmul(Gn[t], an[t + 1], Gn[t + 1], out=Gn[t])
        carry = an[0] * Gn[0]
        # dC_t[g, n] = sum over the group's channels of dy_t * h_t
        gC_tm[s:e] = torch.matmul(gy_tm[s:e].view(n, batch, gc, 1, hc), hn.view(n, batch, gc, hc, N)).squeeze(3)
        # d(b_t) = G_t with b_t = (delta*u)_t * B_t
        hb = dim // gb
        g_du_tm[s:e] = torch.matmul(Gn.view(n, batch, gb, hb, N), B_tm[s:e].unsqueeze(-1)).view(n, batch, dim)
        gB_tm[s:e] = torch.matmul(du_tm[s:e].view(n, batch, gb, 1, hb), Gn.view(n, batch, gb, hb, N)).squeeze(3)
        # d(delta_t * A) = G_t * h_{t-1} * a_t, computed in place in the decay buffer (no longer needed)
        X = an.mul_(Gn)
        X[1:].mul_(hn[:-1])
        X[0].mul_(h0)
        g_d_tm[s:e] = torch.matmul(X.view(n * batch, dim, 1, N), A.unsqueeze(-1)).view(n, batch, dim)
        gA += torch.einsum('kdn,kd->dn', X.view(n * batch, dim, N), d_tm[s:e].reshape(n * batch, dim))

    g_du = g_du_tm.permute(1, 2, 0)
    g_delta = g_d_tm.permute(1, 2, 0) + g_du * u
    g_u = g_du * delta
    return g_u, g_delta, gA, gB_tm, gC_tm


def selective_scan_chunked(
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
        chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Selective scan with the semantics of ``selective_scan_ref``; differentiable in every input.

    Args:
        u, delta, z: (batch, dim, L).
        A: (dim, N), real.
        B, C: (dim, N), (batch, N, L) or (batch, G, N, L).
        D, delta_bias: (dim,).
        chunk_size: time steps per cache-resident chunk (speed only; results do not depend on it).
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_c, delta, A = u.to(ct), delta.to(ct), A.to(ct)
        if delta_bias is not None:
            delta = delta + delta_bias.to(ct)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        B_tm = _time_major_bc(B.to(ct), batch, dim, length)
        C_tm = _time_major_bc(C.to(ct), batch, dim, length)
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (u_c, delta, A, B_tm, C_tm))
        if needs_grad:
            y, last = _ChunkedScanFn.apply(u_c, delta, A, B_tm, C_tm, chunk_size)
        else:
            y, last, _ = _scan_forward(u_c, delta, A, B_tm, C_tm, chunk_size, keep_chunk_states=False)
        if D is not None:
            y = y + u_c * D.to(ct)[:, None]
        if z is not None:
            y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
