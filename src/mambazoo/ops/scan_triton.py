"""The selective scan on a GPU: Triton kernels behind a registered custom op.

``selective_scan_triton`` has ``selective_scan_ref``'s signature and semantics; the work is two fused kernels
(``scan_triton_kernels``): bias, softplus, the recurrence, the C contraction, D and the silu(z) gate in one pass
forward, and all gradients in one pass backward. Triton compiles them at first use: nothing is built at install.

The kernels are wrapped as the custom ops ``mambazoo::selective_scan_fwd`` / ``mambazoo::selective_scan_bwd``
(torch.library) with fake implementations and a registered autograd formula, so ``torch.compile`` traces a model
through the scan as one opaque node instead of breaking the graph.

Inputs may be float32, float16 or bfloat16 (the state and all accumulation are float32); float64 is left to the
pure-PyTorch paths. With ``TRITON_INTERPRET=1`` set before the first import of Triton, the same kernels run on CPU
tensors in Triton's interpreter: that is how the test suite checks them on machines without a GPU.
"""
import functools
import math
import os
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .scan_reference import check_scan_args

__all__ = ['selective_scan_triton', 'cross_selective_scan_triton', 'triton_available', 'scan_chunk_length']

_TILE_ELEMENTS = 4096  # elements of one (BLOCK_D, BLOCK_N, BLOCK_L) tile: 16 float32 values a thread at 8 warps
# 8 warps: with 4 every variant spills registers (ptxas for sm_90, tests/ops/compile_triton_kernels.py); untuned.
NUM_WARPS = 8


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of PyTorch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def scan_chunk_length(length: int, d_state: int) -> int:
    """Steps per chunk (BLOCK_L): the backward restarts from the state saved at every chunk start."""
    return max(16, min(_pow2(length), 128, _TILE_ELEMENTS // _pow2(d_state)))


def _block_sizes(length: int, d_state: int, dims_per_group: int, backward: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_L). The backward keeps about twice as many tiles live: half as many channels."""
    block_n = _pow2(d_state)
    block_l = scan_chunk_length(length, d_state)
    tile = _TILE_ELEMENTS // 2 if backward else _TILE_ELEMENTS
    block_d = max(1, min(_pow2(dims_per_group), tile // (block_n * block_l)))
    return block_d, block_n, block_l


def _bc_layout(M: Tensor) -> Tuple[bool, Tuple[int, int, int, int, int]]:
    """(fixed?, strides (batch, group, channel, n, step)) of B or C in any of its three layouts."""
    if M.dim() == 2:  # (dim, N)
        return True, (0, 0, M.stride(0), M.stride(1), 0)
    if M.dim() == 3:  # (batch, N, L)
        return False, (M.stride(0), 0, 0, M.stride(1), M.stride(2))
    return False, (M.stride(0), M.stride(1), 0, M.stride(2), M.stride(3))


def _groups(B: Tensor, C: Tensor, dim: int) -> Tuple[int, int, int]:
    """Channel groups of the launch (the fewest, lcm(G_B, G_C), in which all channels of a group share one B row and
    one C row), and for each matrix how many launch groups make one of its own groups."""
    g_b = 1 if B.dim() < 4 else B.shape[1]
    g_c = 1 if C.dim() < 4 else C.shape[1]
    groups = g_b * g_c // math.gcd(g_b, g_c)
    return groups, groups // g_b, groups // g_c


def _states_shape(u: Tensor, A: Tensor) -> Tuple[int, int, int, int]:
    batch, dim, length = u.shape
    n_chunks = -(-length // scan_chunk_length(length, A.shape[1]))
    return batch, dim, n_chunks + 1, A.shape[1]


def _launch_geometry(u: Tensor, A: Tensor, B: Tensor, C: Tensor, backward: bool = False):
    batch, dim, length = u.shape
    groups, ratio_b, ratio_c = _groups(B, C, dim)
    dims_per_group = dim // groups
    block_d, block_n, block_l = _block_sizes(length, A.shape[1], dims_per_group, backward)
    blocks_per_group = -(-dims_per_group // block_d)
    grid = (batch * groups * blocks_per_group,)
    return grid, groups, ratio_b, ratio_c, dims_per_group, blocks_per_group, (block_d, block_n, block_l)


def _output_like(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Uninitialised memory of x's shape and strides for a kernel to fill entirely (tests replace this with
    NaN-poisoned buffers)."""
    return torch.empty_like(x, dtype=dtype)


def _output(shape, like: Tensor) -> Tensor:
    """Uninitialised float32 memory for a kernel to fill entirely (poisoned in tests, as ``_output_like``)."""
    return torch.empty(shape, device=like.device, dtype=torch.float32)


def _dense(x: Optional[Tensor]) -> Optional[Tensor]:
    return x.contiguous() if x is not None else None


def _strides3(x: Optional[Tensor]) -> Tuple[int, int, int]:
    return tuple(x.stride()) if x is not None else (0, 0, 0)


@torch.library.custom_op('mambazoo::selective_scan_fwd', mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
              height: int, width: int) -> Tuple[Tensor, Tensor]:
    """out (batch, dim, L) and the float32 state at every chunk start plus the last (batch, dim, chunks+1, N).

    height, width > 0: a cross scan (``cross_selective_scan_triton``): u holds dim / 4 channels shared by the four
    directions, and out takes delta's layout; otherwise out takes u's.
    """
    from .scan_triton_kernels import selective_scan_fwd_kernel
    D, delta_bias = _dense(D), _dense(delta_bias)  # the kernels index them with unit stride
    cross = height > 0
    out = _output_like(delta if cross else u)
    states = _output(_states_shape(delta, A), u)
    grid, groups, ratio_b, ratio_c, dpg, bpg, (block_d, block_n, block_l) = _launch_geometry(delta, A, B, C)
    b_fixed, b_strides = _bc_layout(B)
    c_fixed, c_strides = _bc_layout(C)
    dummy = u  # stands for absent optional tensors (never read: their flags are off)
    selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, dummy if D is None else D, dummy if z is None else z,
        dummy if delta_bias is None else delta_bias, out, states,
        delta.shape[1], delta.shape[2], A.shape[1], dpg, states.shape[2] - 1, u.shape[1], height, width,
        *u.stride(), *delta.stride(), *_strides3(z), *out.stride(),
        *A.stride(), *b_strides, *c_strides,
        states.stride(0), states.stride(1), states.stride(2),
        groups, bpg, ratio_b, ratio_c,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        B_FIXED=b_fixed, C_FIXED=c_fixed, CROSS=cross, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l,
        num_warps=NUM_WARPS,
    )
    return out, states


@_scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, height, width):
    out = torch.empty_like(delta if height > 0 else u)
    return out, u.new_empty(_states_shape(delta, A), dtype=torch.float32)


