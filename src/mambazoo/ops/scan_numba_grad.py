"""CPU training by the compiled loops: the selective scan (MambaVision, and VMamba's pure-PyTorch fallback) and the
Mamba mixer's conv1d + SiLU and gated one- or two-direction scan (Vim, the hybrids), with compiled backward kernels.

Why: under autograd every op used to fall back to the pure-PyTorch chunked scan, whose backward is a PyTorch loop
over time steps: Vim-T trained 10x slower than DeiT-T on a CPU.

Forward: ``scan_numba``'s own kernels, which in training also write the state before every CHUNK-th step
((ceil(L / CHUNK), batch, N, channels), each direction in its own order); inference passes no such output and
keeps nothing. Nothing of size (batch, channels, L, N) is ever kept or made.

Backward, per channel block (at most BLOCK channels of a thread's share) and batch element, chunk by chunk from
the last (T = CHUNK steps):

1. gather the chunk's inputs into contiguous scratch and recompute from its saved start state the states
   (T + 1, N, width), the decays exp(dt A) (T, N, width), the step sizes dt = softplus(delta + bias), dt u,
   softplus' = sigmoid(delta + bias) and (for a gate) the output before the gate;
2. walk the chunk backwards, dh = dLoss/dh_t carried from chunk to chunk:
       g       = dLoss/dy_t * silu(z_t)                    (the gradient of sum_n C_n h_n + D u)
       dh     += C_t g                                     dC_t = sum over the group's channels of g h_t
       d(dt u) = sum_n dh_n B_t,n                          dB_t = sum over the group's channels of dh dt u
       x_n     = dh_n exp(dt A_n) h_{t-1,n}                dA_n += x_n dt,   d(dt) = sum_n x_n A_n + d(dt u) u
       dh      = exp(dt A) dh                              (on to step t - 1)
   dA, dD, d(delta_bias) are summed per chunk, then added to the block's sums (float32 sums of fewer terms).

Channel sums inside a step (dB_t, dC_t) are dot products compiled with reassociation (``_dot``), so that they
vectorise; everything else is the forward's float32 arithmetic (exp2, softplus and silu of ``scan_numba``).
Measured on Vim-T's scan (batch 8, one thread of a shared 2-core EPYC, best of 20): blocks of 384 channels and 32
steps (1.6 MB of scratch at N = 16) ran the backward in 24 ms (26 ms recomputing the decays in the reverse walk),
of 256 channels in 28 ms, of 64 channels and 64 steps (cache-sized, decays recomputed) in 32 ms, of 32 channels in
about 75: per step and state, the vector loops' fixed costs (runtime alias checks, remainders) outweigh the
cache. The backward costs about 2.5 forwards.

Threads: as in the forward kernels, channels are split between PyTorch's OpenMP threads (``scan_numba._launch``;
the mixer's by its d channels, each thread taking both branches' channels c and d + c). A thread owns its
channels' du, d(delta), dz, dA, dD and d(delta_bias), and adds its channels' share of dB and dC (sums over the
channels of a group) into a partial of its own, summed after: results depend on the split only through the
rounding of those sums.

The kernels are dtype-generic: float32 through the launcher; a float64 call (the tests' gradcheck) runs the numba
functions directly, on one thread (exp2 and softplus stay float32-accurate polynomials there, smooth enough for
finite differences).
"""
import math
from collections import namedtuple
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import scan_numba
from .policy import compute_dtype
from .scan_chunked import _time_major, _time_major_bc
from .scan_numba import LOG2_E, check_shapes, numba, scan_kernel_takes
from .scan_reference import check_scan_args

if numba is not None:
    from .scan_numba import (_exp2, _f1, _f2, _f3, _f4, _fetch_add, _float32_pointer, _mixer_conv_silu_channels,
                             _mixer_scan_channels, _scan_channels, _silu, _softplus, _task_bounds, compiled_task)

__all__ = ['SelectiveScanCompiledFn', 'MixerScanCompiledFn', 'MixerInnerCompiledFn', 'MixerConvCompiledFn',
           'selective_scan_train', 'mixer_scan_train', 'mixer_inner_train', 'mixer_conv_silu_train', 'needs_grad',
           'CHUNK', 'BLOCK']

# Time steps between saved states: ceil(L / 64) states kept per scan (Vim-T: 4 of (batch, 16, 768) per layer, 7 at
# 32 steps). The backward's speed does not depend on it (a Vim-T mixer layer and MambaVision-T's step at batch 8,
# 6 and 4 interleaved rounds on a 2-core Zen 4: 32, 48, 64 and 128 steps within 5% of each other, 64 the fastest).
CHUNK = 64
BLOCK = 384  # channels per scratch block, at most (see above)
LN2 = math.log(2.0)

# A channel block's work arrays in the backward kernels (width channels, T = CHUNK steps, N states): the chunk's
# gathered inputs (u, delta, B, C and gacc = dLoss/d(output before the gate)), its recomputed states hs (T + 1, N,
# width; hs[0] the chunk's start) and decays exp(dt A) (T, N, width), step sizes dts, dt u, softplus' sig and the
# ungated output acc; the outputs gu, gdelta (T, width), gB, gC (T, N); A2 = A^T log2(e) (N, width), the carried
# dh = dLoss/dh and the chunk's and the block's dA (N, width); scratch gdu, gdt and the chunk's and the block's dD,
# d(delta_bias) (width,).
_Scratch = namedtuple('_Scratch', ['hs', 'decays', 'u', 'delta', 'gacc', 'dts', 'dtu', 'sig', 'acc', 'gu', 'gdelta',
                                   'B', 'C', 'gB', 'gC', 'A2', 'dh', 'gA', 'gA_sum', 'gdu', 'gdt', 'gD', 'gD_sum',
                                   'gbias', 'gbias_sum'])


