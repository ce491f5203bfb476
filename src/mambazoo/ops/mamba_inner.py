"""The Mamba mixer's fused inner ops, as mamba_ssm's ``mamba_inner_fn`` splits the block around its GEMMs.

The mixer (``models/_blocks.Mamba``) is in_proj -> ``mamba_inner_conv`` -> x_proj, dt_proj -> ``mamba_inner_scan``
-> out_proj. The projections stay ``nn.Linear`` module calls in the block (so hooks, quantization and every
other tool that works on linear layers sees them); the two ops take the rest:

* ``mamba_inner_conv``: the depthwise conv1d + SiLU of x (in_proj's first half). With Vim's second branch
  (bimamba 'v2'), its own conv reads the sequence backwards: in the original token order that is an anti-causal
  conv (zero padding after the sequence), so nothing is flipped.
* ``mamba_inner_scan``: the gated selective scan of one or both directions, the backward one from the last step,
  summed before the gate silu(z).

Each op picks its implementation in ``ops.policy.choose_implementation``: the compiled CPU loops of
``scan_numba`` for float32 on a CPU (in_proj's batch-major output read in place; under autograd with the compiled
backward of ``scan_numba_grad``), else plain PyTorch
(F.conv1d; one ``selective_scan`` call on both directions, the backward one flipped in time and stacked after
the forward one's channels), differentiable, on any device, with any scan backend.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .policy import choose_implementation, fx_leaf_call
from .scan_numba import check_shapes, run_mixer_conv_silu, run_mixer_scan
from .scan_numba_grad import mixer_conv_silu_train, mixer_scan_train, needs_grad
from .selective_scan import selective_scan

__all__ = ['mamba_inner_conv', 'mamba_inner_scan', 'mamba_inner_conv_ref', 'mamba_inner_scan_ref']


def _check_conv_args(xz: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if xz.dim() != 3 or xz.shape[-1] % 2:
        raise ValueError(f'xz must be (batch, L, 2 d), got {tuple(xz.shape)}')
    d = xz.shape[-1] // 2
    if weight.dim() != 3 or weight.shape[1] != 1 or weight.shape[0] not in (d, 2 * d):
        raise ValueError(f'weight must be (d or 2 d, 1, k) with d = {d}, got {tuple(weight.shape)}')
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f'bias must be ({weight.shape[0]},), got {tuple(bias.shape)}')


def mamba_inner_conv_ref(xz: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``mamba_inner_conv`` by F.conv1d (differentiable, any device and dtype)."""
    _check_conv_args(xz, weight, bias)
    length, d, k = xz.shape[1], xz.shape[-1] // 2, weight.shape[-1]
    x = xz[..., :d].transpose(1, 2)  # (batch, d, L)
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    outs = [F.conv1d(x, weight[:d], bias[:d] if bias is not None else None, padding=k - 1, groups=d)[..., :length]]
    if weight.shape[0] == 2 * d:
        # anti-causal: out[t] = sum_j w[j] x[t + k - 1 - j], a correlation with the reversed kernel, cut at the start
        outs.append(F.conv1d(x, weight[d:].flip(-1), bias[d:] if bias is not None else None, padding=k - 1,
                             groups=d)[..., k - 1:])
    return F.silu(torch.cat(outs, dim=1)).transpose(1, 2)


def mamba_inner_conv(xz: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: Optional[str] = None
                     ) -> Tensor:
    """silu(depthwise conv1d) of the Mamba mixer's x, batch-major.

    Args:
        xz: (batch, L, 2 d) in_proj's output; x is its first d channels.
        weight: (K d, 1, k) as ``nn.Conv1d`` stores it; K = 2 stacks Vim's backward branch after the forward one.
        bias: (K d,) or None.
        backend: override the policy's backend for this call.
    Returns:
        (batch, L, K d) in xz's dtype: channels [0, d) the causal conv of x, [d, 2 d) the anti-causal one.
    """
    if torch.jit.is_scripting():
        return torch.ops.mambazoo.mamba_inner_conv(xz, weight, bias, backend)
    traced = fx_leaf_call(mamba_inner_conv, (xz, weight, bias, backend), {})
    if traced is not None:
        return traced
    return _mamba_inner_conv(xz, weight, bias, backend)


