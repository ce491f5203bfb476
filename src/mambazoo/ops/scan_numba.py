"""Selective-scan inference on CPU as one compiled loop (numba).

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

Channels are split between ``torch.get_num_threads()`` threads (numba releases the GIL), so the kernel uses
the cores PyTorch was told to use, and no second thread pool (numba's own) competes with PyTorch's.
Float32 only; the callers (``scan_chunked``) use the pure-PyTorch path for float64 and for layouts this kernel
does not take (fixed B/C, different group counts for B and C).
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor

try:  # numba is a dependency, but the pure-PyTorch path covers a platform without its wheel
    import llvmlite.ir
    import numba
    import numpy as np
    from numba.core import types as numba_types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

__all__ = ['numba_available', 'run_scan_kernel']

LOG2_E = math.log2(math.e)


def numba_available() -> bool:
    """Whether the compiled CPU kernel can be used (numba importable, not turned off by MAMBAZOO_NUMBA=0)."""
    return numba is not None and os.environ.get('MAMBAZOO_NUMBA', '1') != '0'


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

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _scan_channels(u, delta, z, A2t, B, C, D, bias, h, y, softplus, gate, c0, c1):
        """The whole scan for channels [c0, c1), every batch and step.

        u, delta, z, y: (L, batch, dim) (z unused unless ``gate``). A2t: (N, dim) = A^T * log2(e).
        B, C: (L, batch, G, N), channel j in group j // (dim // G). D, bias: (dim,) (zeros when absent).
        h: (batch, N, dim), the state, updated in place. y = (sum_n C_n h_n + D u) * (silu(z) if gate).
        """
        length, batch, dim = u.shape
        groups, N = B.shape[2], B.shape[3]
        per_group = dim // groups
        step = np.empty(dim, np.float32)  # delta after bias and softplus
        step_u = np.empty(dim, np.float32)  # delta * u
        acc = np.empty(dim, np.float32)
        for i in range(batch):
            for t in range(length):
                for g in range(groups):
                    lo = max(c0, g * per_group)
                    hi = min(c1, (g + 1) * per_group)
                    if lo >= hi:
                        continue
                    # 1-D slices indexed from 0: numba then knows no index is negative (no wrap-around code)
                    # and LLVM vectorises the channel loops
                    delta_t, u_t, bias_g, D_g = delta[t, i, lo:hi], u[t, i, lo:hi], bias[lo:hi], D[lo:hi]
                    step_g, step_u_g, acc_g = step[lo:hi], step_u[lo:hi], acc[lo:hi]
                    if softplus:
                        for j in range(hi - lo):
                            step_g[j] = _softplus(delta_t[j] + bias_g[j])
                    else:
                        for j in range(hi - lo):
                            step_g[j] = delta_t[j] + bias_g[j]
                    for j in range(hi - lo):
                        step_u_g[j] = step_g[j] * u_t[j]
                        acc_g[j] = D_g[j] * u_t[j]
                    for n in range(N):
                        b = B[t, i, g, n]
                        c = C[t, i, g, n]
                        h_n, a_n = h[i, n, lo:hi], A2t[n, lo:hi]
                        for j in range(hi - lo):
                            state = _exp2(step_g[j] * a_n[j]) * h_n[j] + step_u_g[j] * b
                            h_n[j] = state
                            acc_g[j] += state * c
                    y_t = y[t, i, lo:hi]
                    if gate:
                        z_t = z[t, i, lo:hi]
                        for j in range(hi - lo):
                            zj = z_t[j]
                            y_t[j] = acc_g[j] * (zj / (np.float32(1.0) + _exp2(-zj * np.float32(LOG2_E))))
                    else:
                        for j in range(hi - lo):
                            y_t[j] = acc_g[j]


_pool: Optional[ThreadPoolExecutor] = None
_pool_pid = 0


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``workers`` threads; a new one in a forked child (e.g. a DataLoader
    worker), where the parent's threads do not exist and the parent's pool would never run anything."""
    global _pool, _pool_pid
    if _pool is None or _pool._max_workers < workers or _pool_pid != os.getpid():
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix='mambazoo-scan')
        _pool_pid = os.getpid()
    return _pool


def run_scan_kernel(u: Tensor, delta: Tensor, z: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor,
                    D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, h: Tensor,
                    y: Tensor) -> None:
    """Run the compiled scan: y (L, batch, dim) and the state h (batch, N, dim) are written in place.

    u, delta, z: float32 (L, batch, dim); A: (dim, N); B, C: float32 (L, batch, G, N); D, delta_bias: (dim,)
    or None; h holds the initial state (zeros for a scan from the start). h and y must be contiguous.
    """
    length, batch, dim = u.shape
    N = A.shape[1]
    # The compiled loop does no bounds checks: a wrong shape here would write outside an array.
    expected = {'u': (u, (length, batch, dim)), 'delta': (delta, (length, batch, dim)),
                'y': (y, (length, batch, dim)), 'A': (A, (dim, N)), 'h': (h, (batch, N, dim)),
                'B': (B, (length, batch, B.shape[2], N)), 'C': (C, (length, batch, B.shape[2], N))}
    if z is not None:
        expected['z'] = (z, (length, batch, dim))
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != shape:
            raise ValueError(f'run_scan_kernel: {name} must have shape {shape}, got {tuple(x.shape)}')
    if dim % B.shape[2]:
        raise ValueError(f'run_scan_kernel: {B.shape[2]} groups do not divide {dim} channels')
    for x in (h, y):
        if not x.is_contiguous():
            raise ValueError('run_scan_kernel writes h and y in place: they must be contiguous')
    A2t = (A.t() * LOG2_E).contiguous()
    zeros = A2t.new_zeros(dim)
    D = D.float() if D is not None else zeros
    bias = delta_bias.float() if delta_bias is not None else zeros
    gate = z is not None
    # C-contiguous arrays: numba compiles (and vectorises) one specialisation for them
    arrays = [x.contiguous().numpy() for x in (u, delta, z if gate else u, A2t, B, C, D, bias, h, y)]
    # Whole SIMD-width blocks of channels per thread; each thread writes only its channels.
    threads = max(1, min(torch.get_num_threads(), dim // 16))
    bounds = [dim * k // threads // 16 * 16 for k in range(threads)] + [dim]
    args = arrays + [delta_softplus, gate]
    if threads == 1:
        _scan_channels(*args, 0, dim)
        return
    pool = _thread_pool(threads - 1)
    futures = [pool.submit(_scan_channels, *args, bounds[k], bounds[k + 1]) for k in range(1, threads)]
    _scan_channels(*args, bounds[0], bounds[1])
    for f in futures:
        f.result()
