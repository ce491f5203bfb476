"""Selective-scan inference on CPU as one compiled loop (numba), and the Mamba mixer's conv1d + SiLU before it.

Why: the pure-PyTorch chunked scan spends most of a small model's scan in per-op overhead: its recurrence is one
``addcmul_`` per time step (a Vim-T forward makes 9,456 of them at batch 1, VMamba-T about 9,600 on N=1 states),
and each costs microseconds of dispatch for a few thousand flops. Here the whole scan (delta's bias and softplus,
exp(delta*A), delta*u*B, the contraction with C, the D skip and the silu(z) gate) is one loop that numba
compiles (LLVM, bundled in its wheel: no build step at install; compiled at first use, about 2 s, and cached
on disk). Each (batch, dim, L) operand is read once and y written once.

Layout: time-major (L, batch, dim) operands and a (batch, N, dim) state, so the innermost loop runs over
channels, contiguous in memory: it vectorises for any N (N = 1 in VMamba, 16 in Vim) with no reduction across
lanes. exp2 is a degree-6 polynomial on the fraction with the power of two built from its bits (numba has no
vectorised exp without Intel's SVML); it is exact to about an ulp of float32. Divisions use numpy's error model
(no ZeroDivisionError check, which would keep LLVM from vectorising the loops).

The Mamba mixer (``models/_blocks.Mamba``) has two kernels of its own for float32 CPU inference: its conv1d +
SiLU and its gated scan, batch-major as in_proj writes them, Vim's backward branch read in place (an anti-causal
conv, a scan from the last step) and summed with the forward one in the same pass.

Calls of some size split their channels (the cross scan and the narrow scans of a batch: its batch elements;
the cross scan of a single image: its four directions) between PyTorch's own OpenMP threads (see "threads"
below), so the kernels use the cores PyTorch was told to use and no second thread pool competes with PyTorch's.
Float32 only; the callers (``scan_chunked``, ``cross_scan``, ``models/_blocks``) keep the pure-PyTorch path for
float64 and for layouts these kernels do not take (fixed B/C, different group counts for B and C). Training runs
the scan and mixer kernels too, keeping the state every few steps for the compiled backward of
``scan_numba_grad``.
"""
import ctypes
import functools
import math
import os
import pickle
import sys
import threading
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .policy import get_scan_policy
from .scan_chunked import _time_major, _time_major_bc
from .scan_reference import check_scan_args

try:  # numba is a dependency, but the pure-PyTorch path covers a platform without its wheel
    import llvmlite.ir
    import numba
    from numba.core import types as numba_types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

__all__ = ['numba_importable', 'selective_scan_compiled', 'scan_kernel_takes', 'check_shapes', 'run_scan_kernel',
           'run_cross_scan_kernel', 'run_mixer_conv_silu', 'run_mixer_scan', 'register_kernel', 'compiled_task']

LOG2_E = math.log2(math.e)


def numba_importable() -> bool:
    """Whether numba could be imported (whether the compiled kernels may run is ``policy``'s decision)."""
    return numba is not None


