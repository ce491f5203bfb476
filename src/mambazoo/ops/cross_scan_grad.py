"""VMamba's cross selective scan in training on a CPU: the compiled forward that keeps chunk-boundary states, and
the compiled backward that recomputes each chunk from them.

Why: under autograd ``cross_selective_scan`` used to take the pure-PyTorch path (traversed copies, the chunked
scan, whose backward is a PyTorch loop over time steps), which made VMamba-T train 2x slower than a Swin-T on a
CPU. Here both passes are numba loops in ``scan_numba``'s layout and thread machinery:

* forward: ``scan_numba._cross_scan_channels``, the inference loop (the directions read in place, delta
  projected per step, outputs summed at their tokens), given a ``states`` array: it then also stores each
  direction's state at the start of every chunk of T steps, T <= ``CHUNK_STEPS``: a (batch * K, L / T, N, d) tensor, nothing of size
  (batch, d, L, N);
* backward (``_cross_grad_channels``): per batch element and direction, the chunks from the last to the first;
  a chunk's states are recomputed from its first state into (T + 1, N, width) scratch (with the decays
  exp(delta A), the step sizes and softplus' slopes: about 4 T N width floats, cache-resident), then the adjoint
  recurrence dh_{t-1} = exp(delta_t A) (dh_t + C_t dy_t) runs back through it. Delta is recomputed from dts
  and dt_weight as the forward computes it (R multiply-adds per channel and step), not saved: a saved
  (batch, L, K, d) delta would be written once and read once, 2 * 4 bytes per channel-step of memory traffic at
  the large first stage, where R is smallest (6 in VMamba-T) and the recomputation cheapest; and training would
  hold one more activation of that size (4x x's) per block.

Accumulation: the parameter gradients (A, D, delta_bias, dt_weight) per channel in per-task buffers, summed
after the call; the gradients of dts, B and C are sums over channels per token and direction (dot products over
the task's channels, the only reductions across SIMD lanes: they live in ``_dot`` and ``_sum``, compiled with
reassociation so that they vectorise, while the kernels themselves keep ``scan_numba``'s exact-order arithmetic,
which its softplus needs); dx is summed over directions at each token, as the forward sums outputs.

Threads: the split of ``run_cross_scan_kernel`` (by batch elements, else directions, else channels, see
``scan_numba``'s "threads" section); each task writes its own slice of every output that another task could
also write (dx split by directions, the dts/B/C gradients split by channels, the parameter gradients always),
and the slices are summed after. The results do not depend on the thread count beyond float32 rounding.

The kernels are generic in the float type (scratch follows x's dtype): float32 runs through the OpenMP launch,
float64 (what ``gradcheck`` needs; the op's dispatch never sends float64 here) calls them directly on one
thread. Their exp2 and softplus are scan_numba's float32 approximations even in float64 (relative error about
3e-9 and 1e-7), well inside gradcheck's tolerances.
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .policy import compute_dtype
from .scan_numba import (CROSS_BY_BATCH, CROSS_BY_CHANNELS, CROSS_BY_DIRECTION, LOG2_E, _launch, _thread_count,
                         check_shapes, compiled_task, numba_importable, register_kernel)

__all__ = ['cross_selective_scan_train', 'CHUNK_STEPS']

CHUNK_STEPS = 64  # the longest chunk (measured: 16 to 128 within noise at VMamba-T's shapes; 64 saves few states)

# The arrays each kernel's task unpacks, (ndim, dtype), in order.
_TRAIN_LAYOUT = (
    (3, 'f4'),  # x (batch, L, d)
    (4, 'f4'),  # dbl (batch, L, K, R + 2N): dts, B, C per token and direction
    (3, 'f4'),  # dt_wt (K, R, d)
    (2, 'f4'),  # A2t (N, K d) = A^T log2(e)
    (1, 'f4'),  # D (K d,)
    (1, 'f4'),  # bias (K d,)
    (2, 'i8'),  # positions (K, L)
    (4, 'f4'),  # outs (parts, batch, L, d)
    (4, 'f4'),  # states (batch K, chunks, N, d)
)
_GRAD_LAYOUT = (
    (3, 'f4'),  # x
    (4, 'f4'),  # dbl
    (3, 'f4'),  # dt_wt
    (2, 'f4'),  # A2t
    (2, 'f4'),  # At (N, K d) = A^T
    (1, 'f4'),  # D
    (1, 'f4'),  # bias
    (2, 'i8'),  # positions
    (4, 'f4'),  # states
    (3, 'f4'),  # dout (batch, L, d)
    (4, 'f4'),  # dx (parts, batch, L, d)
    (4, 'f4'),  # ddbl (parts * batch, L, K, R + 2N)
    (3, 'f4'),  # dA (parts, N, K d), of A^T
    (3, 'f4'),  # dDb (parts, 2, K d): D's gradient, then delta_bias'
    (4, 'f4'),  # dWt (parts, K, R, d)
)


def _offsets(layout) -> tuple:
    """Where each array starts in a task's int64 vector: after [counter, tasks, units, flag, flag], each array
    takes its address and its shape."""
    offsets, at = [], 5
    for ndim, _ in layout:
        offsets.append(at)
        at += 1 + ndim
    return tuple(offsets)


_TRAIN_AT = _offsets(_TRAIN_LAYOUT)
_GRAD_AT = _offsets(_GRAD_LAYOUT)

if numba_importable():
    import numba

    from .scan_numba import (_cross_scan_channels, _cross_task_ranges, _exp2, _f1, _f2, _f3, _f4, _i2, _project,
                             _softplus)

    @numba.njit(fastmath={'contract', 'reassoc'}, error_model='numpy')
    def _sum(a):
        """sum_j a[j] (a non-empty), as ``_dot``."""
        acc = a[0]
        for j in range(1, a.shape[0]):
            acc += a[j]
        return acc

    @numba.njit(fastmath={'contract', 'reassoc'}, error_model='numpy')
    def _dot(a, b):
        """sum_j a[j] b[j] (a non-empty): a sum across SIMD lanes, so reassociation is allowed here (and only here;
        not inlined by numba, so the caller keeps its own flags; LLVM inlines it with its flags intact)."""
        acc = a[0] * b[0]
        for j in range(1, a.shape[0]):
            acc += a[j] * b[j]
        return acc

    @numba.njit(nogil=True, cache=True, fastmath={'contract'}, error_model='numpy')
    def _cross_grad_channels(x, dbl, dt_wt, A2t, At, D, bias, positions, states, dout, dx, ddbl, dA, dDb, dWt,
                             softplus, c0, c1, i0, i1, k0, k1):
        """The backward of ``scan_numba._cross_scan_channels`` (with states) for channels [c0, c1), batch elements [i0, i1), directions
        [k0, k1); every gradient is added into its array.

        dout: (batch, L, d) the output's gradient. dx: (batch, L, d), the sum over directions at each token.
        ddbl: (batch, L, K, R + 2N), the gradients of dts, B and C (sums over these channels). dA: (N, K d), of
        A^T; dDb: (2, K d), of D and delta_bias; dWt: (K, R, d), of dt_wt. At: (N, K d) = A^T.

        With a_t = exp(delta_t A), h_t = a_t h_{t-1} + delta_t u_t B_t, y_t = C_t h_t + D u_t, going back in
        time with g = dL/dy_t and dh = dL/dh_t (the part from later steps carried in ``carry``):
            dh = carry + C_t g;   carry <- a_t dh   (for step t - 1)
            ddelta = sum_n dh (h_{t-1} a_t A + u_t B_t);   dA += dh h_{t-1} a_t delta_t
            du = D g + sum_n dh delta_t B_t;   dB_t += sum_j dh delta_t u_t;   dC_t += sum_j g h_t
        then ddelta times softplus' slope (sigmoid) gives the raw step's gradient: delta_bias', dt_wt' (its outer
        product with the step's R inputs) and the R inputs' own (its product with dt_wt).
        """
        batch, length, dim = x.shape
        K, R = dt_wt.shape[0], dt_wt.shape[1]
        N = A2t.shape[0]
        chunks = states.shape[1]
        T = (length + chunks - 1) // chunks
        width = c1 - c0
        # Scratch is indexed in full (hs[s, n, j]), never sliced in the loops: a slice of an array numba allocated
        # costs an atomic reference count increment and decrement (the kernels' arguments, from the task, have
        # no reference count and are sliced freely).
        hs = np.empty((T + 1, N, width), x.dtype)  # hs[0]: the state before the chunk; hs[s + 1]: after step s
        decays = np.empty((T, N, width), x.dtype)  # exp(delta A)
        steps = np.empty((T, width), x.dtype)  # delta after bias and softplus
        slopes = np.empty((T, width), x.dtype)  # d delta / d (delta before softplus): sigmoid
        carry = np.empty((N, width), x.dtype)
        delta = np.empty(width, x.dtype)
        du = np.empty(width, x.dtype)
        dstep = np.empty(width, x.dtype)
        terms = np.empty(width, x.dtype)  # one token's terms of a sum over channels
        for i in range(i0, i1):
            for k in range(k0, k1):
                lo = k * dim + c0
                bias_k, D_k = bias[lo:lo + width], D[lo:lo + width]
                dD_k, dbias_k = dDb[0, lo:lo + width], dDb[1, lo:lo + width]
                saved = states[i * K + k]
                carry[:] = 0
                for c in range(chunks - 1, -1, -1):
                    t0, t1 = c * T, min(length, (c + 1) * T)
                    # 1. the chunk's steps and states again, from its first state
                    for n in range(N):
                        first = saved[c, n, c0:c1]
                        for j in range(width):
                            hs[0, n, j] = first[j]
                    for t in range(t0, t1):
                        s = t - t0
                        p = positions[k, t]
                        row = dbl[i, p, k]
                        u = x[i, p, c0:c1]
                        _project(delta, row, dt_wt[k], c0, c1)
                        if softplus:
                            for j in range(width):
                                raw = delta[j] + bias_k[j]
                                step = _softplus(raw)
                                steps[s, j] = step
                                # sigmoid(raw) = exp(raw - softplus(raw)): one exp2, no division; accurate at both
                                # ends (for raw >> 0 the cancellation errs by ulp(raw) on an exponent near 0)
                                slopes[s, j] = _exp2((raw - step) * np.float32(LOG2_E))
                        else:
                            for j in range(width):
                                steps[s, j] = delta[j] + bias_k[j]
                        for n in range(N):
                            b, a2_n = row[R + n], A2t[n, lo:lo + width]
                            for j in range(width):
                                decay = _exp2(steps[s, j] * a2_n[j])
                                decays[s, n, j] = decay
                                hs[s + 1, n, j] = decay * hs[s, n, j] + steps[s, j] * u[j] * b
                    # 2. the adjoint recurrence back through it
                    for t in range(t1 - 1, t0 - 1, -1):
                        s = t - t0
                        p = positions[k, t]
                        row, grow = dbl[i, p, k], ddbl[i, p, k]
                        u, g = x[i, p, c0:c1], dout[i, p, c0:c1]
                        for j in range(width):
                            du[j] = g[j] * D_k[j]
                            dD_k[j] += g[j] * u[j]
                            dstep[j] = 0
                        for n in range(N):
                            b, c_n = row[R + n], row[R + N + n]
                            a_n, dA_n = At[n, lo:lo + width], dA[n, lo:lo + width]
                            for j in range(width):
                                terms[j] = g[j] * hs[s + 1, n, j]
                            grow[R + N + n] += _sum(terms)
                            for j in range(width):
                                dh = carry[n, j] + g[j] * c_n
                                d_log_decay = dh * hs[s, n, j] * decays[s, n, j]
                                dstep[j] += d_log_decay * a_n[j] + dh * u[j] * b
                                dA_n[j] += d_log_decay * steps[s, j]
                                dh_step = dh * steps[s, j]
                                du[j] += dh_step * b
                                terms[j] = dh_step * u[j]
                                carry[n, j] = dh * decays[s, n, j]
                            grow[R + n] += _sum(terms)
                        if softplus:
                            for j in range(width):
                                dstep[j] *= slopes[s, j]
                        for j in range(width):
                            dbias_k[j] += dstep[j]
                        for r in range(R):
                            w_r, dW_r, r_r = dt_wt[k, r, c0:c1], dWt[k, r, c0:c1], row[r]
                            for j in range(width):
                                dW_r[j] += dstep[j] * r_r
                            grow[r] += _dot(dstep, w_r)
                        dx_p = dx[i, p, c0:c1]
                        for j in range(width):
                            dx_p[j] += du[j]

    @compiled_task
    def _cross_train_task(data):
        """Split by directions, task p adds into outs[p]."""
        o = _TRAIN_AT
        x, dt_wt, outs = _f3(data, o[0]), _f3(data, o[2]), _f4(data, o[7])
        c0, c1, i0, i1, k0, k1, part = _cross_task_ranges(data, x.shape[0], dt_wt.shape[0], x.shape[2])
        if c0 < c1 and i0 < i1 and k0 < k1:
            _cross_scan_channels(x, _f4(data, o[1]), dt_wt, _f2(data, o[3]), _f1(data, o[4]), _f1(data, o[5]),
                                 _i2(data, o[6]), outs[part if data[4] == CROSS_BY_DIRECTION else 0],
                                 _f4(data, o[8]), data[3] != 0, c0, c1, i0, i1, k0, k1)

    @compiled_task
    def _cross_grad_task(data):
        """Task p adds into dA[p], dDb[p], dWt[p]; into dx[p] when split by directions (tasks meet at every
        token), into ddbl's p-th block of batch elements when split by channels (tasks meet at every row)."""
        o = _GRAD_AT
        x, dt_wt = _f3(data, o[0]), _f3(data, o[2])
        batch = x.shape[0]
        c0, c1, i0, i1, k0, k1, part = _cross_task_ranges(data, batch, dt_wt.shape[0], x.shape[2])
        if c0 < c1 and i0 < i1 and k0 < k1:
            x_part = part if data[4] == CROSS_BY_DIRECTION else 0
            row_part = part if data[4] == CROSS_BY_CHANNELS else 0
            _cross_grad_channels(x, _f4(data, o[1]), dt_wt, _f2(data, o[3]), _f2(data, o[4]), _f1(data, o[5]),
                                 _f1(data, o[6]), _i2(data, o[7]), _f4(data, o[8]), _f3(data, o[9]),
                                 _f4(data, o[10])[x_part], _f4(data, o[11])[row_part * batch:(row_part + 1) * batch],
                                 _f3(data, o[12])[part], _f3(data, o[13])[part], _f4(data, o[14])[part],
                                 data[3] != 0, c0, c1, i0, i1, k0, k1)

    register_kernel('cross_train', _TRAIN_LAYOUT, _cross_train_task)
    register_kernel('cross_grad', _GRAD_LAYOUT, _cross_grad_task)


def _split(batch: int, K: int, dim: int, work: int, dtype: torch.dtype):
    """(split, units, align, tasks): ``run_cross_scan_kernel``'s choice (batch elements, else directions, else
    channels), and the task count ``_launch`` will use. float64 runs on one thread (not through the launch)."""
    threads = _thread_count(work) if dtype == torch.float32 else 1
    if threads > 1 and batch >= threads:
        split, units, align = CROSS_BY_BATCH, batch, 1
    elif threads > 1 and K >= threads:
        split, units, align = CROSS_BY_DIRECTION, K, 1
    else:
        split, units, align = CROSS_BY_CHANNELS, dim, 16
    return split, units, align, max(1, min(threads, units // align))


def _run(name: str, kernel, arrays: list, direct: list, softplus: bool, split: tuple) -> None:
    """Kernel ``name``: float32 through ``_launch`` over ``arrays`` (``split`` = (split, units, align, tasks));
    otherwise one direct call of the numba function ``kernel`` over every channel, batch element and direction,
    with ``direct`` (the arrays, those with a per-task leading dimension reduced to task 0's part)."""
    mode, units, align, tasks = split
    if arrays[0].dtype == torch.float32:
        _launch(name, [t.numpy() for t in arrays], (softplus, mode), units, tasks, align)
    else:
        batch, _, dim = arrays[0].shape
        kernel(*[t.numpy() for t in direct], softplus, 0, dim, 0, batch, 0, arrays[2].shape[0])


def _prepare(x, dts, dt_weight, A, B, C, D, delta_bias, positions):
    """Shape checks, and the kernels' operands in the compute dtype (float64 if any input is, else float32)."""
    batch, height, width, dim = x.shape
    length = height * width
    K, R, N = dt_weight.shape[0], dt_weight.shape[2], A.shape[1]
    expected = {'dts': (dts, (batch, height, width, K, R)), 'dt_weight': (dt_weight, (K, dim, R)),
                'A': (A, (K * dim, N)), 'B': (B, (batch, height, width, K, N)), 'C': (C, (batch, height, width, K, N)),
                'positions': (positions, (K, length))}
    for name, t in (('D', D), ('delta_bias', delta_bias)):
        if t is not None:
            expected[name] = (t, (K * dim,))
    check_shapes('cross_selective_scan_train', expected)
    if int(positions.min()) < 0 or int(positions.max()) >= length:
        raise ValueError(f'cross_selective_scan_train: positions must lie in [0, {length})')
    dtype = compute_dtype(x, dts, dt_weight, A, B, C, D, delta_bias)
    zeros = torch.zeros(K * dim, dtype=dtype)
    return dict(
        x=x.reshape(batch, length, dim).to(dtype).contiguous(),
        dbl=torch.cat((dts, B, C), dim=-1).reshape(batch, length, K, R + 2 * N).to(dtype).contiguous(),
        dt_wt=dt_weight.to(dtype).transpose(1, 2).contiguous(),
        A2t=(A.to(dtype).t() * LOG2_E).contiguous(), At=A.to(dtype).t().contiguous(),
        D=D.to(dtype).contiguous() if D is not None else zeros,
        bias=delta_bias.to(dtype).contiguous() if delta_bias is not None else zeros,
        positions=positions.to(torch.int64).contiguous())


class _CrossSelectiveScanTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus, positions):
        ops = _prepare(x, dts, dt_weight, A, B, C, D, delta_bias, positions)
        xs, dt_wt, A2t = ops['x'], ops['dt_wt'], ops['A2t']
        batch, length, dim = xs.shape
        K, N = dt_wt.shape[0], A2t.shape[0]
        chunks = -(-length // CHUNK_STEPS)
        split = _split(batch, K, dim, batch * length * K * dim * N, xs.dtype)
        parts = split[3] if split[0] == CROSS_BY_DIRECTION else 1
        outs = xs.new_zeros(parts, batch, length, dim)
        states = xs.new_empty(batch * K, chunks, N, dim)
        arrays = [xs, ops['dbl'], dt_wt, A2t, ops['D'], ops['bias'], ops['positions'], outs, states]
        _run('cross_train', _cross_scan_channels, arrays, arrays[:7] + [outs[0], states], delta_softplus, split)
        ctx.save_for_backward(xs, ops['dbl'], dt_wt, A2t, ops['At'], ops['D'], ops['bias'], ops['positions'], states)
        ctx.softplus = delta_softplus
        ctx.inputs = [(t.shape, t.dtype) if t is not None else None
                      for t in (x, dts, dt_weight, A, B, C, D, delta_bias)]
        out = outs[0] if parts == 1 else outs.sum(0)
        return out.view(x.shape).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xs, dbl, dt_wt, A2t, At, D, bias, positions, states = ctx.saved_tensors
        batch, length, dim = xs.shape
        K, R, N = dt_wt.shape[0], dt_wt.shape[1], A2t.shape[0]
        split = _split(batch, K, dim, batch * length * K * dim * N, xs.dtype)
        tasks = split[3]
        x_parts = tasks if split[0] == CROSS_BY_DIRECTION else 1
        row_parts = tasks if split[0] == CROSS_BY_CHANNELS else 1
        dx = xs.new_zeros(x_parts, batch, length, dim)
        ddbl = xs.new_zeros(row_parts * batch, length, K, R + 2 * N)
        dA = xs.new_zeros(tasks, N, K * dim)
        dDb = xs.new_zeros(tasks, 2, K * dim)
        dWt = xs.new_zeros(tasks, K, R, dim)
        dout = grad.reshape(batch, length, dim).to(xs.dtype).contiguous()
        arrays = [xs, dbl, dt_wt, A2t, At, D, bias, positions, states, dout, dx, ddbl, dA, dDb, dWt]
        task_0 = [dx[0], ddbl[:batch], dA[0], dDb[0], dWt[0]]
        _run('cross_grad', _cross_grad_channels, arrays, arrays[:10] + task_0, ctx.softplus, split)
        ddbl = ddbl if row_parts == 1 else ddbl.view(row_parts, batch, length, K, R + 2 * N).sum(0)
        dDb = dDb.sum(0)
        grads = (dx[0] if x_parts == 1 else dx.sum(0), ddbl[..., :R], dWt.sum(0).transpose(1, 2), dA.sum(0).t(),
                 ddbl[..., R:R + N], ddbl[..., R + N:], dDb[0], dDb[1])
        out = []
        for needed, g, spec in zip(ctx.needs_input_grad, grads, ctx.inputs):
            out.append(g.reshape(spec[0]).to(spec[1]) if needed and spec is not None else None)
        return (*out, None, None)


def cross_selective_scan_train(x: Tensor, dts: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                               positions: Tensor) -> Tensor:
    """``cross_selective_scan`` by the compiled loops, differentiable: what the op runs for float32 training on a
    CPU (float64 runs too, on one thread, for gradcheck).

    Arguments as ``cross_selective_scan``'s (x: (batch, H, W, d); dts: (batch, H, W, K, R); dt_weight: (K, d, R);
    A: (K d, N); B, C: (batch, H, W, K, N); D, delta_bias: (K d,) or None), and positions: (K, H W), the token of
    each direction's step (``cross_scan_index``). Returns (batch, H, W, d) in x's dtype. Gradients flow to every
    tensor input.
    """
    if not numba_importable():
        raise RuntimeError('cross_selective_scan_train needs numba')
    return _CrossSelectiveScanTrain.apply(x, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus, positions)