@torch.library.custom_op('mambazoo::selective_scan_bwd', mutates_args=())
def _scan_bwd(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
              D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], states: Tensor,
              delta_softplus: bool, height: int, width: int) -> List[Tensor]:
    """[du, ddelta, dA, dB, dC, dD, dz, ddelta_bias], each in its input's dtype (empty where the input is absent)."""
    from .scan_triton_kernels import selective_scan_bwd_kernel
    D, delta_bias = _dense(D), _dense(delta_bias)
    batch, dim, length = delta.shape
    N = A.shape[1]
    cross = height > 0
    # du, ddelta and dz share the strides the kernel is given (delta's); cross scans: du per direction, summed below
    du, ddelta = _output_like(delta, u.dtype), _output_like(delta)
    dz = _output_like(delta, z.dtype) if z is not None else u.new_empty(0)
    dA = _output((batch, dim, N), u)
    unused = u.new_empty(0, dtype=torch.float32)

    def bc_grad(M):  # fixed: per batch element, summed below; per step: float32 atomics into zeros
        return _output((batch, dim, N), u) if M.dim() == 2 else torch.zeros(M.shape, device=u.device,
                                                                           dtype=torch.float32)
    dB, dC = bc_grad(B), bc_grad(C)
    dD = _output((batch, dim), u) if D is not None else unused
    dbias = _output((batch, dim), u) if delta_bias is not None else unused
    grid, groups, ratio_b, ratio_c, dpg, bpg, (block_d, block_n, block_l) = _launch_geometry(delta, A, B, C,
                                                                                             backward=True)
    b_fixed, b_strides = _bc_layout(B)
    c_fixed, c_strides = _bc_layout(C)
    # per-step dB / dC: (batch, group, n, step) strides of the atomics' targets (no channel axis); fixed: unused
    db_strides = (0, 0, 0, 0) if b_fixed else tuple(_bc_layout(dB)[1][i] for i in (0, 1, 3, 4))
    dc_strides = (0, 0, 0, 0) if c_fixed else tuple(_bc_layout(dC)[1][i] for i in (0, 1, 3, 4))
    dlast = dlast.contiguous() if dlast is not None else None
    selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
        states, dout, u if dlast is None else dlast,
        du, ddelta, du if z is None else dz, dA, dB, dC, dD, dbias,
        dim, length, N, dpg, states.shape[2] - 1, u.shape[1], height, width,
        *u.stride(), *delta.stride(), *_strides3(z), *dout.stride(),
        *A.stride(), *b_strides, *c_strides,
        states.stride(0), states.stride(1), states.stride(2),
        *du.stride(), *db_strides, *dc_strides,
        groups, bpg, ratio_b, ratio_c,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        B_FIXED=b_fixed, C_FIXED=c_fixed, CROSS=cross, HAS_DLAST=dlast is not None,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, num_warps=NUM_WARPS,
    )
    if cross:
        du = du.unflatten(1, (4, u.shape[1])).sum(1)
    dB = dB.sum(0) if b_fixed else dB
    dC = dC.sum(0) if c_fixed else dC
    return [du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else u.new_empty(0), dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0)]


