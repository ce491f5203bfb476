"""A fast selective scan in pure PyTorch: chunked, cache-resident, with a hand-written backward.

Why this design (measured on a 2-core CPU; see benchmarks/RESULTS.md): the cost of the reference is not
arithmetic but memory: it materialises two (batch, dim, L, N) float32 tensors and walks them with three small
ops per step. Tree scans (Blelloch, Hillis-Steele) and log-space cumulative sums need several full passes
over such tensors, which is slower still on a CPU. What is fast is to keep everything in cache:

* time is cut into chunks of a few steps (``auto_chunk_size``: about 128k state elements, half a MB); per
  chunk, exp(delta*A) and delta*B*u are written into two reusable (chunk, batch, dim, N) buffers;
* the recurrence h_t = a_t * h_{t-1} + b_t runs in place in the second buffer, one ``addcmul_`` per step on
  a (batch, dim, N) state, through per-step views made once;
* the chunk's output is a product with C and a sum over N (faster than a batched matmul with inner size N);
* without autograd, the whole call (delta_bias, softplus, D, z too) runs block by block of time steps on
  reused buffers (``_scan_inference``): every elementwise pass then reads cache, not memory (for float32
  inference on a CPU, ``ops.policy`` picks ``scan_numba``'s compiled loop instead: the per-step ops' dispatch
  was most of a small model's scan time);
* with autograd, only the state at each chunk boundary is kept; the backward recomputes a chunk's states and
  runs the adjoint recurrence G_t = C_t*dy_t + a_{t+1}*G_{t+1} backwards the same way.

Transcendentals are what remains: the decays use exp2 (about three times faster than exp on CPUs) and the
softplus is built from exp2 and log with a correction that keeps log1p's accuracy (torch's log1p and
softplus are not vectorised there).

No (batch, dim, L, N) tensor is ever allocated (except the gradient of a fixed, per-channel B or C,
which has that shape before autograd sums it). Products of decays in [0, 1] can underflow to zero
but never overflow, so any delta*|A| is safe (no exp of a cumulative sum).

Tensors in "time-major" layout are (L, batch, ...): one time step is then a contiguous slab. Callers that
already hold time-major data (the Mamba mixer, VMamba's SS2D) pass (batch, dim, L) views of it: no transpose is
made, and the output comes back time-major too.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .policy import compute_dtype
from .scan_reference import check_scan_args

__all__ = ['selective_scan_chunked', 'auto_chunk_size', 'softplus']

LOG2_E = math.log2(math.e)


SOFTPLUS_THRESHOLD = 20.0  # mamba_ssm's kernels and F.softplus: softplus(x) = x above it


def _softplus_into(x: Tensor, out: Tensor, e: Tensor, w: Tensor) -> Tensor:
    """out = softplus(x) = max(x, 0) + log1p(exp(-|x|)), from exp2 and log (vectorised on CPUs, unlike
    log1p); ``e`` and ``w`` are scratch of x's shape (preallocated: fresh large temporaries cost page faults).

    log1p(e) for e in (0, 1]: w = fl(1 + e) is off by r = (w - 1) - e (exactly representable), and
    log(1 + e) = log(w - r) = log(w) - r / w up to (r / w)^2 < 1e-15; where 1 + e rounds to 1 this gives e.
    Above the threshold softplus is x itself: in float32 x + log1p(exp(-x)) rounds to x there anyway (exp(-20)
    is below half an ulp of 20), so only float64 needs the mask (torch.where is slow on CPUs; avoided).
    """
    torch.abs(x, out=e).mul_(-LOG2_E)
    if x.dtype == torch.float64:
        e.masked_fill_(x > SOFTPLUS_THRESHOLD, -math.inf)
    e.exp2_()
    torch.add(e, 1, out=w)
    rounding = torch.sub(w, 1, out=out).sub_(e).div_(w)
    log1p_e = w.log_().sub_(rounding)
    return torch.clamp(x, min=0, out=out).add_(log1p_e)


def _softplus_values(x: Tensor) -> Tensor:
    return _softplus_into(x, torch.empty_like(x), torch.empty_like(x), torch.empty_like(x))


class _Softplus(torch.autograd.Function):
    """F.softplus (beta 1, threshold 20) about four times faster on a CPU; the same values to a few ulps."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _softplus_values(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return torch.where(x > SOFTPLUS_THRESHOLD, grad, grad * torch.sigmoid(x))


