"""Cross scan and cross merge: the four traversals of a 2-D map that VMamba's SS2D feeds to one selective scan.

For a map x of shape (B, C, H, W) with L = H * W tokens, ``cross_scan`` returns (B, 4, C, L):

    k = 0  row-major                 x[..., h, w] in order of (h, w)
    k = 1  column-major              x[..., h, w] in order of (w, h)
    k = 2  row-major, reversed       direction 0 read backwards
    k = 3  column-major, reversed    direction 1 read backwards

(the order of MzeroMiko/VMamba ``csm_triton.cross_scan_fn`` with ``scans=0``, so the stacked per-direction
parameters of the released checkpoints line up). ``cross_merge`` is its adjoint: it takes one sequence per
direction, (B, 4, C, L), puts every token back at its (h, w) place and sums the four, giving (B, C, H, W).
Because each is the other's transpose, each one's backward is the other's forward.

``cross_scan_index`` gives the four traversals as explicit index permutations of the row-major token order;
``cross_scan_ref`` / ``cross_merge_ref`` are the gather / scatter-add definitions built on it, the oracle the
fast versions are tested against.

``cross_scan_time_major`` / ``cross_merge_time_major`` are the same traversals in the layout the CPU scan walks,
and ``cross_selective_scan`` is the whole of SS2D's core (traverse, scan, merge): what VMamba calls. On a GPU it
runs as one Triton kernel that reads the traversals in place, and so does float32 CPU inference and training, as
numba-compiled loops (training's, with their backward, in ``cross_scan_grad``); the channel-major ``cross_scan`` /
``cross_merge`` remain as public ops in the official code's layout (MzeroMiko/VMamba's ``cross_scan_fn``), for
porting.
"""
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from .cross_scan_grad import cross_selective_scan_train
from .policy import choose_implementation, fx_leaf_call
from .scan_numba import run_cross_scan_kernel
from .scan_triton import cross_selective_scan_triton
from .selective_scan import selective_scan

__all__ = ['cross_scan', 'cross_merge', 'cross_scan_index', 'cross_scan_ref', 'cross_merge_ref',
           'cross_scan_time_major', 'cross_merge_time_major', 'cross_selective_scan']

NUM_DIRECTIONS = 4


def _check_map(x: Tensor) -> Tuple[int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f'cross_scan expects a map (B, C, H, W), got shape {tuple(x.shape)}')
    return tuple(x.shape)  # type: ignore[return-value]


def _check_sequences(ys: Tensor, height: int, width: int) -> Tuple[int, int]:
    if ys.dim() != 4 or ys.shape[1] != NUM_DIRECTIONS or ys.shape[3] != height * width:
        raise ValueError(f'cross_merge expects (B, 4, C, H*W) = (B, 4, C, {height * width}) for a {height}x{width} '
                         f'map, got shape {tuple(ys.shape)}')
    return ys.shape[0], ys.shape[2]


def _scan(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): two strided copies into one buffer, then its reversed half."""
    B, C, H, W = x.shape
    out = x.new_empty(B, NUM_DIRECTIONS, C, H * W)
    out[:, 0].view(B, C, H, W).copy_(x)
    out[:, 1].view(B, C, W, H).copy_(x.transpose(2, 3))
    out[:, 2:].copy_(out[:, :2].flip(-1))
    return out


def _merge(ys: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, C, H*W) -> (B, C, H, W): undo each traversal and sum."""
    B, _, C, L = ys.shape
    # A reversed traversal read backwards is the forward one: fold 2 into 0 and 3 into 1 first.
    both = ys[:, :2] + ys[:, 2:].flip(-1)
    return both[:, 0].view(B, C, height, width) + both[:, 1].view(B, C, width, height).transpose(2, 3)


class _CrossScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.hw = x.shape[-2:]
        return _scan(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _merge(grad, *ctx.hw)


class _CrossMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys: Tensor, height: int, width: int) -> Tensor:
        return _merge(ys, height, width)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _scan(grad), None, None


def cross_scan(x: Tensor) -> Tensor:
    """The four traversals of a map, stacked: (B, C, H, W) -> (B, 4, C, H*W), contiguous.

    Direction order: row-major, column-major, row-major reversed, column-major reversed. Differentiable
    (the backward is ``cross_merge``).
    """
    _check_map(x)
    return _CrossScan.apply(x)


def cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """The adjoint of ``cross_scan``: (B, 4, C, H*W) sequences -> their sum on the (B, C, H, W) grid.

    ``cross_merge(cross_scan(x), H, W) == 4 * x``. Differentiable (the backward is ``cross_scan``).
    """
    _check_sequences(ys, height, width)
    return _CrossMerge.apply(ys, height, width)


def cross_scan_index(height: int, width: int, device=None) -> Tensor:
    """(4, H*W) long: ``index[k, l]`` is the row-major position of the l-th token of direction k."""
    grid = torch.arange(height * width, device=device).view(height, width)
    row = grid.reshape(-1)
    col = grid.t().reshape(-1)
    return torch.stack([row, col, row.flip(0), col.flip(0)])


def cross_scan_ref(x: Tensor) -> Tensor:
    """``cross_scan`` as a gather with ``cross_scan_index`` (slow; the definition)."""
    B, C, H, W = _check_map(x)
    index = cross_scan_index(H, W, device=x.device)
    return torch.stack([x.reshape(B, C, H * W)[:, :, index[k]] for k in range(NUM_DIRECTIONS)], dim=1)


def cross_merge_ref(ys: Tensor, height: int, width: int) -> Tensor:
    """``cross_merge`` as a scatter-add with ``cross_scan_index`` (slow; the definition)."""
    B, C = _check_sequences(ys, height, width)
    index = cross_scan_index(height, width, device=ys.device)
    out = ys.new_zeros(B, C, height * width)
    for k in range(NUM_DIRECTIONS):
        out = out.index_add(2, index[k], ys[:, k])
    return out.view(B, C, height, width)


# ---------------------------------------------------------------------------------------------------------
# Time-major variants: the layout the selective scan walks, from and to a channels-last map.
#
# A channels-last map (B, H, W, C) read as tokens is (H, W, B, C) up to a permutation of B; the scan wants
# (L, B, channels) with one time step a contiguous slab. Built from channels-last memory, every copy below
# moves whole C-vectors, never a transpose of C with L: that is what makes them cheap on a CPU.

def cross_scan_time_major(x: Tensor) -> Tensor:
    """The four traversals, time-major: (B, H, W, C) -> (L, B, 4, C) contiguous, directions as ``cross_scan``.

    With a per-direction input (B, H, W, 4, C), direction k traverses its own slice x[..., k, :] (for
    quantities computed per direction before the traversal, e.g. VMamba's x_proj on the row-major tokens).
    """
    if x.dim() == 4:
        x = x.unsqueeze(3).expand(*x.shape[:3], NUM_DIRECTIONS, x.shape[3])
    if x.dim() != 5 or x.shape[3] != NUM_DIRECTIONS:
        raise ValueError(f'cross_scan_time_major expects (B, H, W, C) or (B, H, W, 4, C), got {tuple(x.shape)}')
    B, H, W, _, C = x.shape
    rows = x.permute(1, 2, 0, 3, 4)  # (H, W, B, 4, C): token order (h, w)
    cols = x.permute(2, 1, 0, 3, 4)  # (W, H, B, 4, C): token order (w, h)
    out = x.new_empty(H * W, B, NUM_DIRECTIONS, C)
    out[:, :, 0].view(H, W, B, C).copy_(rows[..., 0, :])
    out[:, :, 1].view(W, H, B, C).copy_(cols[..., 1, :])
    out[:, :, 2].view(H, W, B, C).copy_(rows[..., 2, :].flip(0, 1))
    out[:, :, 3].view(W, H, B, C).copy_(cols[..., 3, :].flip(0, 1))
    return out


def cross_merge_time_major(ys: Tensor, height: int, width: int) -> Tensor:
    """The adjoint of ``cross_scan_time_major`` (4-D form): (L, B, 4, C) -> (B, H, W, C), the four traversals
    put back on the grid and summed."""
    if ys.dim() != 4 or ys.shape[2] != NUM_DIRECTIONS or ys.shape[0] != height * width:
        raise ValueError(f'cross_merge_time_major expects (H*W, B, 4, C) = ({height * width}, B, 4, C), '
                         f'got {tuple(ys.shape)}')
    _, B, _, C = ys.shape
    rows = ys[:, :, 0] + ys[:, :, 2].flip(0)  # a reversed traversal read backwards is the forward one
    cols = ys[:, :, 1] + ys[:, :, 3].flip(0)
    grid = rows.view(height, width, B, C) + cols.view(width, height, B, C).transpose(0, 1)
    return grid.permute(2, 0, 1, 3)  # (B, H, W, C); a view, contiguous when B == 1


# ---------------------------------------------------------------------------------------------------------
# The whole four-direction selective scan of VMamba's SS2D.