def _mamba_inner_conv(xz: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str]) -> Tensor:
    if choose_implementation((xz, weight, bias), backend, compiled_grad=True) == 'compiled':
        _check_conv_args(xz, weight, bias)
        if needs_grad((xz, weight, bias)):
            return mixer_conv_silu_train(xz, weight, bias)
        return run_mixer_conv_silu(xz.float(), weight, bias).to(xz.dtype)
    return mamba_inner_conv_ref(xz, weight, bias)


def _check_scan_args(u: Tensor, deltas: List[Tensor], projections: List[Tensor], xz: Tensor, A: Tensor,
                     D: Tensor, delta_bias: Optional[Tensor], dt_rank: int) -> None:
    K = len(deltas)
    if K not in (1, 2) or len(projections) != K:
        raise ValueError(f'one or two branches: got {K} deltas and {len(projections)} projections')
    batch, length, two_d = xz.shape
    d, N = two_d // 2, A.shape[-1]
    expected = {'u': (u, (batch, length, K * d)), 'A': (A, (K * d, N)), 'D': (D, (K * d,))}
    if delta_bias is not None:
        expected['delta_bias'] = (delta_bias, (K * d,))
    for k in range(K):
        expected[f'deltas[{k}]'] = (deltas[k], (batch, length, d))
        expected[f'projections[{k}]'] = (projections[k], (batch, length, dt_rank + 2 * N))
    check_shapes('mamba_inner_scan', expected)


def mamba_inner_scan_ref(u: Tensor, deltas: List[Tensor], projections: List[Tensor], xz: Tensor, A: Tensor,
                         D: Tensor, delta_bias: Optional[Tensor], dt_rank: int, divide: bool = False,
                         backend: Optional[str] = None) -> Tensor:
    """``mamba_inner_scan`` by one ``selective_scan`` call (with ``backend``): the backward branch's inputs are
    flipped in time and stacked after the forward branch's channels, B and C as two channel groups."""
    _check_scan_args(u, deltas, projections, xz, A, D, delta_bias, dt_rank)
    K, d, N = len(deltas), xz.shape[-1] // 2, A.shape[-1]
    z = xz[..., d:]
    if K == 1:
        delta, z_all = deltas[0], z
        B = projections[0][..., dt_rank:dt_rank + N].transpose(1, 2)  # (batch, N, L)
        C = projections[0][..., dt_rank + N:].transpose(1, 2)
    else:
        u = torch.cat((u[..., :d], u[..., d:].flip(1)), dim=-1)
        delta = torch.cat((deltas[0], deltas[1].flip(1)), dim=-1)
        z_all = torch.cat((z, z.flip(1)), dim=-1)
        # (batch, L, 2 groups, N) -> (batch, G, N, L)
        B = torch.stack((projections[0][..., dt_rank:dt_rank + N], projections[1][..., dt_rank:dt_rank + N].flip(1)),
                        dim=2).permute(0, 2, 3, 1)
        C = torch.stack((projections[0][..., dt_rank + N:], projections[1][..., dt_rank + N:].flip(1)),
                        dim=2).permute(0, 2, 3, 1)
    y = selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, B, C, D, z=z_all.transpose(1, 2),
                       delta_bias=delta_bias, delta_softplus=True, backend=backend)
    y = y.transpose(1, 2)  # (batch, L, K d)
    if K == 2:
        y = y[..., :d] + y[..., d:].flip(1)
        if divide:
            y = y * 0.5
    return y