if numba is not None:
    @intrinsic
    def _float32_from_bits(typingctx, bits):
        """Reinterpret an int32 as float32 (a bitcast numba does not offer for scalars)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvmlite.ir.FloatType())
        return numba_types.float32(numba_types.int32), codegen

    @numba.njit(inline='always', fastmath={'contract'}, error_model='numpy')
    def _exp2(x):
        """2**x in float32: 2**k (k = x rounded) from the exponent bits times a polynomial of f = x - k in
        [-1/2, 1/2] (Chebyshev fit of degree 6, relative error 3e-9 before float32 rounding).

        x is clamped to [-126, 128]: below, the result is 2**-126 instead of a smaller number or 0 (a decay
        that small is 0 for every later sum); k = 128 gives the bit pattern of +inf (so 2**x overflows from
        x = 127.5, not 128). NaN stays NaN."""
        c = min(max(x, np.float32(-126.0)), np.float32(128.0))
        k = np.floor(c + np.float32(0.5))
        f = c - k
        p = np.float32(1.546973197769834e-4)
        p = p * f + np.float32(1.3400432165213297e-3)
        p = p * f + np.float32(9.618025602955571e-3)
        p = p * f + np.float32(5.550327214209663e-2)
        p = p * f + np.float32(2.4022651213595167e-1)
        p = p * f + np.float32(6.931472067106202e-1)
        p = p * f + np.float32(1.0)
        r = p * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
        return r if x == x else x  # min/max drop a NaN

    @numba.njit(inline='always', fastmath={'contract'}, error_model='numpy')
    def _softplus(x):
        """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), as in ``scan_chunked._softplus_into``: with
        e = exp(-|x|) in (0, 1] and w = fl(1 + e), log1p(e) = log(w) - ((w - 1) - e) / w; log(w) for w in
        [1, 2] is 2*atanh(s), s = (w - 1) / (w + 1) <= 1/3, whose odd series to s**11 is exact to 1e-7."""
        e = _exp2(-abs(x) * np.float32(LOG2_E))
        w = np.float32(1.0) + e
        s = (w - np.float32(1.0)) / (w + np.float32(1.0))
        s2 = s * s
        q = np.float32(1.0 / 11.0)
        q = q * s2 + np.float32(1.0 / 9.0)
        q = q * s2 + np.float32(1.0 / 7.0)
        q = q * s2 + np.float32(1.0 / 5.0)
        q = q * s2 + np.float32(1.0 / 3.0)
        q = q * s2 + np.float32(1.0)
        log_w = np.float32(2.0) * s * q
        log1p_e = log_w - ((w - np.float32(1.0)) - e) / w
        return (x if not x < np.float32(0.0) else np.float32(0.0)) + log1p_e  # a NaN x stays NaN

    @numba.njit(inline='always', fastmath={'contract'}, error_model='numpy')
    def _silu(x):
        """x * sigmoid(x) = x / (1 + 2**(-x log2(e)))."""
        return x / (np.float32(1.0) + _exp2(-x * np.float32(LOG2_E)))

    @numba.njit(inline='always', fastmath={'contract'}, error_model='numpy')
    def _step(h, A2t, a_lo, u_t, delta_t, bias, D, b_t, c_t, step, step_u, acc, softplus):
        """One time step for a slice of channels: acc = sum_n C_n h_n + D u, the states h (N, width) updated.

        Every argument but h and A2t (columns a_lo ...) is a 1-D slice of the channels, indexed from 0: numba
        then knows no index is negative (no wrap-around code) and LLVM vectorises the channel loops.
        b_t, c_t: (N,) this step's B and C. step, step_u, acc: scratch of the slice's width.
        """
        width = acc.shape[0]
        if h.shape[0] == 1:  # N = 1 (VMamba): one fused loop; separate loops cost more than the arithmetic
            b, c, h_0, a_0 = b_t[0], c_t[0], h[0], A2t[0, a_lo:a_lo + width]
            for j in range(width):
                dt = delta_t[j] + bias[j]
                if softplus:
                    dt = _softplus(dt)
                state = _exp2(dt * a_0[j]) * h_0[j] + dt * u_t[j] * b
                h_0[j] = state
                acc[j] = state * c + D[j] * u_t[j]
            return
        if softplus:
            for j in range(width):
                step[j] = _softplus(delta_t[j] + bias[j])
        else:
            for j in range(width):
                step[j] = delta_t[j] + bias[j]
        for j in range(width):
            step_u[j] = step[j] * u_t[j]
            acc[j] = D[j] * u_t[j]
        for n in range(h.shape[0]):
            b = b_t[n]
            c = c_t[n]
            h_n, a_n = h[n], A2t[n, a_lo:a_lo + width]
            for j in range(width):
                state = _exp2(step[j] * a_n[j]) * h_n[j] + step_u[j] * b
                h_n[j] = state
                acc[j] += state * c

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _scan_channels(u, delta, z, A2t, B, C, D, bias, h, y, states, softplus, gate, chunk, c0, c1, i0, i1):
        """The whole scan for channels [c0, c1) of batch elements [i0, i1), every step.

        u, delta, z, y: (L, batch, dim) (z unused unless ``gate``). A2t: (N, dim) = A^T * log2(e).
        B, C: (L, batch, G, N), channel j in group j // (dim // G). D, bias: (dim,) (zeros when absent).
        h: (batch, N, dim), the state, updated in place. y = (sum_n C_n h_n + D u) * (silu(z) if gate).
        states: None (inference), or in training (ceil(L / chunk), batch, N, dim): the state before steps 0,
        chunk, 2 chunk ..., what ``scan_numba_grad``'s backward recomputes each chunk from.
        Float32 from the launcher; a float64 call compiles a float64 twin (the backward's gradcheck).
        """
        length, dim = u.shape[0], u.shape[2]
        groups, N = B.shape[2], B.shape[3]
        per_group = dim // groups
        for g in range(groups):
            lo = max(c0, g * per_group)
            hi = min(c1, (g + 1) * per_group)
            if lo >= hi:
                continue
            width = hi - lo
            # contiguous scratch: a (N, width) slice of h would have rows of unknown stride, and not vectorise
            state = np.empty((N, width), u.dtype)
            step = np.empty(width, u.dtype)  # delta after bias and softplus
            step_u = np.empty(width, u.dtype)  # delta * u
            acc = np.empty(width, u.dtype)
            for i in range(i0, i1):
                state[:] = h[i, :, lo:hi]
                for t in range(length):
                    if states is not None:  # training (numba drops the branch in inference's specialisation)
                        if t % chunk == 0:
                            states[t // chunk, i, :, lo:hi] = state
                    _step(state, A2t, lo, u[t, i, lo:hi], delta[t, i, lo:hi], bias[lo:hi], D[lo:hi],
                          B[t, i, g], C[t, i, g], step, step_u, acc, softplus)
                    y_t = y[t, i, lo:hi]
                    if gate:
                        z_t = z[t, i, lo:hi]
                        for j in range(width):
                            y_t[j] = acc[j] * _silu(z_t[j])
                    else:
                        for j in range(width):
                            y_t[j] = acc[j]
                h[i, :, lo:hi] = state

    @numba.njit(inline='always', fastmath={'contract'}, error_model='numpy')
    def _project(delta, row, w_k, c0, c1):
        """delta = row[:R] @ w_k[:, c0:c1]: the step sizes of channels [c0, c1) before bias and softplus, from the
        R low-rank inputs (w_k: (R, d), one direction's projection transposed)."""
        w_0, r_0 = w_k[0, c0:c1], row[0]
        for j in range(delta.shape[0]):
            delta[j] = r_0 * w_0[j]
        for r in range(1, w_k.shape[0]):
            w_r, r_r = w_k[r, c0:c1], row[r]
            for j in range(delta.shape[0]):
                delta[j] += r_r * w_r[j]

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _cross_scan_channels(x, dbl, dt_wt, A2t, D, bias, positions, out, states, softplus, c0, c1, i0, i1, k0,
                             k1):
        """VMamba's four-direction scan for channels [c0, c1) of every direction, merged on the grid.

        x, out: (batch, L, d) row-major tokens; every direction reads x, and out (zeros on entry) receives the
        sum of the directions' outputs, each at its token's place. dbl: (batch, L, K, R + 2N), x_proj's output
        per token and direction: the R inputs of the step-size projection, then B, then C. dt_wt: (K, R, d), the
        projection's weight transposed: delta = dbl[..., :R] @ dt_wt[k] is computed here, per step, instead of
        being read from a (batch, L, K, d) tensor made before (memory-bound at VMamba's first stage).
        positions: (K, L), the token of each direction's step. A2t: (N, K*d) = A^T * log2(e); D, bias: (K*d,),
        direction-major. The states start at zero. Batch elements [i0, i1) and directions [k0, k1) only.
        states: None (inference), or in training (batch * K, chunks, N, d): states[i K + k, c, :, c0:c1] =
        direction k's state before step c T of batch element i, T = ceil(L / chunks), what ``cross_scan_grad``'s
        backward recomputes each chunk from. Float32 from the launcher; a float64 call compiles a float64 twin.
        """
        batch, length, dim = x.shape
        K, R = dt_wt.shape[0], dt_wt.shape[1]
        N = A2t.shape[0]
        T = 1
        if states is not None:  # training (numba drops the branch in inference's specialisation)
            T = (length + states.shape[1] - 1) // states.shape[1]
        width = c1 - c0
        state = np.empty((N, width), x.dtype)
        delta = np.empty(width, x.dtype)
        step = np.empty(width, x.dtype)
        step_u = np.empty(width, x.dtype)
        acc = np.empty(width, x.dtype)
        for i in range(i0, i1):
            for k in range(k0, k1):
                state[:] = 0
                lo = k * dim + c0  # this direction's channels in A2t, D, bias
                for t in range(length):
                    if states is not None:
                        if t % T == 0:
                            states[i * K + k, t // T, :, c0:c1] = state
                    p = positions[k, t]
                    row = dbl[i, p, k]
                    _project(delta, row, dt_wt[k], c0, c1)
                    _step(state, A2t, lo, x[i, p, c0:c1], delta, bias[lo:lo + width], D[lo:lo + width],
                          row[R:R + N], row[R + N:R + 2 * N], step, step_u, acc, softplus)
                    out_p = out[i, p, c0:c1]
                    for j in range(width):
                        out_p[j] += acc[j]

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _mixer_conv_silu_channels(xz, w_t, bias, out, c0, c1):
        """The Mamba mixer's depthwise conv1d + SiLU, batch-major, for channels [c0, c1) of out.

        xz: (batch, L, 2 d) in_proj's output, x its first d channels. out: (batch, L, K d), K = 1 or 2: channel
        c < d is the causal conv of x[..., c] (the forward branch); c >= d the anti-causal conv of x[..., c - d]
        (Vim's backward branch: the causal conv of the time-reversed sequence, kept in the original order).
        w_t: (k, K d) the taps transposed, bias: (K d,). out = silu(bias + sum_s w[:, s] * x[t -+ (k - 1 - s)]),
        the terms added in the order of ``causal_conv1d_time_major`` (the newest tap, the bias, then the older).
        """
        batch, length, d = xz.shape[0], xz.shape[1], xz.shape[2] // 2
        k = w_t.shape[0]
        for lo, hi, reverse in ((c0, min(c1, d), False), (max(c0, d), c1, True)):
            if lo >= hi:
                continue
            width = hi - lo
            x_lo = lo - d if reverse else lo  # the x channel of out channel lo
            bias_c, newest = bias[lo:hi], w_t[k - 1, lo:hi]
            for i in range(batch):
                for t in range(length):
                    o, x_t = out[i, t, lo:hi], xz[i, t, x_lo:x_lo + width]
                    for j in range(width):
                        o[j] = x_t[j] * newest[j] + bias_c[j]
                    for shift in range(1, min(k, length - t if reverse else t + 1)):
                        s = t + shift if reverse else t - shift
                        x_s, w_s = xz[i, s, x_lo:x_lo + width], w_t[k - 1 - shift, lo:hi]
                        for j in range(width):
                            o[j] += x_s[j] * w_s[j]
                    for j in range(width):
                        o[j] = _silu(o[j])

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _mixer_scan_channels(u, delta_f, delta_b, proj_f, proj_b, xz, A2t, D, bias, y, states, rank, divide, chunk,
                             c0, c1):
        """The Mamba mixer's selective scan, batch-major, for channels [c0, c1) of y: with a backward branch
        (u has 2 d channels), Vim's two directions summed before the gate.

        u: (batch, L, K d) the conv's output; delta_f, delta_b: (batch, L, d) before bias and softplus (delta_b
        unused for K = 1); proj_f, proj_b: (batch, L, rank + 2N) x_proj's outputs, B and C at [rank, rank + N)
        and [rank + N, rank + 2N); xz: (batch, L, 2 d), z its last d channels. A2t: (N, K d) = A^T * log2(e);
        D, bias: (K d,). The backward branch scans the steps from the last to the first (the time-reversed
        sequence, read in place). y = (y_forward + y_backward) * silu(z), halved if ``divide``.
        states: None (inference), or in training (ceil(L / chunk), batch, N, K d): each branch's state before its
        steps 0, chunk, 2 chunk ... in its own order (the backward branch's step s is token L - 1 - s).
        """
        batch, length, d = y.shape
        N = A2t.shape[0]
        backward = u.shape[2] > d
        scale = np.float32(0.5) if divide and backward else np.float32(1.0)
        width = c1 - c0
        state = np.empty((N, width), u.dtype)
        step = np.empty(width, u.dtype)
        step_u = np.empty(width, u.dtype)
        acc = np.empty(width, u.dtype)
        b_lo, c_lo = rank, rank + N
        for i in range(batch):
            state[:] = 0
            for t in range(length):
                if states is not None:
                    if t % chunk == 0:
                        states[t // chunk, i, :, c0:c1] = state
                _step(state, A2t, c0, u[i, t, c0:c1], delta_f[i, t, c0:c1], bias[c0:c1], D[c0:c1],
                      proj_f[i, t, b_lo:b_lo + N], proj_f[i, t, c_lo:c_lo + N], step, step_u, acc, True)
                y_t = y[i, t, c0:c1]
                if backward:
                    for j in range(width):
                        y_t[j] = acc[j]
                else:
                    z_t = xz[i, t, d + c0:d + c1]
                    for j in range(width):
                        y_t[j] = acc[j] * _silu(z_t[j])
            if not backward:
                continue
            state[:] = 0
            lo = d + c0  # the backward branch's channels in u, A2t, D, bias
            for t in range(length - 1, -1, -1):
                if states is not None:
                    if (length - 1 - t) % chunk == 0:
                        states[(length - 1 - t) // chunk, i, :, lo:lo + width] = state
                _step(state, A2t, lo, u[i, t, lo:lo + width], delta_b[i, t, c0:c1], bias[lo:lo + width],
                      D[lo:lo + width], proj_b[i, t, b_lo:b_lo + N], proj_b[i, t, c_lo:c_lo + N], step, step_u,
                      acc, True)
                y_t, z_t = y[i, t, c0:c1], xz[i, t, d + c0:d + c1]
                for j in range(width):
                    y_t[j] = (y_t[j] + acc[j]) * _silu(z_t[j]) * scale


def check_shapes(caller: str, expected: dict) -> None:
    """Raise a ValueError naming the first of ``expected`` ({name: (tensor, shape)}) whose shape differs. The
    compiled loops do no bounds checks: a wrong shape would read or write outside an array."""
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f'{caller}: {name} must have shape {shape}, got {tuple(t.shape)}')


def _channel_parameters(A: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor]):
    """A^T * log2(e) (N, channels), D and delta_bias as float32 (zeros where absent), as the kernels take them."""
    A2t = (A.t() * LOG2_E).contiguous()
    zeros = A2t.new_zeros(A2t.shape[1])
    return (A2t, D.float() if D is not None else zeros,
            delta_bias.float() if delta_bias is not None else zeros)


def run_scan_kernel(u: Tensor, delta: Tensor, z: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor,
                    D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, h: Tensor,
                    y: Tensor) -> None:
    """Run the compiled scan: y (L, batch, dim) and the state h (batch, N, dim) are written in place.

    u, delta, z: float32 (L, batch, dim); A: (dim, N); B, C: float32 (L, batch, G, N); D, delta_bias: (dim,)
    or None; h holds the initial state (zeros for a scan from the start). h and y must be contiguous.
    """
    length, batch, dim = u.shape
    N = A.shape[1]
    expected = {'u': (u, (length, batch, dim)), 'delta': (delta, (length, batch, dim)),
                'y': (y, (length, batch, dim)), 'A': (A, (dim, N)), 'h': (h, (batch, N, dim)),
                'B': (B, (length, batch, B.shape[2], N)), 'C': (C, (length, batch, B.shape[2], N))}
    if z is not None:
        expected['z'] = (z, (length, batch, dim))
    check_shapes('run_scan_kernel', expected)
    if dim % B.shape[2]:
        raise ValueError(f'run_scan_kernel: {B.shape[2]} groups do not divide {dim} channels')
    for x in (h, y):
        if not x.is_contiguous():
            raise ValueError('run_scan_kernel writes h and y in place: they must be contiguous')
    A2t, D, bias = _channel_parameters(A, D, delta_bias)
    gate = z is not None
    # C-contiguous arrays: numba compiles (and vectorises) one specialisation for them
    arrays = [x.contiguous().numpy() for x in (u, delta, z if gate else u, A2t, B, C, D, bias, h, y)]
    # The split: by channels, unless a thread's share of a step would be small (under SCAN_BATCH_SPLIT_BELOW state
    # updates) and there are batch elements enough: then by them (a thread runs every channel of its elements, its
    # per-step costs spread over longer rows). Either way a task writes a range of its own.
    threads = _thread_count(length * batch * dim * N)
    by_batch = threads > 1 and batch >= threads and dim // threads * N < SCAN_BATCH_SPLIT_BELOW
    _launch('scan', arrays, (delta_softplus, int(gate) | SCAN_BY_BATCH * by_batch), batch if by_batch else dim,
            threads, 1 if by_batch else 16)


def scan_kernel_takes(B: Tensor, C: Tensor) -> bool:
    """Whether ``selective_scan_compiled`` takes this B and C: per step ((batch, N, L) or (batch, G, N, L)) with the
    same group count (a fixed (dim, N) B or C has no time-major copy to read)."""
    return B.dim() >= 3 and C.dim() >= 3 and (B.shape[1] if B.dim() == 4 else 1) == (C.shape[1] if C.dim() == 4 else 1)


def selective_scan_compiled(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                            z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                            delta_softplus: bool = False, return_last_state: bool = False):
    """``selective_scan`` by the compiled loop: float32 on a CPU, B and C per step (``scan_kernel_takes``). Same
    arguments and results as ``selective_scan_ref``; y comes back stored time-major when u is (the Mamba mixer's
    and VMamba's inputs), else in u's layout. Under autograd, the training variant of ``scan_numba_grad`` (which
    keeps chunk-start states for its compiled backward); inference keeps nothing."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        from .scan_numba_grad import selective_scan_train  # it imports this module
        return selective_scan_train(*inputs, delta_softplus, return_last_state)
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    if not scan_kernel_takes(B, C):
        raise ValueError('selective_scan_compiled: B and C must be per step with the same number of groups')
    batch, dim, length = u.shape
    y_tm = torch.empty(length, batch, dim, dtype=torch.float32)
    h = torch.zeros(batch, A.shape[1], dim, dtype=torch.float32)  # (batch, N, dim): channels innermost
    B_tm = _time_major_bc(B.float(), batch, dim, length)
    C_tm = _time_major_bc(C.float(), batch, dim, length)
    run_scan_kernel(_time_major(u, torch.float32), _time_major(delta, torch.float32),
                    _time_major(z, torch.float32) if z is not None else None, A.float(), B_tm, C_tm, D, delta_bias,
                    delta_softplus, h, y_tm)
    y = y_tm.permute(1, 2, 0)
    if not u.permute(2, 0, 1).is_contiguous():
        y = y.contiguous()
    y = y.to(u.dtype)
    return (y, h.transpose(1, 2).contiguous()) if return_last_state else y


def run_cross_scan_kernel(x: Tensor, dts: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                          positions: Tensor) -> Tensor:
    """VMamba's cross selective scan by the compiled loop: every direction reads x and its step inputs at the
    token of its step, projects its step sizes there, and the directions' outputs are summed at their tokens
    (no traversed, projected or merged copy is made).

    x: float32 (batch, L, d) row-major tokens; dts: (batch, L, K, R) the low-rank step inputs per token and
    direction, projected by dt_weight (K, d, R) (delta = dts @ dt_weight[k]^T, before bias and softplus); B, C:
    (batch, L, K, N); A: (K*d, N); D, delta_bias: (K*d,) or None, direction-major; positions: (K, L) int, the
    token of each direction's step. Returns (batch, L, d) float32.
    """
    batch, length, dim = x.shape
    K, R = dt_weight.shape[0], dt_weight.shape[2]
    N = A.shape[1]
    expected = {'x': (x, (batch, length, dim)), 'dts': (dts, (batch, length, K, R)),
                'dt_weight': (dt_weight, (K, dim, R)), 'B': (B, (batch, length, K, N)),
                'C': (C, (batch, length, K, N)), 'A': (A, (K * dim, N)), 'positions': (positions, (K, length))}
    check_shapes('run_cross_scan_kernel', expected)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= length):
        raise ValueError(f'run_cross_scan_kernel: positions must lie in [0, {length})')
    A2t, D, bias = _channel_parameters(A, D, delta_bias)
    # One contiguous row of step inputs, B and C per token and direction (the caller's are views of x_proj's
    # output, which holds them in that order already: one small copy instead of two).
    dbl = torch.cat((dts, B, C), dim=-1).float()
    dt_wt = dt_weight.float().transpose(1, 2).contiguous()  # (K, R, d): the channels contiguous
    # The split: by batch elements when there are enough (a thread runs all the channels of its elements:
    # longer vector loops than a share of them, VMamba's first stage has 96); else by directions, each task
    # adding into an output of its own, summed after; else by channels.
    threads = _thread_count(batch * length * K * dim * N)
    if threads > 1 and batch >= threads:
        split, units, align = CROSS_BY_BATCH, batch, 1
    elif threads > 1 and K >= threads:
        split, units, align = CROSS_BY_DIRECTION, K, 1
    else:
        split, units, align = CROSS_BY_CHANNELS, dim, 16
    parts = min(threads, K) if split == CROSS_BY_DIRECTION else 1
    outs = torch.zeros(parts, batch, length, dim, dtype=torch.float32)
    arrays = [t.contiguous().numpy() for t in (x, dbl, dt_wt, A2t, D, bias, positions.to(torch.int64), outs)]
    _launch('cross', arrays, (delta_softplus, split), units, threads, align)
    return outs[0] if parts == 1 else outs.sum(0)


def run_mixer_conv_silu(xz: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """silu(depthwise conv1d) of the Mamba mixer in one pass, batch-major: xz (batch, L, 2 d) float32, in_proj's
    output (x is its first d channels); weight (K d, 1, k) as ``nn.Conv1d`` stores it (K = 2: Vim's two
    branches' weights concatenated), bias (K d,) or None. Returns (batch, L, K d) float32: channels [0, d) the
    causal conv of x, [d, 2 d) the anti-causal one (the causal conv of the reversed sequence, in the original
    order). For K = 1 the same computation as ``F.silu(causal_conv1d_time_major(...))`` in another layout.
    """
    batch, length, two_d = xz.shape
    if two_d % 2 or weight.dim() != 3 or weight.shape[0] not in (two_d // 2, two_d) or weight.shape[1] != 1:
        raise ValueError(f'run_mixer_conv_silu: weight must be (d or 2 d, 1, k) for xz of {two_d} = 2 d channels, '
                         f'got {tuple(weight.shape)}')
    if xz.dtype != torch.float32:
        raise ValueError(f'run_mixer_conv_silu: xz must be float32, got {xz.dtype}')
    channels = weight.shape[0]
    w_t = weight[:, 0, :].t().float().contiguous()
    bias = bias.float() if bias is not None else w_t.new_zeros(channels)
    check_shapes('run_mixer_conv_silu', {'bias': (bias, (channels,))})
    out = torch.empty(batch, length, channels, dtype=torch.float32)
    arrays = [t.contiguous().numpy() for t in (xz, w_t, bias, out)]
    _launch('conv', arrays, (), channels, _thread_count(batch * length * channels))
    return out


def run_mixer_scan(u: Tensor, deltas: Sequence[Tensor], projections: Sequence[Tensor], xz: Tensor, A: Tensor,
                   D: Tensor, delta_bias: Tensor, dt_rank: int, divide: bool = False) -> Tensor:
    """The Mamba mixer's gated selective scan (softplus on delta + bias), batch-major, by the compiled loop; with
    two branches (Vim's bimamba 'v2') both directions in one pass and summed before the gate.

    u: float32 (batch, L, K d) from ``run_mixer_conv_silu`` (K = 1 or 2 branches); deltas: K tensors (batch, L,
    d), dt_proj's outputs without its bias; projections: K tensors (batch, L, dt_rank + 2N), x_proj's outputs
    (B and C follow the dt_rank inputs of dt_proj); xz: (batch, L, 2 d), z its last d channels; A: (K d, N);
    D, delta_bias: (K d,). Branch k uses channels [k d, (k + 1) d) of u, A, D, delta_bias; the second reads the
    sequence backwards. Returns (batch, L, d) = (y_1 + y_2) * silu(z), halved if ``divide``.
    """
    batch, length, channels = u.shape
    K, N = len(deltas), A.shape[1]
    d = channels // max(K, 1)
    if K not in (1, 2) or len(projections) != K:
        raise ValueError(f'run_mixer_scan: one or two branches, got {K} deltas and {len(projections)} projections')
    expected = {'u': (u, (batch, length, K * d)), 'xz': (xz, (batch, length, 2 * d)), 'A': (A, (K * d, N)),
                'D': (D, (K * d,)), 'delta_bias': (delta_bias, (K * d,))}
    for k in range(K):
        expected[f'deltas[{k}]'] = (deltas[k], (batch, length, d))
        expected[f'projections[{k}]'] = (projections[k], (batch, length, dt_rank + 2 * N))
    check_shapes('run_mixer_scan', expected)
    if any(t.dtype != torch.float32 for t in (u, xz, *deltas, *projections)):
        raise ValueError('run_mixer_scan: the activations must be float32')
    A2t, D, bias = _channel_parameters(A, D, delta_bias)
    y = torch.empty(batch, length, d, dtype=torch.float32)
    arrays = [t.contiguous().numpy() for t in (u, deltas[0], deltas[-1], projections[0], projections[-1], xz, A2t,
                                                D, bias, y)]
    _launch('mixer', arrays, (dt_rank, divide), d, _thread_count(batch * length * K * d * N))
    return y


# -- threads ------------------------------------------------------------------------------------------------
#
# A call's channels (or batch elements) are split between PyTorch's threads by running the kernel inside an OpenMP
# parallel region of PyTorch's own libgomp (GOMP_parallel through ctypes, which releases the GIL; the task is a numba
# cfunc). Why not a Python thread pool: after each PyTorch op, libgomp's idle workers keep spinning for a few
# milliseconds (its default wait policy), on the very cores a pool's threads need; measured on 2 cores, a pool
# thread made every call below ~10M state updates slower. PyTorch's workers instead pick the task up at once:
# 1.65x on Vim-T's batch-1 scan (0.92 -> 0.56 ms). Without a libgomp-based PyTorch, calls run on one thread.
# Every call goes through its kernel's task, on one thread a plain ctypes call of it (tasks = 1); the task
# unpacks its arrays from one int64 vector (addresses and shapes) and takes its range by an atomic ticket.

MIN_PARALLEL_WORK = 65536  # below, one thread: the parallel region's start costs more than it saves
CROSS_BY_CHANNELS, CROSS_BY_BATCH, CROSS_BY_DIRECTION = 0, 1, 2  # how a cross-scan call is split
SCAN_BY_BATCH = 2  # the scan's second flag: gate | SCAN_BY_BATCH where a call is split by batch elements
# Two threads on the scan kernel's time-major calls, 2-core Zen 4, best of 5 rounds (speed-up by channels / by batch
# elements; share = a thread's channels x N): MambaVision-T stage 3 (160 channels, N 8, share 640) b8 1.22x / 1.47x
# and 1.53x / 1.93x in two runs, b32 1.58x / 1.95x; stage 4 (320, N 8, share 1280) b8 1.62x / 1.85x; 192 channels,
# N 16 (share 1536) b8 1.61x / 1.51x and 2.64x / 1.93x; 768 channels, N 16 (share 6144) b8 1.98x / 1.95x.
SCAN_BATCH_SPLIT_BELOW = 1536

_COMPILING = threading.Lock()  # threads may launch a kernel for the first time at once


class compiled_task:
    """A kernel's task (a numba cfunc of the data vector), compiled, or loaded from numba's cache, at its first
    launch. Why not at import (the decorator's own time): the first run of a fresh checkout compiles every task it
    touches, about 45 s for this module's four alone on a 2-core EPYC; now a model compiles only the kernels it
    runs (MambaVision's training: the scan's three), and importing compiles nothing."""

    def __init__(self, function):
        self.function, self._cfunc = function, None
        functools.update_wrapper(self, function)

    @property
    def address(self) -> int:
        if self._cfunc is None:
            with _COMPILING:
                if self._cfunc is None:
                    self._cfunc = self._compile()
        return self._cfunc.address

    def _compile(self):
        signature = numba_types.void(numba_types.CPointer(numba_types.int64))
        try:
            return numba.cfunc(signature, cache=True)(self.function)
        except (AttributeError, ImportError, EOFError, pickle.UnpicklingError):
            # numba unpickles a function's cache index before it checks the source's time stamp, so an index
            # written by another version of these files (an upgrade, an edit) that names a class since renamed
            # fails to load instead of being ignored: empty the indexes and compile afresh, once.
            _flush_kernel_caches()
            return numba.cfunc(signature, cache=True)(self.function)


def _flush_kernel_caches() -> None:
    """Empty numba's on-disk cache index of every compiled function in this package's loaded modules."""
    package = __name__.rpartition('.')[0] + '.'
    for name, module in list(sys.modules.items()):
        if not name.startswith(package) or module is None:
            continue
        for value in list(vars(module).values()):
            cache = getattr(value, '_cache', None)
            if isinstance(value, numba.core.dispatcher.Dispatcher) and hasattr(cache, 'flush'):
                cache.flush()


# The arrays each kernel takes, in order, as (ndim, dtype) for the task's unpacking.
_KERNEL_ARRAYS = {
    'scan': ((3, 'f4'), (3, 'f4'), (3, 'f4'), (2, 'f4'), (4, 'f4'), (4, 'f4'), (1, 'f4'), (1, 'f4'), (3, 'f4'),
             (3, 'f4')),
    'cross': ((3, 'f4'), (4, 'f4'), (3, 'f4'), (2, 'f4'), (1, 'f4'), (1, 'f4'), (2, 'i8'), (4, 'f4')),
    'conv': ((3, 'f4'), (2, 'f4'), (1, 'f4'), (3, 'f4')),
    'mixer': ((3, 'f4'), (3, 'f4'), (3, 'f4'), (3, 'f4'), (3, 'f4'), (3, 'f4'), (2, 'f4'), (1, 'f4'), (1, 'f4'),
              (3, 'f4')),
}

if numba is not None:
    @intrinsic
    def _float32_pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(numba_types.CPointer(numba_types.float32)))
        return numba_types.CPointer(numba_types.float32)(numba_types.int64), codegen

    @intrinsic
    def _int64_pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(numba_types.CPointer(numba_types.int64)))
        return numba_types.CPointer(numba_types.int64)(numba_types.int64), codegen

    @intrinsic
    def _fetch_add(typingctx, pointer, value):
        """Atomically add value to *pointer (an int64); returns the value before."""
        def codegen(context, builder, signature, args):
            return builder.atomic_rmw('add', args[0], args[1], 'monotonic')
        return numba_types.int64(numba_types.CPointer(numba_types.int64), numba_types.int64), codegen

    # An array packed at data[i] as (address, *shape), C-contiguous.
    @numba.njit(inline='always')
    def _f1(data, i):
        return numba.carray(_float32_pointer(data[i]), (data[i + 1],))

    @numba.njit(inline='always')
    def _f2(data, i):
        return numba.carray(_float32_pointer(data[i]), (data[i + 1], data[i + 2]))

    @numba.njit(inline='always')
    def _f3(data, i):
        return numba.carray(_float32_pointer(data[i]), (data[i + 1], data[i + 2], data[i + 3]))

    @numba.njit(inline='always')
    def _f4(data, i):
        return numba.carray(_float32_pointer(data[i]), (data[i + 1], data[i + 2], data[i + 3], data[i + 4]))

    @numba.njit(inline='always')
    def _i2(data, i):
        return numba.carray(_int64_pointer(data[i]), (data[i + 1], data[i + 2]))

    @numba.njit
    def _task_bounds(task, tasks, units, align):
        """The range of task ``task`` of ``tasks`` over ``units`` channels (whole blocks of ``align`` = 16) or
        batch elements (align 1); the last task takes the rest."""
        lo = units * task // tasks // align * align
        hi = units if task == tasks - 1 else units * (task + 1) // tasks // align * align
        return lo, hi

    @numba.njit(inline='always')
    def _task_range(data, align):
        """This thread's range: task number data[0]++ (atomic) of data[1] tasks over data[2] units."""
        return _task_bounds(_fetch_add(data, 1), data[1], data[2], align)

    # data: [task counter, tasks, channels, flag, flag, arrays as in _KERNEL_ARRAYS...]; offsets follow from it.
    @compiled_task
    def _scan_task(data):
        u = _f3(data, 5)
        if data[4] & SCAN_BY_BATCH:
            (i0, i1), (c0, c1) = _task_range(data, 1), (0, u.shape[2])
        else:
            (c0, c1), (i0, i1) = _task_range(data, 16), (0, u.shape[1])
        if c0 < c1 and i0 < i1:
            _scan_channels(u, _f3(data, 9), _f3(data, 13), _f2(data, 17), _f4(data, 20), _f4(data, 25),
                           _f1(data, 30), _f1(data, 32), _f3(data, 34), _f3(data, 38), None, data[3] != 0,
                           data[4] & 1 != 0, 0, c0, c1, i0, i1)

    @numba.njit(inline='always')
    def _cross_task_ranges(data, batch, K, dim):
        """This cross-scan task's (c0, c1, i0, i1, k0, k1, ticket): its range by the split in data[4]
        (CROSS_BY_CHANNELS, CROSS_BY_BATCH or CROSS_BY_DIRECTION) and its task number, which indexes the outputs
        it has of its own. The training kernels (``cross_scan_grad``) split the same way."""
        ticket = _fetch_add(data, 1)
        c0, c1, i0, i1, k0, k1 = 0, dim, 0, batch, 0, K
        if data[4] == CROSS_BY_BATCH:
            i0, i1 = _task_bounds(ticket, data[1], data[2], 1)
        elif data[4] == CROSS_BY_DIRECTION:
            k0, k1 = _task_bounds(ticket, data[1], data[2], 1)
        else:
            c0, c1 = _task_bounds(ticket, data[1], data[2], 16)
        return c0, c1, i0, i1, k0, k1, ticket

    @compiled_task
    def _cross_task(data):
        """Split by directions, task p adds into its own output, outs[p] (directions meet at every token)."""
        x, dt_wt, outs = _f3(data, 5), _f3(data, 14), _f4(data, 28)
        c0, c1, i0, i1, k0, k1, ticket = _cross_task_ranges(data, x.shape[0], dt_wt.shape[0], x.shape[2])
        if c0 < c1 and i0 < i1 and k0 < k1:
            _cross_scan_channels(x, _f4(data, 9), dt_wt, _f2(data, 18), _f1(data, 21), _f1(data, 23), _i2(data, 25),
                                 outs[ticket if data[4] == CROSS_BY_DIRECTION else 0], None, data[3] != 0,
                                 c0, c1, i0, i1, k0, k1)

    @compiled_task
    def _conv_task(data):
        c0, c1 = _task_range(data, 16)
        if c0 < c1:
            _mixer_conv_silu_channels(_f3(data, 5), _f2(data, 9), _f1(data, 12), _f3(data, 14), c0, c1)

    @compiled_task
    def _mixer_task(data):
        c0, c1 = _task_range(data, 16)
        if c0 < c1:
            _mixer_scan_channels(_f3(data, 5), _f3(data, 9), _f3(data, 13), _f3(data, 17), _f3(data, 21),
                                 _f3(data, 25), _f2(data, 29), _f1(data, 32), _f1(data, 34), _f3(data, 36),
                                 None, data[3], data[4] != 0, 0, c0, c1)

    _TASKS = {'scan': _scan_task, 'cross': _cross_task, 'conv': _conv_task, 'mixer': _mixer_task}


def register_kernel(name: str, layout: tuple, task) -> None:
    """Make kernel ``name`` launchable by ``_launch``: ``layout`` lists its arrays as (ndim, dtype) in the order of
    the task's unpacking, ``task`` is its ``compiled_task`` (data: [task counter, tasks, units, flag, flag,
    arrays...]).
    Other modules' kernels (the backward ones) register here and share the thread machinery below."""
    if name in _TASKS:
        raise ValueError(f'kernel {name!r} is registered already')
    _KERNEL_ARRAYS[name] = layout
    _TASKS[name] = task


_IMPORT_PID = os.getpid()


def _gomp_parallel():
    """``_libgomp_parallel()``, except in a forked child process (a DataLoader worker, say): libgomp's thread
    pool does not survive a fork, so there the kernels stay on one thread."""
    return _libgomp_parallel() if os.getpid() == _IMPORT_PID else None


@functools.lru_cache(maxsize=None)
def _libgomp_parallel():
    """PyTorch's libgomp ``GOMP_parallel(fn, data, num_threads, flags)``, or None when PyTorch does not use
    libgomp. Opened by soname: that returns the copy already loaded (PyTorch's), whose idle workers then run
    the task."""
    if 'OpenMP' not in torch.__config__.parallel_info():
        return None
    try:
        fn = ctypes.CDLL('libgomp.so.1').GOMP_parallel
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    fn.restype = None
    return fn


def _thread_count(work: int) -> int:
    """Threads for a call of ``work`` elements: PyTorch's (or the policy's ``scan_threads``) from MIN_PARALLEL_WORK
    on, where PyTorch's libgomp is there to run the tasks; otherwise 1."""
    forced = get_scan_policy().scan_threads
    threads = forced if forced else (torch.get_num_threads() if work >= MIN_PARALLEL_WORK else 1)
    return threads if threads > 1 and _gomp_parallel() is not None else 1


@functools.lru_cache(maxsize=None)
def _task_on_this_thread(name: str):
    """Kernel ``name``'s task as a ctypes function (a call costs well under a microsecond)."""
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_TASKS[name].address)


def _launch(name: str, arrays: list, flags: tuple, units: int, threads: int, align: int = 16) -> None:
    """Run kernel ``name``'s task over ``units`` (channels, in whole blocks of ``align`` = 16; or batch
    elements or directions, ``align`` 1): as ``threads`` tasks in PyTorch's OpenMP threads, or as one task on
    this thread. Each range is written by one task only, so the results do not depend on the split.
    """
    threads = max(1, min(threads, units // align))
    layout = _KERNEL_ARRAYS[name]
    fields = [0, threads, units] + [int(f) for f in flags] + [0] * (2 - len(flags))
    for array, (ndim, dtype) in zip(arrays, layout, strict=True):
        if array.ndim != ndim or array.dtype != np.dtype(dtype) or not array.flags.c_contiguous:
            raise ValueError(f'{name} kernel: an argument is {array.dtype} {array.shape}, expected {ndim}-d {dtype}')
        fields += [array.ctypes.data, *array.shape]
    data = np.array(fields, dtype=np.int64)
    if threads == 1:
        _task_on_this_thread(name)(data.ctypes.data)
    else:
        _gomp_parallel()(_TASKS[name].address, data.ctypes.data, threads, 0)  # returns when every task is done