def softplus(x: Tensor) -> Tensor:
    return _Softplus.apply(x)


def _time_major_bc(M: Tensor, batch: int, dim: int, length: int) -> Tensor:
    """B or C as a (L, batch, G, N) view: G groups of dim // G channels (G = dim for a fixed (dim, N) matrix)."""
    if M.dim() == 2:  # (dim, N), the same at every step: a stride-0 view, never copied
        return M[None, None].expand(length, batch, dim, M.shape[1])
    # Per-step B, C are small (batch*G*N*L): a contiguous copy makes every chunk's slice a dense block.
    if M.dim() == 3:  # (batch, N, L): one group
        return M.permute(2, 0, 1).contiguous().unsqueeze(2)
    return M.permute(3, 0, 1, 2).contiguous()  # (batch, G, N, L)


def _time_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(batch, dim, L) -> contiguous (L, batch, dim) in ``dtype``: one time step is one dense slab. A view when
    x already is that (the Mamba mixer's and VMamba's inputs), else one copy.

    (An elementwise op on a permuted view keeps the view's memory order, so the layout must be asked for.)
    """
    return x.permute(2, 0, 1).to(dtype, memory_format=torch.contiguous_format)


class _ChunkBuffers:
    """The two reusable (chunk, batch, dim, N) buffers and their per-step views.

    The views are made once: indexing a tensor in the step loop costs as much as the step's arithmetic.
    """

    def __init__(self, like: Tensor, chunk: int, batch: int, dim: int, N: int):
        self.a = like.new_empty(chunk, batch, dim, N)  # decays exp(delta*A)
        self.h = like.new_empty(chunk, batch, dim, N)  # inputs delta*u*B, then states, in place
        self.prod = like.new_empty(chunk, batch, dim, N)  # h_t * C_t before the sum over N
        self.a_steps = self.a.unbind(0)
        self.h_steps = self.h.unbind(0)


def _chunk_states(buf: _ChunkBuffers, d_tm: Tensor, du_tm: Tensor, A_log2e: Tensor, B_tm: Tensor,
                  h0: Tensor, s: int, e: int) -> None:
    """Fill buf.a[:n] = exp(delta*A) and buf.h[:n] = the states h_s..h_{e-1} of one chunk, starting from h0.

    ``A_log2e`` is A * log2(e): exp2 is about three times faster than exp on a CPU, and the decays are the
    largest transcendental workload of the scan (batch*dim*L*N of them).
    """
    n, batch, dim, N = e - s, h0.shape[0], h0.shape[1], h0.shape[2]
    g = B_tm.shape[2]
    a, hs = buf.a[:n], buf.h[:n]
    torch.mul(d_tm[s:e, :, :, None], A_log2e, out=a)
    a.exp2_()
    torch.mul(du_tm[s:e].view(n, batch, g, dim // g, 1), B_tm[s:e].unsqueeze(3),
              out=hs.view(n, batch, g, dim // g, N))
    a_steps, h_steps = buf.a_steps, buf.h_steps
    prev = h0
    for t in range(n):
        h_t = h_steps[t]
        h_t.addcmul_(a_steps[t], prev)
        prev = h_t


def _contract_c(hs: Tensor, C_chunk: Tensor, out: Tensor, prod: Optional[Tensor] = None) -> None:
    """out_t[d] = sum_n h_t[d, n] * C_t[group(d), n] for a chunk: (n, batch, dim, N) x (n, batch, G, N) -> (n, batch, dim).

    A product and a sum beat a batched matmul here: the inner size N is too small for BLAS to pay off.
    """
    n, batch, dim, N = hs.shape
    g = C_chunk.shape[2]
    shape = (n, batch, g, dim // g, N)
    if prod is None:
        prod = torch.mul(hs.view(shape), C_chunk.unsqueeze(3))
    else:
        prod = torch.mul(hs.view(shape), C_chunk.unsqueeze(3), out=prod[:n].view(shape))
    torch.sum(prod, dim=-1, out=out.view(n, batch, g, dim // g))


def _scan_forward(u_tm: Tensor, d_tm: Tensor, A: Tensor, B_tm: Tensor, C_tm: Tensor,
                  chunk_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The scan on time-major (L, batch, dim) inputs, for autograd: returns y (L, batch, dim), the last state and
    the state at each chunk start (what the backward recomputes from)."""
    length, batch, dim = u_tm.shape
    N = A.shape[1]
    T = min(chunk_size, length)
    du_tm = d_tm * u_tm
    A_log2e = A * LOG2_E
    buf = _ChunkBuffers(u_tm, T, batch, dim, N)
    y_tm = u_tm.new_empty(length, batch, dim)
    starts = list(range(0, length, T))
    chunk_states = u_tm.new_empty(len(starts), batch, dim, N)
    h = u_tm.new_zeros(batch, dim, N)
    for c, s in enumerate(starts):
        e = min(s + T, length)
        chunk_states[c] = h
        _chunk_states(buf, d_tm, du_tm, A_log2e, B_tm, h, s, e)
        _contract_c(buf.h[:e - s], C_tm[s:e], y_tm[s:e], buf.prod)
        h = buf.h[e - s - 1].clone()
    return y_tm, h, chunk_states


def _scan_inference(u: Tensor, delta: Tensor, A: Tensor, B_tm: Tensor, C_tm: Tensor, D: Optional[Tensor],
                    z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, chunk_size: int,
                    ct: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The whole scan (bias, softplus, D, z included) without autograd, block by block.

    Every (batch, dim, L) operand is read and written one block of time steps at a time, so that the
    elementwise work (a dozen passes: softplus alone is eight) runs on cache-resident data: done on whole
    tensors, each pass streams them from memory and the scan becomes memory-bound (measured: 2 ns per element
    and pass for a VMamba stage-1 scan, against 0.25 ns in cache). Returns y (batch, dim, L), stored time-major
    when u is.
    """
    batch, dim, length = u.shape
    N = A.shape[1]
    T = min(chunk_size, length)
    # A block of time steps for the elementwise work: about 64k elements, a whole number of chunks.
    P = min(length, max(T, (65536 // max(1, batch * dim)) // T * T))
    A_log2e = A * LOG2_E
    bias = delta_bias.to(ct) if delta_bias is not None else None
    D = D.to(ct) if D is not None else None
    u_tm, delta_tm = u.permute(2, 0, 1), delta.permute(2, 0, 1)
    z_tm = z.permute(2, 0, 1) if z is not None else None
    # The output in the input's layout: time-major callers (the Mamba mixer, VMamba's SS2D) get a time-major y.
    if _inference_output_layout(u):
        y_tm = torch.empty(length, batch, dim, dtype=ct, device=u.device)
        y = y_tm.permute(1, 2, 0)
    else:
        y = torch.empty(batch, dim, length, dtype=ct, device=u.device)
        y_tm = y.permute(2, 0, 1)
    buf = _ChunkBuffers(y, T, batch, dim, N)
    # Block buffers, reused: fresh temporaries of this size would each cost page faults.
    raw_blk, d_blk, e_blk, w_blk, u_blk, du_blk, y_blk = (y.new_empty(P, batch, dim) for _ in range(7))
    h = y.new_zeros(batch, dim, N)
    for ps in range(0, length, P):
        pe = min(ps + P, length)
        m = pe - ps
        d = d_blk[:m]
        d.copy_(delta_tm[ps:pe])
        if bias is not None:
            d.add_(bias)
        if delta_softplus:
            raw = raw_blk[:m]
            raw.copy_(d)
            _softplus_into(raw, d, e_blk[:m], w_blk[:m])
        uc = u_blk[:m]
        uc.copy_(u_tm[ps:pe])
        du = torch.mul(d, uc, out=du_blk[:m])
        yb = y_blk[:m]
        B_blk, C_blk = B_tm[ps:pe], C_tm[ps:pe]
        for s in range(0, m, T):
            e = min(s + T, m)
            _chunk_states(buf, d, du, A_log2e, B_blk, h, s, e)
            _contract_c(buf.h[:e - s], C_blk[s:e], yb[s:e], buf.prod)
            h.copy_(buf.h[e - s - 1])  # the next chunk overwrites the buffers before it reads its start state
        if D is not None:
            yb.addcmul_(uc, D)
        if z_tm is not None:
            gate = e_blk[:m]
            gate.copy_(z_tm[ps:pe])
            yb.mul_(F.silu(gate, inplace=True))
        y_tm[ps:pe] = yb
    return y, h


def _inference_output_layout(u: Tensor) -> bool:
    """Whether ``_scan_inference`` returns y time-major (it does when u is)."""
    return u.permute(2, 0, 1).is_contiguous()


@torch.library.custom_op('mambazoo::selective_scan_chunked_inference', mutates_args=())
def _scan_inference_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                       chunk_size: int) -> Tuple[Tensor, Tensor]:
    """``_scan_inference`` as a custom op, for ``torch.compile``: y in the compute dtype and the last state."""
    batch, dim, length = u.shape
    B_tm = _time_major_bc(B, batch, dim, length)
    C_tm = _time_major_bc(C, batch, dim, length)
    return _scan_inference(u, delta, A, B_tm, C_tm, D, z, delta_bias, delta_softplus, chunk_size, A.dtype)


@_scan_inference_op.register_fake
def _scan_inference_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
    batch, dim, length = u.shape
    if _inference_output_layout(u):
        y = u.new_empty(length, batch, dim, dtype=A.dtype).permute(1, 2, 0)
    else:
        y = u.new_empty(batch, dim, length, dtype=A.dtype)
    return y, u.new_empty(batch, dim, A.shape[1], dtype=A.dtype)


def auto_chunk_size(batch: int, dim: int, d_state: int) -> int:
    """Time steps per chunk: a power of two putting about 128k state elements in a chunk buffer (half a MB in
    float32, resident in a core's L2 cache), between 4 and 256 steps."""
    steps = max(1, 131072 // max(1, batch * dim * d_state))  # an empty batch: any size (nothing is scanned)
    return int(min(256, max(4, 2 ** round(math.log2(steps)))))


class _ChunkedScanFn(torch.autograd.Function):
    """y = scan(u, delta, A, B, C) on time-major u, delta (L, batch, dim), without the D and z parts (plain
    autograd handles those, and the bias and softplus before it)."""

    @staticmethod
    def forward(ctx, u_tm, d_tm, A, B_tm, C_tm, chunk_size):
        with torch.autocast(device_type=u_tm.device.type, enabled=False):
            y_tm, last, chunk_states = _scan_forward(u_tm, d_tm, A, B_tm, C_tm, chunk_size)
        ctx.save_for_backward(u_tm, d_tm, A, B_tm, C_tm, chunk_states)
        ctx.chunk_size = chunk_size
        return y_tm, last

    @staticmethod
    def backward(ctx, gy_tm, g_last):
        u_tm, d_tm, A, B_tm, C_tm, chunk_states = ctx.saved_tensors
        with torch.autocast(device_type=u_tm.device.type, enabled=False):
            return _scan_backward(u_tm, d_tm, A, B_tm, C_tm, chunk_states, ctx.chunk_size, gy_tm, g_last) + (None,)


def _scan_backward(u_tm, d_tm, A, B_tm, C_tm, chunk_states, chunk_size, gy_tm, g_last):
    length, batch, dim = u_tm.shape
    N = A.shape[1]
    T = min(chunk_size, length)
    gb, gc = B_tm.shape[2], C_tm.shape[2]
    hb, hc = dim // gb, dim // gc
    du_tm = d_tm * u_tm
    A_log2e = A * LOG2_E
    gy_tm = (gy_tm if gy_tm is not None else torch.zeros_like(u_tm)).to(u_tm.dtype).contiguous()

    buf = _ChunkBuffers(u_tm, T, batch, dim, N)
    G = u_tm.new_empty(T, batch, dim, N)  # G_t = dLoss/dh_t
    G_steps = G.unbind(0)
    g_d_tm = u_tm.new_empty(length, batch, dim)  # gradient w.r.t. delta through exp(delta*A)
    g_du_tm = u_tm.new_empty(length, batch, dim)  # gradient w.r.t. delta*u
    gA = torch.zeros_like(A)
    gB_tm = u_tm.new_empty(B_tm.shape)
    gC_tm = u_tm.new_empty(C_tm.shape)
    carry = g_last.to(u_tm.dtype) if g_last is not None else u_tm.new_zeros(batch, dim, N)

    starts = list(range(0, length, T))
    for c in reversed(range(len(starts))):
        s = starts[c]
        e = min(s + T, length)
        n = e - s
        h0 = chunk_states[c]
        _chunk_states(buf, d_tm, du_tm, A_log2e, B_tm, h0, s, e)
        an, hn, Gn = buf.a[:n], buf.h[:n], G[:n]
        a_steps = buf.a_steps
        # Adjoint recurrence, backwards in time: G_t = C_t*dy_t + a_{t+1}*G_{t+1}.
        torch.mul(gy_tm[s:e].view(n, batch, gc, hc, 1), C_tm[s:e].unsqueeze(3), out=Gn.view(n, batch, gc, hc, N))
        G_steps[n - 1].add_(carry)
        for t in range(n - 2, -1, -1):
            G_steps[t].addcmul_(a_steps[t + 1], G_steps[t + 1])
        carry = an[0] * Gn[0]
        # dC_t[g, n] = sum over the group's channels of dy_t * h_t
        gC_tm[s:e] = torch.matmul(gy_tm[s:e].view(n, batch, gc, 1, hc), hn.view(n, batch, gc, hc, N)).squeeze(3)
        # d(b_t) = G_t with b_t = (delta*u)_t * B_t
        _contract_c(Gn, B_tm[s:e], g_du_tm[s:e])
        gB_tm[s:e] = torch.matmul(du_tm[s:e].view(n, batch, gb, 1, hb), Gn.view(n, batch, gb, hb, N)).squeeze(3)
        # d(delta_t * A) = G_t * h_{t-1} * a_t, computed in place in the decay buffer (no longer needed)
        X = an.mul_(Gn)
        X[1:].mul_(hn[:-1])
        X[0].mul_(h0)
        torch.sum(X * A, dim=-1, out=g_d_tm[s:e])
        gA += torch.einsum('kdn,kd->dn', X.view(n * batch, dim, N), d_tm[s:e].reshape(n * batch, dim))

    g_d_tm += g_du_tm * u_tm
    g_u_tm = g_du_tm.mul_(d_tm)
    return g_u_tm, g_d_tm, gA, gB_tm, gC_tm


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
        chunk_size: Optional[int] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Selective scan with the semantics of ``selective_scan_ref``; differentiable in every input.

    Args:
        u, delta, z: (batch, dim, L).
        A: (dim, N), real.
        B, C: (dim, N), (batch, N, L) or (batch, G, N, L).
        D, delta_bias: (dim,).
        chunk_size: time steps per cache-resident chunk (speed only; results do not depend on it); None picks
            one from the sizes (``auto_chunk_size``).
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    if chunk_size is None:
        chunk_size = auto_chunk_size(batch, dim, A.shape[1])
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    with torch.autocast(device_type=u.device.type, enabled=False):
        A = A.to(ct)
        B_tm = _time_major_bc(B.to(ct), batch, dim, length)
        C_tm = _time_major_bc(C.to(ct), batch, dim, length)
        if not needs_grad:
            if torch.compiler.is_compiling():  # one opaque node instead of the step loop unrolled into the graph
                y, last = _scan_inference_op(u, delta, A, B.to(ct), C.to(ct), D, z, delta_bias, delta_softplus,
                                             chunk_size)
            else:
                y, last = _scan_inference(u, delta, A, B_tm, C_tm, D, z, delta_bias, delta_softplus, chunk_size, ct)
            y = y.to(dtype_in)
            return (y, last) if return_last_state else y
        # Everything runs time-major (L, batch, dim).
        u_tm = _time_major(u, ct)
        d_tm = _time_major(delta, ct)
        if delta_bias is not None:
            d_tm = d_tm + delta_bias.to(ct)
        if delta_softplus:
            d_tm = softplus(d_tm)
        y_tm, last = _ChunkedScanFn.apply(u_tm, d_tm, A, B_tm, C_tm, chunk_size)
        if D is not None:
            y_tm = y_tm + u_tm * D.to(ct)
        if z is not None:
            y_tm = y_tm * F.silu(_time_major(z, ct))
    y = y_tm.to(dtype_in).permute(1, 2, 0)
    return (y, last) if return_last_state else y