@_scan_bwd.register_fake
def _scan_bwd_fake(dout, dlast, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, height, width):
    du = torch.empty_like(delta, dtype=u.dtype)  # the layouts _scan_bwd returns
    if height > 0:
        du = du.unflatten(1, (4, u.shape[1])).sum(1)
    return [du, torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), torch.empty_like(D) if D is not None else u.new_empty(0),
            torch.empty_like(delta, dtype=z.dtype) if z is not None else u.new_empty(0),
            torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty(0)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, height, width = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.delta_softplus, ctx.height, ctx.width = delta_softplus, height, width


def _backward(ctx, dout, dstates):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    dlast = dstates[:, :, -1] if dstates is not None else None  # only the last state is a user-visible output
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, states,
                                                      ctx.delta_softplus, ctx.height, ctx.width)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, None, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(
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
    """Selective scan with the semantics of ``selective_scan_ref``, on Triton kernels; differentiable in every input.

    Args:
        u, delta, z: (batch, dim, L), any strides (a time-major view stays time-major: the output takes u's layout).
        A: (dim, N), real.
        B, C: (dim, N), (batch, N, L) or (batch, G, N, L).
        D, delta_bias: (dim,).
    Returns:
        out (batch, dim, L) in u's dtype, and the float32 last state (batch, dim, N) if asked.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    _check_runnable(u, delta, A, B, C, D, z, delta_bias)
    out, states = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), 0, 0)
    return (out, states[:, :, -1]) if return_last_state else out


def _check_runnable(*tensors: Optional[Tensor]) -> None:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        raise ValueError('the Triton scan computes in float32: use the chunked or reference backend for float64')
    if not triton_available():
        raise RuntimeError('the Triton scan needs the triton package (it ships with CUDA builds of PyTorch)')
    if not tensors[0].is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
        raise ValueError(f'the Triton scan runs on CUDA tensors (got {tensors[0].device}); on CPU use the chunked '
                         'backend, or set TRITON_INTERPRET=1 before importing Triton to run the kernels interpreted')


def cross_selective_scan_triton(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                                delta_bias: Optional[Tensor] = None, delta_softplus: bool = False) -> Tensor:
    """VMamba's four-direction scan, fused: the traversals are read from the row-major map, never copied.

    Args:
        x: (batch, H, W, d) the map, channels last (any strides), shared by the four directions.
        delta: (batch, H, W, 4, d) step sizes per token and direction (before bias and softplus).
        A: (4 * d, N); D, delta_bias: (4 * d,), direction-major as VMamba stores them.
        B, C: (batch, H, W, 4, N) per token and direction.
    Returns:
        (batch, H, W, d): the four scans' outputs, each put back on the grid, summed (``cross_merge``).
    """
    batch, height, width, d_inner = x.shape
    L = height * width
    for name, M, size in (('delta', delta, d_inner), ('B', B, A.shape[1]), ('C', C, A.shape[1])):
        if tuple(M.shape) != (batch, height, width, 4, size):
            raise ValueError(f'{name} must be (batch, H, W, 4, {size}) = {(batch, height, width, 4, size)}, '
                             f'got {tuple(M.shape)}')
    if A.shape[0] != 4 * d_inner:
        raise ValueError(f'A must be (4 * d, N) = ({4 * d_inner}, N), got {tuple(A.shape)}')
    _check_runnable(x, delta, A, B, C, D, delta_bias)
    # (batch, channels, L) views of the row-major tensors; B and C as 4 groups, one per direction
    u = x.reshape(batch, L, d_inner).transpose(1, 2)
    delta = delta.reshape(batch, L, 4 * d_inner).transpose(1, 2)
    B = B.reshape(batch, L, 4, -1).permute(0, 2, 3, 1)
    C = C.reshape(batch, L, 4, -1).permute(0, 2, 3, 1)
    out, _ = _scan_fwd(u, delta, A, B, C, D, None, delta_bias, bool(delta_softplus), height, width)
    return out.transpose(1, 2).reshape(batch, height, width, 4, d_inner).sum(3)