@functools.lru_cache(maxsize=16)
def _positions(height: int, width: int) -> Tensor:
    """``cross_scan_index`` on the CPU, kept: the compiled cross scan asks for it at every call."""
    return cross_scan_index(height, width)


def cross_selective_scan(x: Tensor, dts: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                         delta_softplus: bool = False, backend: Optional[str] = None) -> Tensor:
    """Scan the four traversals of a map and merge them: VMamba's SS2D core, from per-token (row-major) inputs.

    Args:
        x: (batch, H, W, d) the map, channels last (any strides); every direction scans it.
        dts: (batch, H, W, 4, R) low-rank step sizes per token and direction; the step sizes are
            ``delta[..., k, :] = dts[..., k, :] @ dt_weight[k].T`` (Mamba's dt projection, without its bias).
        dt_weight: (4, d, R).
        A: (4 * d, N); D, delta_bias: (4 * d,), direction-major, as VMamba stores them.
        B, C: (batch, H, W, 4, N) per token and direction.
        backend: as ``selective_scan``'s (``ops.policy.choose_implementation`` decides). With the Triton backend
            the traversals are read in place by one fused kernel (``cross_selective_scan_triton``); so they are for
            float32 on a CPU, by numba's compiled loop (``scan_numba.run_cross_scan_kernel`` in inference; under
            autograd ``cross_scan_grad.cross_selective_scan_train``, which keeps chunk-boundary states for its
            compiled backward); otherwise (float64, torch.compile, the policy's compiled_cpu off) they are copied
            time-major (``cross_scan_time_major``) and the small per-token inputs are traversed before the
            step-size projection, which is cheaper than traversing its d-wide result.
    Returns:
        (batch, H, W, d): each direction's output put back on the grid, the four summed.
    """
    if torch.jit.is_scripting():
        return torch.ops.mambazoo.cross_selective_scan(x, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus,
                                                       backend)
    args = (x, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus, backend)
    traced = fx_leaf_call(cross_selective_scan, args, {})
    if traced is not None:
        return traced
    return _cross_selective_scan(*args)


@torch.library.custom_op('mambazoo::cross_selective_scan', mutates_args=())
def _cross_selective_scan_op(x: Tensor, dts: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                             backend: Optional[str]) -> Tensor:
    """``cross_selective_scan`` as a registered op, what TorchScript calls."""
    return _cross_selective_scan(x, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus, backend)


@_cross_selective_scan_op.register_fake
def _cross_selective_scan_fake(x, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _cross_selective_scan(x: Tensor, dts: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                          backend: Optional[str]) -> Tensor:
    batch, height, width, d_inner = x.shape
    length = height * width
    inputs = (x, dts, dt_weight, A, B, C, D, delta_bias)
    name = choose_implementation(inputs, backend, compiled_grad=True)
    if name == 'triton':
        delta = torch.einsum('bhwkr,kdr->bhwkd', dts, dt_weight)
        return cross_selective_scan_triton(x, delta, A, B, C, D, delta_bias, delta_softplus)
    if name == 'compiled' and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        # CPU training: the same compiled loop, keeping each direction's state at chunk starts for the compiled
        # backward (``cross_scan_grad``)
        return cross_selective_scan_train(x, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus,
                                          _positions(height, width))
    if name == 'compiled':
        # CPU inference: the compiled loop reads every direction's steps in place, projects their step sizes
        # and merges as it goes
        out = run_cross_scan_kernel(
            x.reshape(batch, length, d_inner).float(), dts.flatten(1, 2), dt_weight, A.float(), B.flatten(1, 2),
            C.flatten(1, 2), D, delta_bias, delta_softplus, _positions(height, width))
        return out.view(batch, height, width, d_inner).to(x.dtype)
    xs = cross_scan_time_major(x)  # (L, batch, 4, d)
    dts, B, C = (cross_scan_time_major(t) for t in (dts, B, C))  # (L, batch, 4, R or N)
    delta = torch.einsum('lbkr,kdr->lbkd', dts, dt_weight).reshape(length, batch, 4 * d_inner)
    ys = selective_scan(xs.view(length, batch, 4 * d_inner).permute(1, 2, 0), delta.permute(1, 2, 0), A,
                        B.permute(1, 2, 3, 0), C.permute(1, 2, 3, 0), D, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, backend=backend)  # (batch, 4d, L), time-major memory
    return cross_merge_time_major(ys.permute(2, 0, 1).reshape(length, batch, 4, d_inner), height, width)