def needs_grad(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether autograd records an op on ``tensors`` (then the ops run the training variants here)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


if numba is not None:
    @numba.njit(inline='always', fastmath={'contract'}, error_model='numpy')
    def _sigmoid(x):
        return np.float32(1.0) / (np.float32(1.0) + _exp2(-x * np.float32(LOG2_E)))

    @numba.njit(inline='always', fastmath={'contract'}, error_model='numpy')
    def _silu_grad(x):
        """d silu(x) / dx = sigmoid(x) (1 + x (1 - sigmoid(x)))."""
        s = _sigmoid(x)
        return s * (np.float32(1.0) + x * (np.float32(1.0) - s))

    @numba.njit(inline='always')
    def _copy(dst, src):
        """dst[:] = src for 1-D arrays, as a plain loop: numba's slice assignment (overlap check, broadcasting)
        cost more than the copy of a step's row; the gathers and scatters of a step made a third of the backward."""
        for j in range(dst.shape[0]):
            dst[j] = src[j]

    @numba.njit(inline='always')
    def _add(dst, src):
        for j in range(dst.shape[0]):
            dst[j] += src[j]

    @numba.njit(inline='always', fastmath={'contract'}, error_model='numpy')
    def _times_silu(out, gy, z, scale):
        """out = gy * silu(z) * scale: the gradient of the output before its gate."""
        for j in range(out.shape[0]):
            out[j] = gy[j] * _silu(z[j]) * scale

    @numba.njit(inline='always', fastmath={'contract'}, error_model='numpy')
    def _gate_grad(gz, gy, y, z, scale):
        """gz = gy * y * silu'(z) * scale: the gate's gradient, y the output before the gate."""
        for j in range(gz.shape[0]):
            gz[j] = gy[j] * y[j] * _silu_grad(z[j]) * scale

    @numba.njit(fastmath={'contract', 'reassoc'}, error_model='numpy')
    def _dot(x, y):
        """sum_j x[j] y[j], in any order: compiled apart (not inlined by numba) so that reassociation, which lets
        LLVM vectorise the sum, applies here only (the softplus' compensated log1p must not be reassociated)."""
        s = np.float32(0.0)
        for j in range(x.shape[0]):
            s += x[j] * y[j]
        return s

    @numba.njit(inline='always')
    def _scratch(T, N, width, dtype):
        """A channel block's work arrays (``_Scratch``)."""
        return _Scratch(np.empty((T + 1, N, width), dtype), np.empty((T, N, width), dtype),
                       np.empty((T, width), dtype), np.empty((T, width), dtype), np.empty((T, width), dtype),
                       np.empty((T, width), dtype), np.empty((T, width), dtype), np.empty((T, width), dtype),
                       np.empty((T, width), dtype), np.empty((T, width), dtype), np.empty((T, width), dtype),
                       np.empty((T, N), dtype), np.empty((T, N), dtype), np.empty((T, N), dtype),
                       np.empty((T, N), dtype), np.empty((N, width), dtype), np.empty((N, width), dtype),
                       np.empty((N, width), dtype), np.empty((N, width), dtype), np.empty(width, dtype),
                       np.empty(width, dtype), np.empty(width, dtype), np.empty(width, dtype), np.empty(width, dtype),
                       np.empty(width, dtype))

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _recompute_chunk(n, w, bias, D, softplus, need_acc):
        """Steps 0 .. n-1 of a gathered chunk from its start state w.hs[0]: w.hs[s + 1] the state after step s,
        w.decays its exp(dt A), w.dts the step sizes (bias and softplus applied), w.dtu = dts * u, w.sig = d dts /
        d delta and, with ``need_acc``, w.acc = sum_n C_n h_n + D u (before the gate). The forward's arithmetic
        (``scan_numba._step``)."""
        N, width = w.hs.shape[1], w.hs.shape[2]
        for s in range(n):
            dt_s, dtu_s, sig_s, u_s, delta_s, acc_s = w.dts[s], w.dtu[s], w.sig[s], w.u[s], w.delta[s], w.acc[s]
            if softplus:
                for j in range(width):
                    pre = delta_s[j] + bias[j]
                    dt_s[j] = _softplus(pre)
                    sig_s[j] = _sigmoid(pre)
            else:
                for j in range(width):
                    dt_s[j] = delta_s[j] + bias[j]
                    sig_s[j] = 1.0
            for j in range(width):
                dtu_s[j] = dt_s[j] * u_s[j]
            if need_acc:
                for j in range(width):
                    acc_s[j] = D[j] * u_s[j]
            for m in range(N):
                b, c = w.B[s, m], w.C[s, m]
                prev, cur, a_m, decay_m = w.hs[s, m], w.hs[s + 1, m], w.A2[m], w.decays[s, m]
                if need_acc:
                    for j in range(width):
                        decay = _exp2(dt_s[j] * a_m[j])
                        decay_m[j] = decay
                        state = decay * prev[j] + dtu_s[j] * b
                        cur[j] = state
                        acc_s[j] += state * c
                else:
                    for j in range(width):
                        decay = _exp2(dt_s[j] * a_m[j])
                        decay_m[j] = decay
                        cur[j] = decay * prev[j] + dtu_s[j] * b

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _reverse_chunk(n, w, D):
        """The adjoint recurrence over a recomputed chunk, from its last step to its first: w.dh holds dLoss/dh
        after the chunk, on return before it. Writes w.gu, w.gdelta and this block's channel sums w.gB, w.gC;
        adds the chunk's dA (w.r.t. A^T), dD, d(delta_bias) to w.gA_sum, w.gD_sum, w.gbias_sum."""
        N, width = w.hs.shape[1], w.hs.shape[2]
        gdu, gdt, gA_c, gD_c, gbias_c = w.gdu, w.gdt, w.gA, w.gD, w.gbias
        gA_c[:] = 0
        gD_c[:] = 0
        gbias_c[:] = 0
        for s in range(n - 1, -1, -1):
            gacc, u_s, dt_s, dtu_s = w.gacc[s], w.u[s], w.dts[s], w.dtu[s]
            for j in range(width):
                gD_c[j] += gacc[j] * u_s[j]
                gdu[j] = 0.0  # d(dt u), summed over the states
                gdt[j] = 0.0  # d(dt) through exp(dt A), over ln 2
            for m in range(N):
                b, c = w.B[s, m], w.C[s, m]
                dh_m, prev, a_m, gA_m, decay_m = w.dh[m], w.hs[s, m], w.A2[m], gA_c[m], w.decays[s, m]
                for j in range(width):
                    dh_m[j] += c * gacc[j]
                w.gC[s, m] = _dot(gacc, w.hs[s + 1, m])
                w.gB[s, m] = _dot(dh_m, dtu_s)
                for j in range(width):
                    decay = decay_m[j]
                    x = dh_m[j] * decay * prev[j]
                    gdt[j] += x * a_m[j]
                    gA_m[j] += x * dt_s[j]
                    gdu[j] += dh_m[j] * b
                    dh_m[j] = decay * dh_m[j]
            gu_s, gdelta_s, sig_s = w.gu[s], w.gdelta[s], w.sig[s]
            for j in range(width):
                gu_s[j] = gacc[j] * D[j] + gdu[j] * dt_s[j]
                g = (gdt[j] * np.float32(LN2) + gdu[j] * u_s[j]) * sig_s[j]  # A = A2t ln 2
                gdelta_s[j] = g
                gbias_c[j] += g
        for m in range(N):
            _add(w.gA_sum[m], gA_c[m])
        _add(w.gD_sum, gD_c)
        _add(w.gbias_sum, gbias_c)

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _scan_backward_channels(u, delta, z, A2t, B, C, D, bias, states, gy, dh_last, gu, gdelta, gz, gA, gD, gbias,
                                gB, gC, softplus, gate, chunk, c0, c1):
        """The backward of ``scan_numba._scan_channels`` for channels [c0, c1), every batch and step.

        Inputs as the forward's (time-major (L, batch, dim); B, C (L, batch, G, N)), states its chunk starts
        (ceil(L / chunk), batch, N, dim); gy: (L, batch, dim) dLoss/dy; dh_last: (batch, N, dim) dLoss/d(last
        state). Writes gu, gdelta, gz (if ``gate``) (L, batch, dim) and gA (N, dim, w.r.t. A^T), gD, gbias (dim,)
        on these channels; adds their share of dB, dC into gB, gC (L, batch, G, N).
        """
        length, batch, dim = u.shape
        groups, N = B.shape[2], B.shape[3]
        per_group = dim // groups
        one = np.float32(1.0)
        for g in range(groups):
            g0, g1 = max(c0, g * per_group), min(c1, (g + 1) * per_group)
            if g0 >= g1:
                continue
            blocks = (g1 - g0 + BLOCK - 1) // BLOCK
            for block in range(blocks):
                b0, b1 = _task_bounds(block, blocks, g1 - g0, 16)
                lo, hi = g0 + b0, g0 + b1
                w = _scratch(chunk, N, hi - lo, u.dtype)
                w.A2[:] = A2t[:, lo:hi]
                w.gA_sum[:] = 0
                w.gD_sum[:] = 0
                w.gbias_sum[:] = 0
                for i in range(batch):
                    w.dh[:] = dh_last[i, :, lo:hi]
                    for c in range(states.shape[0] - 1, -1, -1):
                        t0 = c * chunk
                        n = min(chunk, length - t0)
                        w.hs[0] = states[c, i, :, lo:hi]
                        for s in range(n):
                            t = t0 + s
                            _copy(w.u[s], u[t, i, lo:hi])
                            _copy(w.delta[s], delta[t, i, lo:hi])
                            _copy(w.B[s], B[t, i, g])
                            _copy(w.C[s], C[t, i, g])
                            if gate:
                                _times_silu(w.gacc[s], gy[t, i, lo:hi], z[t, i, lo:hi], one)
                            else:
                                _copy(w.gacc[s], gy[t, i, lo:hi])
                        _recompute_chunk(n, w, bias[lo:hi], D[lo:hi], softplus, gate)
                        _reverse_chunk(n, w, D[lo:hi])
                        for s in range(n):
                            t = t0 + s
                            _copy(gu[t, i, lo:hi], w.gu[s])
                            _copy(gdelta[t, i, lo:hi], w.gdelta[s])
                            _add(gB[t, i, g], w.gB[s])
                            _add(gC[t, i, g], w.gC[s])
                            if gate:
                                _gate_grad(gz[t, i, lo:hi], gy[t, i, lo:hi], w.acc[s], z[t, i, lo:hi], one)
                gA[:, lo:hi] = w.gA_sum
                gD[lo:hi] = w.gD_sum
                gbias[lo:hi] = w.gbias_sum

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _mixer_backward_channels(u, delta_f, delta_b, proj_f, proj_b, xz, A2t, D, bias, states, gy, gu, gdelta_f,
                                 gdelta_b, gproj, gxz, gA, gD, gbias, rank, divide, chunk, c0, c1):
        """The backward of ``scan_numba._mixer_scan_channels`` for channels [c0, c1) of y (both branches').

        Inputs as the forward's (batch-major), states its chunk starts (ceil(L / chunk), batch, N, K d); gy:
        (batch, L, d). Writes gu (batch, L, K d), gdelta_f, gdelta_b (batch, L, d), the z half of gxz (batch, L,
        2 d; with two branches it holds the forward branch's ungated output until the backward branch's pass
        completes dz), gA (N, K d, w.r.t. A^T), gD, gbias (K d,) on these channels; adds their share of dB, dC
        into gproj (K, batch, L, rank + 2N) at B's and C's places.
        """
        batch, length, d = gy.shape
        N = A2t.shape[0]
        K = u.shape[2] // d
        scale = np.float32(0.5) if divide and K == 2 else np.float32(1.0)
        b_lo, c_lo = rank, rank + N
        blocks = (c1 - c0 + BLOCK - 1) // BLOCK
        for block in range(blocks):
            b0, b1 = _task_bounds(block, blocks, c1 - c0, 16)
            lo, hi = c0 + b0, c0 + b1
            width = hi - lo
            w = _scratch(chunk, N, width, u.dtype)
            for k in range(K):
                backward = k == 1  # Vim's backward branch: its step s is token L - 1 - s
                kd = k * d + lo  # the branch's channels in u, A2t, D, bias, gu
                delta = delta_b if backward else delta_f
                proj = proj_b if backward else proj_f
                gdelta = gdelta_b if backward else gdelta_f
                w.A2[:] = A2t[:, kd:kd + width]
                w.gA_sum[:] = 0
                w.gD_sum[:] = 0
                w.gbias_sum[:] = 0
                for i in range(batch):
                    w.dh[:] = 0
                    for c in range(states.shape[0] - 1, -1, -1):
                        s0 = c * chunk
                        n = min(chunk, length - s0)
                        w.hs[0] = states[c, i, :, kd:kd + width]
                        for s in range(n):
                            t = length - 1 - s0 - s if backward else s0 + s
                            _copy(w.u[s], u[i, t, kd:kd + width])
                            _copy(w.delta[s], delta[i, t, lo:hi])
                            _copy(w.B[s], proj[i, t, b_lo:b_lo + N])
                            _copy(w.C[s], proj[i, t, c_lo:c_lo + N])
                            _times_silu(w.gacc[s], gy[i, t, lo:hi], xz[i, t, d + lo:d + hi], scale)
                        _recompute_chunk(n, w, bias[kd:kd + width], D[kd:kd + width], True, True)
                        _reverse_chunk(n, w, D[kd:kd + width])
                        for s in range(n):
                            t = length - 1 - s0 - s if backward else s0 + s
                            _copy(gu[i, t, kd:kd + width], w.gu[s])
                            _copy(gdelta[i, t, lo:hi], w.gdelta[s])
                            _add(gproj[k, i, t, b_lo:b_lo + N], w.gB[s])
                            _add(gproj[k, i, t, c_lo:c_lo + N], w.gC[s])
                            gz_t = gxz[i, t, d + lo:d + hi]
                            if K == 2 and not backward:
                                _copy(gz_t, w.acc[s])  # y_forward, until the backward branch adds y_backward
                            else:
                                if K == 2:
                                    _add(w.acc[s], gz_t)
                                _gate_grad(gz_t, gy[i, t, lo:hi], w.acc[s], xz[i, t, d + lo:d + hi], scale)
                gA[:, kd:kd + width] = w.gA_sum
                gD[kd:kd + width] = w.gD_sum
                gbias[kd:kd + width] = w.gbias_sum

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _mixer_conv_backward_channels(xz, w_t, bias, gout, gxz, gw_t, gbias, c0, c1):
        """The backward of ``scan_numba._mixer_conv_silu_channels`` for channels [c0, c1) of x and the out
        channels that read them (c, and d + c for Vim's anti-causal branch): the conv recomputed for silu's
        derivative. gout: (batch, L, K d); writes the x half of gxz (batch, L, 2 d; zeros on entry) on these
        channels, and gw_t (k, K d), gbias (K d,) on their out channels."""
        batch, length, d = xz.shape[0], xz.shape[1], xz.shape[2] // 2
        k = w_t.shape[0]
        K = gout.shape[2] // d
        width = c1 - c0
        dtype = xz.dtype
        o, g = np.empty(width, dtype), np.empty(width, dtype)
        gw_sum, gw_i = np.empty((k, width), dtype), np.empty((k, width), dtype)
        gb_sum, gb_i = np.empty(width, dtype), np.empty(width, dtype)
        for branch in range(K):
            reverse = branch == 1
            lo = branch * d + c0  # the out channel of x channel c0
            bias_c, newest = bias[lo:lo + width], w_t[k - 1, lo:lo + width]
            gw_sum[:] = 0
            gb_sum[:] = 0
            for i in range(batch):
                gw_i[:] = 0
                gb_i[:] = 0
                for t in range(length):
                    taps = min(k, length - t if reverse else t + 1)
                    x_t = xz[i, t, c0:c1]
                    for j in range(width):
                        o[j] = x_t[j] * newest[j] + bias_c[j]
                    for shift in range(1, taps):
                        s = t + shift if reverse else t - shift
                        x_s, w_s = xz[i, s, c0:c1], w_t[k - 1 - shift, lo:lo + width]
                        for j in range(width):
                            o[j] += x_s[j] * w_s[j]
                    go = gout[i, t, lo:lo + width]
                    for j in range(width):
                        g[j] = go[j] * _silu_grad(o[j])
                        gb_i[j] += g[j]
                    for shift in range(taps):
                        s = t + shift if reverse else t - shift
                        x_s, w_s = xz[i, s, c0:c1], w_t[k - 1 - shift, lo:lo + width]
                        gx_s, gw_s = gxz[i, s, c0:c1], gw_i[k - 1 - shift]
                        for j in range(width):
                            gw_s[j] += g[j] * x_s[j]
                            gx_s[j] += g[j] * w_s[j]
                gw_sum += gw_i
                gb_sum += gb_i
            gw_t[:, lo:lo + width] = gw_sum
            gbias[lo:lo + width] = gb_sum

    @numba.njit(inline='always')
    def _f5(data, i):
        return numba.carray(_float32_pointer(data[i]),
                            (data[i + 1], data[i + 2], data[i + 3], data[i + 4], data[i + 5]))


# -- launching ----------------------------------------------------------------------------------------------
#
# Each kernel runs as a task of ``scan_numba._launch`` (registered with ``scan_numba.register_kernel``; compiled at
# its first launch, so that importing this module compiles nothing); a float64 call (the tests' gradcheck) runs the
# numba function directly on one thread. A backward task adds its channels' dB and dC into partial number
# ``ticket`` (its task number), so ``tasks`` partials are allocated and summed after.

_LAYOUTS = {
    # u, delta, z, A2t, B, C, D, bias, h, y, states; flags: softplus | gate << 1, chunk
    'scan_train': (3, 3, 3, 2, 4, 4, 1, 1, 3, 3, 4),
    # u, delta, z, A2t, B, C, D, bias, states, gy, dh_last, gu, gdelta, gz, gA, gD, gbias, gB parts, gC parts
    'scan_backward': (3, 3, 3, 2, 4, 4, 1, 1, 4, 3, 3, 3, 3, 3, 2, 1, 1, 5, 5),
    # u, delta_f, delta_b, proj_f, proj_b, xz, A2t, D, bias, y, states; flags: rank, divide | chunk << 1
    'mixer_train': (3, 3, 3, 3, 3, 3, 2, 1, 1, 3, 4),
    # ... the same inputs, states, gy, gu, gdelta_f, gdelta_b, gproj parts, gxz, gA, gD, gbias; flags as above
    'mixer_backward': (3, 3, 3, 3, 3, 3, 2, 1, 1, 4, 3, 3, 3, 3, 5, 3, 2, 1, 1),
    # xz, w_t, bias, gout, gxz, gw_t, gbias
    'conv_backward': (3, 2, 1, 3, 3, 2, 1),
}


def _offsets(layout):
    """Where each array starts in a task's data vector: after [counter, tasks, units, flag, flag], each array
    takes 1 + ndim entries (address, shape)."""
    at, out = 5, []
    for ndim in layout:
        out.append(at)
        at += 1 + ndim
    return tuple(out)


_AT = {name: _offsets(layout) for name, layout in _LAYOUTS.items()}
_SCAN_TRAIN, _SCAN_BACKWARD = _AT['scan_train'], _AT['scan_backward']
_MIXER_TRAIN, _MIXER_BACKWARD, _CONV_BACKWARD = _AT['mixer_train'], _AT['mixer_backward'], _AT['conv_backward']


if numba is not None:
    # Each task reads its arrays at the offsets of its layout (module-level tuples: numba compiles their entries in
    # as constants). Compiled (or loaded from numba's cache) at a kernel's first launch, not at import.
    @compiled_task
    def scan_train_task(data):
        o = _SCAN_TRAIN
        c0, c1 = _task_bounds(_fetch_add(data, 1), data[1], data[2], 16)
        if c0 < c1:
            u = _f3(data, o[0])
            _scan_channels(u, _f3(data, o[1]), _f3(data, o[2]), _f2(data, o[3]), _f4(data, o[4]),
                           _f4(data, o[5]), _f1(data, o[6]), _f1(data, o[7]), _f3(data, o[8]), _f3(data, o[9]),
                           _f4(data, o[10]), data[3] & 1 != 0, data[3] & 2 != 0, data[4], c0, c1, 0, u.shape[1])

    @compiled_task
    def scan_backward_task(data):
        p = _SCAN_BACKWARD
        ticket = _fetch_add(data, 1)
        c0, c1 = _task_bounds(ticket, data[1], data[2], 16)
        if c0 < c1:
            _scan_backward_channels(
                _f3(data, p[0]), _f3(data, p[1]), _f3(data, p[2]), _f2(data, p[3]), _f4(data, p[4]), _f4(data, p[5]),
                _f1(data, p[6]), _f1(data, p[7]), _f4(data, p[8]), _f3(data, p[9]), _f3(data, p[10]),
                _f3(data, p[11]), _f3(data, p[12]), _f3(data, p[13]), _f2(data, p[14]), _f1(data, p[15]),
                _f1(data, p[16]), _f5(data, p[17])[ticket], _f5(data, p[18])[ticket], data[3] & 1 != 0,
                data[3] & 2 != 0, data[4], c0, c1)

    @compiled_task
    def mixer_train_task(data):
        q = _MIXER_TRAIN
        c0, c1 = _task_bounds(_fetch_add(data, 1), data[1], data[2], 16)
        if c0 < c1:
            _mixer_scan_channels(_f3(data, q[0]), _f3(data, q[1]), _f3(data, q[2]), _f3(data, q[3]), _f3(data, q[4]),
                                 _f3(data, q[5]), _f2(data, q[6]), _f1(data, q[7]), _f1(data, q[8]), _f3(data, q[9]),
                                 _f4(data, q[10]), data[3], data[4] & 1 != 0, data[4] >> 1, c0, c1)

    @compiled_task
    def mixer_backward_task(data):
        r = _MIXER_BACKWARD
        ticket = _fetch_add(data, 1)
        c0, c1 = _task_bounds(ticket, data[1], data[2], 16)
        if c0 < c1:
            _mixer_backward_channels(
                _f3(data, r[0]), _f3(data, r[1]), _f3(data, r[2]), _f3(data, r[3]), _f3(data, r[4]), _f3(data, r[5]),
                _f2(data, r[6]), _f1(data, r[7]), _f1(data, r[8]), _f4(data, r[9]), _f3(data, r[10]),
                _f3(data, r[11]), _f3(data, r[12]), _f3(data, r[13]), _f5(data, r[14])[ticket], _f3(data, r[15]),
                _f2(data, r[16]), _f1(data, r[17]), _f1(data, r[18]), data[3], data[4] & 1 != 0, data[4] >> 1,
                c0, c1)

    @compiled_task
    def conv_backward_task(data):
        w = _CONV_BACKWARD
        c0, c1 = _task_bounds(_fetch_add(data, 1), data[1], data[2], 16)
        if c0 < c1:
            _mixer_conv_backward_channels(_f3(data, w[0]), _f2(data, w[1]), _f1(data, w[2]), _f3(data, w[3]),
                                          _f3(data, w[4]), _f2(data, w[5]), _f1(data, w[6]), c0, c1)

    for name, task in (('scan_train', scan_train_task), ('scan_backward', scan_backward_task),
                       ('mixer_train', mixer_train_task), ('mixer_backward', mixer_backward_task),
                       ('conv_backward', conv_backward_task)):
        scan_numba.register_kernel(name, tuple((ndim, 'f4') for ndim in _LAYOUTS[name]), task)


def _tasks(units: int, work: int, dtype: torch.dtype) -> int:
    """How many tasks a call runs (what ``_launch`` would make of ``_thread_count``): one in float64."""
    if dtype == torch.float64:
        return 1
    return max(1, min(scan_numba._thread_count(work), units // 16))


def _run(name: str, tensors: Sequence[Tensor], flags: tuple, units: int, tasks: int) -> None:
    """Run kernel ``name`` on contiguous tensors (written in place), float32 through the launcher in ``tasks``
    tasks, float64 by a direct call."""
    arrays = [t.detach().numpy() for t in tensors]
    if tensors[0].dtype == torch.float32:
        scan_numba._launch(name, arrays, flags, units, tasks)
        return
    a, f0, f1 = arrays, flags[0] if flags else 0, flags[1] if len(flags) > 1 else 0
    if name == 'scan_train':
        _scan_channels(*a, f0 & 1 != 0, f0 & 2 != 0, f1, 0, units, 0, a[0].shape[1])
    elif name == 'scan_backward':
        _scan_backward_channels(*a[:17], a[17][0], a[18][0], f0 & 1 != 0, f0 & 2 != 0, f1, 0, units)
    elif name == 'mixer_train':
        _mixer_scan_channels(*a, f0, f1 & 1 != 0, f1 >> 1, 0, units)
    elif name == 'mixer_backward':
        _mixer_backward_channels(*a[:14], a[14][0], *a[15:], f0, f1 & 1 != 0, f1 >> 1, 0, units)
    elif name == 'conv':
        _mixer_conv_silu_channels(*a, 0, units)
    else:
        _mixer_conv_backward_channels(*a, 0, units)


def _parameters(A: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor], ct: torch.dtype):
    """A^T log2(e) (N, channels), D and delta_bias (zeros where absent), contiguous in the compute dtype."""
    A2t = (A.to(ct).t() * LOG2_E).contiguous()
    zeros = A2t.new_zeros(A2t.shape[1])
    return (A2t, D.to(ct).contiguous() if D is not None else zeros,
            delta_bias.to(ct).contiguous() if delta_bias is not None else zeros)


def _dtypes(*tensors: Optional[Tensor]) -> tuple:
    return tuple(t.dtype if t is not None else None for t in tensors)


def _grads(needed: Sequence[bool], dtypes: Sequence[Optional[torch.dtype]], grads: Sequence[Optional[Tensor]]):
    """The gradients autograd asked for, each in its input's dtype; None for the others."""
    return tuple(g.to(dtype) if need and dtype is not None and g is not None else None
                 for need, dtype, g in zip(needed, dtypes, grads, strict=True))


# -- the selective scan ----------------------------------------------------------------------------------------

class SelectiveScanCompiledFn(torch.autograd.Function):
    """``selective_scan`` (B, C per step with one group count) by the compiled loops, with their backward:
    returns (y in u's layout (time-major memory when u is), last state (batch, dim, N))."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        check_scan_args(u, delta, A, B, C, D, z, delta_bias)
        if not scan_kernel_takes(B, C):
            raise ValueError('SelectiveScanCompiledFn: B and C must be per step with the same number of groups')
        ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        batch, dim, length = u.shape
        N = A.shape[1]
        # (a copy, unless the caller's memory is time-major in the compute dtype already, as the Mamba mixer's)
        u_tm, delta_tm = _time_major(u, ct).contiguous(), _time_major(delta, ct).contiguous()
        z_tm = _time_major(z, ct).contiguous() if z is not None else None
        B_tm = _time_major_bc(B.to(ct), batch, dim, length)
        C_tm = _time_major_bc(C.to(ct), batch, dim, length)
        A2t, D_c, bias = _parameters(A, D, delta_bias, ct)
        y_tm = torch.empty(length, batch, dim, dtype=ct)
        h = torch.zeros(batch, N, dim, dtype=ct)
        states = torch.empty(-(-length // CHUNK), batch, N, dim, dtype=ct)
        flags = (int(delta_softplus) | int(z is not None) << 1, CHUNK)
        _run('scan_train', [u_tm, delta_tm, z_tm if z is not None else u_tm, A2t, B_tm, C_tm, D_c, bias, h, y_tm,
                            states], flags, dim, _tasks(dim, length * batch * dim * N, ct))
        ctx.save_for_backward(u_tm, delta_tm, z_tm, A2t, B_tm, C_tm, D_c, bias, states)
        ctx.flags, ctx.bc_dims = flags, (B.dim(), C.dim())
        ctx.dtypes = _dtypes(u, delta, A, B, C, D, z, delta_bias) + (None,)
        y = y_tm.permute(1, 2, 0)
        if not u.permute(2, 0, 1).is_contiguous():
            y = y.contiguous()
        return y.to(u.dtype), h.transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, g_last):
        u_tm, delta_tm, z_tm, A2t, B_tm, C_tm, D_c, bias, states = ctx.saved_tensors
        length, batch, dim = u_tm.shape
        N, ct = A2t.shape[0], u_tm.dtype
        gy_tm = _time_major(gy, ct).contiguous() if gy is not None else u_tm.new_zeros(length, batch, dim)
        dh_last = (g_last.to(ct).transpose(1, 2).contiguous() if g_last is not None
                   else u_tm.new_zeros(batch, N, dim))
        tasks = _tasks(dim, length * batch * dim * N, ct)
        gu, gdelta = torch.empty_like(u_tm), torch.empty_like(u_tm)
        gz = torch.empty_like(u_tm) if z_tm is not None else gu
        gA2t, gD, gbias = torch.empty_like(A2t), torch.empty_like(D_c), torch.empty_like(bias)
        gB = B_tm.new_zeros(tasks, *B_tm.shape)
        gC = C_tm.new_zeros(tasks, *C_tm.shape)
        _run('scan_backward', [u_tm, delta_tm, z_tm if z_tm is not None else u_tm, A2t, B_tm, C_tm, D_c, bias,
                               states, gy_tm, dh_last, gu, gdelta, gz, gA2t, gD, gbias, gB, gC], ctx.flags, dim, tasks)
        gB, gC = (g.sum(0) if tasks > 1 else g[0] for g in (gB, gC))  # (L, batch, G, N)
        # (batch, G, N, L), or (batch, N, L) for a B or C given without groups
        gB, gC = (g.permute(1, 2, 3, 0) if dims == 4 else g[:, :, 0].permute(1, 2, 0)
                  for g, dims in zip((gB, gC), ctx.bc_dims))
        return _grads(ctx.needs_input_grad, ctx.dtypes, (gu.permute(1, 2, 0), gdelta.permute(1, 2, 0), gA2t.t(), gB,
                                                          gC, gD, gz.permute(1, 2, 0), gbias, None))


def selective_scan_train(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                         z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False):
    """``selective_scan`` by the compiled loops under autograd (``scan_numba.selective_scan_compiled`` calls it
    when a gradient is needed): the arguments and results of ``selective_scan_ref``."""
    y, last = SelectiveScanCompiledFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (y, last) if return_last_state else y


# -- the Mamba mixer ------------------------------------------------------------------------------------------

class MixerScanCompiledFn(torch.autograd.Function):
    """``mamba_inner_scan`` by the compiled loops, with their backward. One branch: delta_b and proj_b None.
    Returns y (batch, L, d) in u's dtype."""

    @staticmethod
    def forward(ctx, u, delta_f, delta_b, proj_f, proj_b, xz, A, D, delta_bias, dt_rank, divide):
        batch, length, two_d = xz.shape
        d, N, K = two_d // 2, A.shape[1], 1 if delta_b is None else 2
        expected = {'u': (u, (batch, length, K * d)), 'A': (A, (K * d, N)), 'D': (D, (K * d,))}
        for name, t, shape in (('delta_f', delta_f, (batch, length, d)), ('delta_b', delta_b, (batch, length, d)),
                               ('proj_f', proj_f, (batch, length, dt_rank + 2 * N)),
                               ('proj_b', proj_b, (batch, length, dt_rank + 2 * N)), ('delta_bias', delta_bias,
                                                                                       (K * d,))):
            if t is not None:
                expected[name] = (t, shape)
        check_shapes('MixerScanCompiledFn', expected)
        if K == 2 and proj_b is None:
            raise ValueError('MixerScanCompiledFn: two branches need proj_b')
        ct = compute_dtype(u, delta_f, delta_b, proj_f, proj_b, xz, A, D, delta_bias)
        activations = [t.to(ct).contiguous() for t in (u, delta_f, delta_b if K == 2 else delta_f, proj_f,
                                                         proj_b if K == 2 else proj_f, xz)]
        A2t, D_c, bias = _parameters(A, D, delta_bias, ct)
        y = torch.empty(batch, length, d, dtype=ct)
        states = torch.empty(-(-length // CHUNK), batch, N, K * d, dtype=ct)
        flags = (dt_rank, int(divide) | CHUNK << 1)
        _run('mixer_train', activations + [A2t, D_c, bias, y, states], flags, d,
             _tasks(d, batch * length * K * d * N, ct))
        ctx.save_for_backward(*activations, A2t, D_c, bias, states)
        ctx.flags, ctx.K = flags, K
        ctx.dtypes = _dtypes(u, delta_f, delta_b, proj_f, proj_b, xz, A, D, delta_bias) + (None, None)
        return y.to(u.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        u, delta_f, delta_b, proj_f, proj_b, xz, A2t, D_c, bias, states = ctx.saved_tensors
        batch, length, two_d = xz.shape
        d, N, K = two_d // 2, A2t.shape[0], ctx.K
        ct = u.dtype
        tasks = _tasks(d, batch * length * K * d * N, ct)
        gu = torch.empty_like(u)
        gdelta_f = torch.empty_like(delta_f)
        gdelta_b = torch.empty_like(delta_b) if K == 2 else gdelta_f
        gproj = proj_f.new_zeros(tasks, K, *proj_f.shape)
        gxz = torch.zeros_like(xz)
        gA2t, gD, gbias = torch.empty_like(A2t), torch.empty_like(D_c), torch.empty_like(bias)
        _run('mixer_backward', [u, delta_f, delta_b, proj_f, proj_b, xz, A2t, D_c, bias, states,
                                gy.to(ct).contiguous(), gu, gdelta_f, gdelta_b, gproj, gxz, gA2t, gD, gbias],
             ctx.flags, d, tasks)
        gproj = gproj.sum(0) if tasks > 1 else gproj[0]
        return _grads(ctx.needs_input_grad, ctx.dtypes, (gu, gdelta_f, gdelta_b if K == 2 else None, gproj[0],
                                                         gproj[1] if K == 2 else None, gxz, gA2t.t(), gD, gbias,
                                                         None, None))


def mixer_scan_train(u: Tensor, deltas: Sequence[Tensor], projections: Sequence[Tensor], xz: Tensor, A: Tensor,
                     D: Tensor, delta_bias: Optional[Tensor], dt_rank: int, divide: bool = False) -> Tensor:
    """``mamba_inner_scan`` by the compiled loops under autograd (its arguments; ``mamba_inner`` calls it)."""
    K = len(deltas)
    if K not in (1, 2) or len(projections) != K:
        raise ValueError(f'mixer_scan_train: one or two branches, got {K} deltas and {len(projections)} projections')
    return MixerScanCompiledFn.apply(u, deltas[0], deltas[1] if K == 2 else None, projections[0],
                                     projections[1] if K == 2 else None, xz, A, D, delta_bias, dt_rank, divide)


class MixerInnerCompiledFn(torch.autograd.Function):
    """The Mamba mixer from in_proj's output to out_proj's input (the conv + SiLU, x_proj and dt_proj of one or both
    branches, and their gated scan) by the compiled loops and torch's GEMMs, keeping for the backward only xz,
    x_proj's outputs and the scan's chunk states: the conv's output u and the step sizes are recomputed there, as
    mamba_ssm's ``mamba_inner_fn`` does (checkpoint_lvl=1). Under autograd the module-call path keeps u (K d per
    token, also held by x_proj) and the step sizes (K d more) for every layer; a recompute costs a conv and the
    rank-wide dt_proj GEMM. One branch: the ``_b`` arguments None. Returns y (batch, L, d) in xz's dtype."""

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, x_weight_f, x_weight_b, dt_weight_f, dt_weight_b, dt_bias_f,
                dt_bias_b, A, D, dt_rank, divide):
        batch, length, two_d = xz.shape
        d, N, K = two_d // 2, A.shape[1], 1 if x_weight_b is None else 2
        R = dt_rank
        expected = {'conv_weight': (conv_weight, (K * d, 1, conv_weight.shape[-1])), 'A': (A, (K * d, N)),
                    'D': (D, (K * d,)), 'conv_bias': (conv_bias, (K * d,))}
        for suffix, xw, dw, db in (('f', x_weight_f, dt_weight_f, dt_bias_f), ('b', x_weight_b, dt_weight_b,
                                                                             dt_bias_b)):
            expected.update({f'x_weight_{suffix}': (xw, (R + 2 * N, d)), f'dt_weight_{suffix}': (dw, (d, R)),
                             f'dt_bias_{suffix}': (db, (d,))})
        check_shapes('MixerInnerCompiledFn', {k: v for k, v in expected.items() if v[0] is not None})
        if (x_weight_b is None) != (dt_weight_b is None):
            raise ValueError('MixerInnerCompiledFn: the backward branch needs both its x_proj and dt_proj weights')
        inputs = (xz, conv_weight, conv_bias, x_weight_f, x_weight_b, dt_weight_f, dt_weight_b, dt_bias_f,
                  dt_bias_b, A, D)
        ct = compute_dtype(*inputs)
        xz_c = xz.to(ct).contiguous()
        conv_w_t = conv_weight[:, 0, :].t().to(ct).contiguous()
        conv_b = conv_bias.to(ct).contiguous() if conv_bias is not None else conv_w_t.new_zeros(K * d)
        x_weights = [w.to(ct) for w in (x_weight_f, x_weight_b)[:K]]
        dt_weights = [w.to(ct) for w in (dt_weight_f, dt_weight_b)[:K]]
        dt_biases = [b.to(ct) if b is not None else None for b in (dt_bias_f, dt_bias_b)[:K]]
        u = _mixer_conv(xz_c, conv_w_t, conv_b)
        # the module path's calls (x_proj on u's branch view, dt_proj on the projections' first R), so its outputs
        projections = [torch.nn.functional.linear(u[..., k * d:(k + 1) * d], x_weights[k]) for k in range(K)]
        deltas = _step_sizes(projections, dt_weights, dt_biases, R)
        A2t, D_c, bias = _parameters(A, D, None, ct)
        y = torch.empty(batch, length, d, dtype=ct)
        states = torch.empty(-(-length // CHUNK), batch, N, K * d, dtype=ct)
        flags = (R, int(divide) | CHUNK << 1)
        activations = [u, deltas[0], deltas[-1], projections[0], projections[-1], xz_c]
        _run('mixer_train', activations + [A2t, D_c, bias, y, states], flags, d, _tasks(d, batch * length * K * d * N,
                                                                                      ct))
        ctx.save_for_backward(xz_c, conv_w_t, conv_b, *x_weights, *dt_weights, *dt_biases, *projections, A2t, D_c,
                              bias, states)
        ctx.flags, ctx.K = flags, K
        ctx.dtypes = _dtypes(*inputs) + (None, None)
        return y.to(xz.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        K = ctx.K
        xz, conv_w_t, conv_b, *rest = ctx.saved_tensors
        x_weights, dt_weights, dt_biases, projections = (rest[i * K:(i + 1) * K] for i in range(4))
        A2t, D_c, bias, states = rest[4 * K:]
        batch, length, two_d = xz.shape
        d, N, R, ct = two_d // 2, A2t.shape[0], ctx.flags[0], xz.dtype
        u = _mixer_conv(xz, conv_w_t, conv_b)
        deltas = _step_sizes(projections, dt_weights, dt_biases, R)
        tasks = _tasks(d, batch * length * K * d * N, ct)
        gu = torch.empty_like(u)
        gdeltas = [torch.empty_like(delta) for delta in deltas]
        gproj = projections[0].new_zeros(tasks, K, *projections[0].shape)
        gxz = torch.zeros_like(xz)
        gA2t, gD, gbias = torch.empty_like(A2t), torch.empty_like(D_c), torch.empty_like(bias)
        _run('mixer_backward', [u, deltas[0], deltas[-1], projections[0], projections[-1], xz, A2t, D_c, bias, states,
                                gy.to(ct).contiguous(), gu, gdeltas[0], gdeltas[-1], gproj, gxz, gA2t, gD, gbias],
             ctx.flags, d, tasks)
        gproj = gproj.sum(0) if tasks > 1 else gproj[0]  # (K, batch, L, R + 2N): dB and dC so far
        g_x_weights, g_dt_weights, g_dt_biases = [], [], []
        for k in range(K):
            g_delta = gdeltas[k].view(-1, d)
            g_proj = gproj[k].view(-1, R + 2 * N)
            rows = projections[k].view(-1, R + 2 * N)
            g_dt_weights.append(g_delta.t() @ rows[:, :R])
            g_dt_biases.append(g_delta.sum(0))
            g_proj[:, :R] = g_delta @ dt_weights[k]
            u_k = u[..., k * d:(k + 1) * d].reshape(-1, d)  # a view: u is contiguous
            g_x_weights.append(g_proj.t() @ u_k)
            gu[..., k * d:(k + 1) * d] += (g_proj @ x_weights[k]).view(batch, length, d)
        g_conv_w_t, g_conv_b = torch.empty_like(conv_w_t), torch.empty_like(conv_b)
        # the conv's backward adds x's gradient into gxz, whose z half the scan's backward wrote
        _run('conv_backward', [xz, conv_w_t, conv_b, gu, gxz, g_conv_w_t, g_conv_b], (), d,
             _tasks(d, batch * length * conv_w_t.shape[1], ct))
        pad = [None] * (2 - K)
        return _grads(ctx.needs_input_grad, ctx.dtypes,
                      (gxz, g_conv_w_t.t().unsqueeze(1), g_conv_b, *g_x_weights, *pad, *g_dt_weights, *pad,
                       *g_dt_biases, *pad, gA2t.t(), gD, None, None))


def _mixer_conv(xz: Tensor, w_t: Tensor, bias: Tensor) -> Tensor:
    """silu(conv) of xz's x half, both branches (batch, L, K d), by the inference kernel, split by out channels."""
    batch, length, channels = xz.shape[0], xz.shape[1], w_t.shape[1]
    out = torch.empty(batch, length, channels, dtype=xz.dtype)
    _run('conv', [xz, w_t, bias, out], (), channels, _tasks(channels, batch * length * channels, xz.dtype))
    return out


def _step_sizes(projections: Sequence[Tensor], dt_weights: Sequence[Tensor], dt_biases: Sequence[Optional[Tensor]],
                rank: int) -> list:
    """dt_proj of each branch's first ``rank`` projections (before softplus), contiguous (batch, L, d)."""
    return [torch.nn.functional.linear(p[..., :rank], w, b).contiguous()
            for p, w, b in zip(projections, dt_weights, dt_biases)]


def mixer_inner_train(xz: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], x_weights: Sequence[Tensor],
                      dt_weights: Sequence[Tensor], dt_biases: Sequence[Optional[Tensor]], A: Tensor, D: Tensor,
                      dt_rank: int, divide: bool = False) -> Tensor:
    """``mamba_inner_fused`` by the compiled loops under autograd (its arguments; ``mamba_inner`` calls it)."""
    K = len(x_weights)
    if K not in (1, 2) or len(dt_weights) != K or len(dt_biases) != K:
        raise ValueError(f'mixer_inner_train: one or two branches, got {K} x_proj, {len(dt_weights)} dt_proj weights '
                         f'and {len(dt_biases)} biases')
    second = (lambda seq: seq[1]) if K == 2 else (lambda seq: None)
    return MixerInnerCompiledFn.apply(xz, conv_weight, conv_bias, x_weights[0], second(x_weights), dt_weights[0],
                                      second(dt_weights), dt_biases[0], second(dt_biases), A, D, dt_rank, divide)


class MixerConvCompiledFn(torch.autograd.Function):
    """``mamba_inner_conv`` (silu of the depthwise causal conv, and Vim's anti-causal one) by the compiled loops,
    with their backward (the conv is recomputed there: nothing but the inputs is kept)."""

    @staticmethod
    def forward(ctx, xz, weight, bias):
        two_d = xz.shape[-1]
        d = two_d // 2
        if two_d % 2 or weight.dim() != 3 or weight.shape[0] not in (d, two_d) or weight.shape[1] != 1:
            raise ValueError(f'MixerConvCompiledFn: weight must be (d or 2 d, 1, k) for xz of {two_d} = 2 d '
                             f'channels, got {tuple(weight.shape)}')
        channels = weight.shape[0]
        if bias is not None:
            check_shapes('MixerConvCompiledFn', {'bias': (bias, (channels,))})
        ct = compute_dtype(xz, weight, bias)
        xz_c = xz.to(ct).contiguous()
        w_t = weight[:, 0, :].t().to(ct).contiguous()
        bias_c = bias.to(ct).contiguous() if bias is not None else w_t.new_zeros(channels)
        out = _mixer_conv(xz_c, w_t, bias_c)  # nothing to keep for the backward
        ctx.save_for_backward(xz_c, w_t, bias_c)
        ctx.dtypes = _dtypes(xz, weight, bias)
        return out.to(xz.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        xz, w_t, bias = ctx.saved_tensors
        batch, length, two_d = xz.shape
        d = two_d // 2
        gxz = torch.zeros_like(xz)
        gw_t, gbias = torch.empty_like(w_t), torch.empty_like(bias)
        _run('conv_backward', [xz, w_t, bias, gout.to(xz.dtype).contiguous(), gxz, gw_t, gbias], (), d,
             _tasks(d, batch * length * w_t.shape[1], xz.dtype))
        return _grads(ctx.needs_input_grad, ctx.dtypes, (gxz, gw_t.t().unsqueeze(1), gbias))


def mixer_conv_silu_train(xz: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``mamba_inner_conv`` by the compiled loops under autograd (``mamba_inner`` calls it)."""
    return MixerConvCompiledFn.apply(xz, weight, bias)