def mamba_inner_scan(u: Tensor, deltas: List[Tensor], projections: List[Tensor], xz: Tensor, A: Tensor, D: Tensor,
                     delta_bias: Optional[Tensor], dt_rank: int, divide: bool = False,
                     backend: Optional[str] = None) -> Tensor:
    """The Mamba mixer's gated selective scan (softplus on the step sizes), batch-major; with two branches (Vim's
    bimamba 'v2') both directions, summed before the gate.

    Args:
        u: (batch, L, K d) from ``mamba_inner_conv`` (K = 1 or 2 branches).
        deltas: K tensors (batch, L, d), dt_proj's outputs (step sizes before ``delta_bias`` and softplus).
        projections: K tensors (batch, L, dt_rank + 2N), x_proj's outputs: B and C follow the dt_rank inputs.
        xz: (batch, L, 2 d) in_proj's output; z is its last d channels.
        A: (K d, N); D: (K d,); delta_bias: (K d,) or None. Branch k uses channels [k d, (k + 1) d); the second
            reads the sequence backwards.
        divide: halve the sum of the two directions (Vim's ``if_divide_out``).
        backend: override the policy's backend for this call.
    Returns:
        (batch, L, d) in u's dtype: (y_1 + y_2) * silu(z).
    """
    if torch.jit.is_scripting():
        return torch.ops.mambazoo.mamba_inner_scan(u, deltas, projections, xz, A, D, delta_bias, dt_rank, divide,
                                                   backend)
    args = (u, deltas, projections, xz, A, D, delta_bias, dt_rank, divide, backend)
    traced = fx_leaf_call(mamba_inner_scan, args, {})
    if traced is not None:
        return traced
    return _mamba_inner_scan(*args)


def _mamba_inner_scan(u: Tensor, deltas: List[Tensor], projections: List[Tensor], xz: Tensor, A: Tensor, D: Tensor,
                      delta_bias: Optional[Tensor], dt_rank: int, divide: bool, backend: Optional[str]) -> Tensor:
    tensors = (u, *deltas, *projections, xz, A, D, delta_bias)
    name = choose_implementation(tensors, backend, compiled_grad=True)
    if name != 'compiled':
        return mamba_inner_scan_ref(u, deltas, projections, xz, A, D, delta_bias, dt_rank, divide, backend)
    _check_scan_args(u, deltas, projections, xz, A, D, delta_bias, dt_rank)
    if needs_grad(tensors):
        return mixer_scan_train(u, deltas, projections, xz, A, D, delta_bias, dt_rank, divide)
    bias = delta_bias if delta_bias is not None else D.new_zeros(D.shape)
    f32 = [t.float() for t in (u, *deltas, *projections, xz)]
    K = len(deltas)
    y = run_mixer_scan(f32[0], f32[1:1 + K], f32[1 + K:1 + 2 * K], f32[-1], A.float(), D, bias, dt_rank, divide)
    return y.to(u.dtype)


@torch.library.custom_op('mambazoo::mamba_inner_conv', mutates_args=())
def _mamba_inner_conv_op(xz: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """``mamba_inner_conv`` as a registered op, what TorchScript calls."""
    return _mamba_inner_conv(xz, weight, bias, backend)


@_mamba_inner_conv_op.register_fake
def _mamba_inner_conv_fake(xz, weight, bias, backend):
    return xz.new_empty(xz.shape[0], xz.shape[1], weight.shape[0])


@torch.library.custom_op('mambazoo::mamba_inner_scan', mutates_args=())
def _mamba_inner_scan_op(u: Tensor, deltas: List[Tensor], projections: List[Tensor], xz: Tensor, A: Tensor,
                         D: Tensor, delta_bias: Optional[Tensor], dt_rank: int, divide: bool,
                         backend: Optional[str]) -> Tensor:
    """``mamba_inner_scan`` as a registered op, what TorchScript calls."""
    return _mamba_inner_scan(u, deltas, projections, xz, A, D, delta_bias, dt_rank, divide, backend)


@_mamba_inner_scan_op.register_fake
def _mamba_inner_scan_fake(u, deltas, projections, xz, A, D, delta_bias, dt_rank, divide, backend):
    return u.new_empty(xz.shape[0], xz.shape[1], xz.shape[2] // 2)
