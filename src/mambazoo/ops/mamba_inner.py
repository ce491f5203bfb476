"""The Mamba mixer's fused inner ops, as mamba_ssm's ``mamba_inner_fn`` splits the block around its GEMMs.

The mixer (``models/_blocks.Mamba``) is in_proj -> ``mamba_inner_conv`` -> x_proj, dt_proj -> ``mamba_inner_scan``
-> out_proj. The projections stay ``nn.Linear`` module calls in the block (so hooks, quantization and every
other tool that works on linear layers sees them); the two ops take the rest:

* ``mamba_inner_conv``: the depthwise conv1d + SiLU of x (in_proj's first half). With Vim's second branch
  (bimamba 'v2'), its own conv reads the sequence backwards: in the original token order that is an anti-causal
  conv (zero padding after the sequence), so nothing is flipped.
* ``mamba_inner_scan``: the gated selective scan of one or both directions, the backward one from the last step,
  summed before the gate silu(z).

For CPU training, ``mamba_inner_fused`` runs conv -> x_proj -> dt_proj -> scan as one op on the projections'
weights, which keeps only xz, x_proj's outputs and the scan's chunk states for the backward and recomputes the
rest there (mamba_ssm's ``mamba_inner_fn``): the module calls under autograd keep the conv's output and the step
sizes of every layer besides (Vim-T: 2 x 768 of its ~4,000 floats per token and layer). The block takes it only
where ``fused_inner_applies`` says the module calls would compute nothing else: plain ``nn.Linear`` projections
with no hooks, and a gradient to take by the compiled kernels.

Each op picks its implementation in ``ops.policy.choose_implementation``: the compiled CPU loops of
``scan_numba`` for float32 on a CPU (in_proj's batch-major output read in place; under autograd with the compiled
backward of ``scan_numba_grad``), else plain PyTorch
(F.conv1d; one ``selective_scan`` call on both directions, the backward one flipped in time and stacked after
the forward one's channels), differentiable, on any device, with any scan backend.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .policy import choose_implementation, fx_leaf_call
from .scan_numba import check_shapes, run_mixer_conv_silu, run_mixer_scan
from .scan_numba_grad import mixer_conv_silu_train, mixer_inner_train, mixer_scan_train, needs_grad
from .selective_scan import selective_scan

__all__ = ['mamba_inner_conv', 'mamba_inner_scan', 'mamba_inner_conv_ref', 'mamba_inner_scan_ref',
           'mamba_inner_fused', 'mamba_inner_fused_ref', 'fused_inner_applies']


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


def _inner_by_parts(xz: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], x_weights: Sequence[Tensor],
                    dt_weights: Sequence[Tensor], dt_biases: Sequence[Optional[Tensor]], A: Tensor, D: Tensor,
                    dt_rank: int, divide: bool, conv, scan) -> Tensor:
    """The mixer's inner part as the block's module calls compute it, with the ops ``conv`` and ``scan``."""
    d = xz.shape[-1] // 2
    u = conv(xz, conv_weight, conv_bias)
    projections = [F.linear(u[..., k * d:(k + 1) * d], w) for k, w in enumerate(x_weights)]
    deltas = [F.linear(p[..., :dt_rank], w, b) for p, w, b in zip(projections, dt_weights, dt_biases)]
    return scan(u, deltas, projections, xz, A, D, None, dt_rank, divide)


def mamba_inner_fused_ref(xz: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], x_weights: List[Tensor],
                          dt_weights: List[Tensor], dt_biases: List[Optional[Tensor]], A: Tensor, D: Tensor,
                          dt_rank: int, divide: bool = False) -> Tensor:
    """``mamba_inner_fused`` by the reference ops (F.conv1d, F.linear and one ``selective_scan`` call)."""
    return _inner_by_parts(xz, conv_weight, conv_bias, x_weights, dt_weights, dt_biases, A, D, dt_rank, divide,
                           mamba_inner_conv_ref, mamba_inner_scan_ref)


def mamba_inner_fused(xz: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], x_weights: List[Tensor],
                      dt_weights: List[Tensor], dt_biases: List[Optional[Tensor]], A: Tensor, D: Tensor,
                      dt_rank: int, divide: bool = False) -> Tensor:
    """The Mamba mixer from in_proj's output to out_proj's input: ``mamba_inner_conv``, x_proj (no bias) and dt_proj
    of each branch as ``F.linear`` on their weights, and ``mamba_inner_scan`` (no delta_bias: dt_proj has it).

    Args:
        xz: (batch, L, 2 d) in_proj's output.
        conv_weight, conv_bias: as ``mamba_inner_conv``'s (K branches stacked).
        x_weights: K x_proj weights (dt_rank + 2N, d); dt_weights: K dt_proj weights (d, dt_rank); dt_biases: K
            dt_proj biases (d,) or None.
        A, D, dt_rank, divide: as ``mamba_inner_scan``'s.
    Returns:
        (batch, L, d), equal to the module calls' result. Under autograd on the compiled CPU kernels it keeps only
        xz, x_proj's outputs and the scan's chunk states; elsewhere it runs the two ops and the GEMMs as the block
        would.
    """
    tensors = (xz, conv_weight, conv_bias, *x_weights, *dt_weights, *dt_biases, A, D)
    if choose_implementation(tensors, None, compiled_grad=True) == 'compiled' and needs_grad(tensors):
        return mixer_inner_train(xz, conv_weight, conv_bias, x_weights, dt_weights, dt_biases, A, D, dt_rank, divide)
    return _inner_by_parts(xz, conv_weight, conv_bias, x_weights, dt_weights, dt_biases, A, D, dt_rank, divide,
                           mamba_inner_conv, mamba_inner_scan)


def _plain_linear(module: nn.Module) -> bool:
    """Whether calling ``module`` computes exactly ``F.linear`` on its weight and bias: an ``nn.Linear`` itself (not
    a quantized, parametrized or other subclass) with no hooks of its own."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks
                                               or module._backward_hooks or module._backward_pre_hooks)


def fused_inner_applies(xz: Tensor, projections: Sequence[nn.Module]) -> bool:
    """Whether a Mamba block may compute its inner part by ``mamba_inner_fused`` on its projections' weights instead
    of calling them: a gradient is to be taken by the compiled kernels (the op's only gain is the memory kept for
    the backward), in float32 without autocast (the op's GEMMs run in float32, as the calls would), and each
    projection is a plain ``nn.Linear`` with no module hooks, its own or global, that its call would run (then its
    call and ``F.linear`` on its weights are the same computation)."""
    if isinstance(xz, torch.fx.Proxy) or not torch.is_grad_enabled() or torch.is_autocast_enabled(xz.device.type):
        return False
    hooks = nn.modules.module
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
            or hooks._global_backward_pre_hooks or not all(_plain_linear(m) for m in projections)):
        return False
    tensors = (xz, *(p for m in projections for p in (m.weight, m.bias) if p is not None))
    return (all(t.dtype == torch.float32 for t in tensors) and needs_grad(tensors)
            and choose_implementation(tensors, None, compiled_grad=True) == 'compiled')


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
