"""FLOPs of a model, counted the way the published tables of the Mamba vision papers count them.

Convention (fvcore's, which VMamba, MambaVision and Vim used for their tables): one multiply-add is ONE flop
("MACs-like"); matrix products and convolutions count their multiply-adds (bias not counted), LayerNorm 5 per
element (4 without affine), BatchNorm in eval 2 per element (1 without affine), average pooling 1 per input
element; activations, additions, reshapes and copies are free. A selective scan over (batch, dim, L) with
state size N counts 9 * batch * L * dim * N, plus batch * dim * L for the D skip and again for the z gate
(VMamba's ``flops_selective_scan_fn``, after state-spaces/mamba#110).

How: the model runs once under ``torch.utils.flop_counter.FlopCounterMode`` (which counts matrix products and
convolutions as 2 flops per multiply-add: we halve them), with norms and pooling added through its custom
mapping, while every ``mambazoo.ops.selective_scan`` call is routed to a counting stand-in that records the
formula above and returns a tensor of the right shape (the scan's values do not change any shape, so the
count is that of the real model; the stand-in also keeps the scan's internal products out of the count).
"""
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..ops import SCAN_BACKENDS, get_scan_backend, set_scan_backend

__all__ = ['FlopCount', 'count_flops', 'selective_scan_flops']

aten = torch.ops.aten
_COUNTING_BACKEND = '_flop_count'


@dataclass
class FlopCount:
    """FLOPs of one forward pass (one multiply-add = 1), in total and by operator."""
    total: int
    by_op: Dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    def __str__(self) -> str:
        parts = ', '.join(f'{k} {v / 1e9:.3f}G' for k, v in sorted(self.by_op.items(), key=lambda kv: -kv[1]))
        return f'{self.gflops:.3f} GFLOPs ({parts})'


def selective_scan_flops(batch: int, dim: int, length: int, d_state: int, with_d: bool = True,
                         with_z: bool = False) -> int:
    """9 * B * L * D * N for the recurrence and readout, + B * D * L each for the D skip and the z gate."""
    return 9 * batch * length * dim * d_state + (batch * dim * length if with_d else 0) + (
        batch * dim * length if with_z else 0)


def _layer_norm_flops(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return prod(input_shape) * (5 if weight_shape is not None else 4)


def _batch_norm_eval_flops(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return prod(input_shape) * (2 if weight_shape is not None else 1)


def _pool_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    return prod(input_shape)


# FlopCounterMode counts 2 per multiply-add; these counts are already fvcore's and get doubled here so that one
# halving at the end gives fvcore's figure for everything.
_EXTRA_OPS = {
    aten.native_layer_norm: lambda *a, **k: 2 * _layer_norm_flops(*a, **k),
    aten._native_batch_norm_legit_no_training: lambda *a, **k: 2 * _batch_norm_eval_flops(*a, **k),
    aten.mean: lambda *a, **k: 2 * _pool_flops(*a, **k),
    aten._adaptive_avg_pool2d: lambda *a, **k: 2 * _pool_flops(*a, **k),
}


class _ScanCounter:
    """A selective-scan backend that counts instead of scanning (output: D * u, gated by silu(z) if given)."""

    def __init__(self) -> None:
        self.flops = 0

    def __call__(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                 z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                 return_last_state: bool = False):
        batch, dim, length = u.shape
        self.flops += selective_scan_flops(batch, dim, length, A.shape[1], with_d=D is not None,
                                           with_z=z is not None)
        y = u * D[:, None] if D is not None else torch.zeros_like(u)
        if z is not None:
            y = y * torch.nn.functional.silu(z)
        return (y, u.new_zeros(batch, dim, A.shape[1])) if return_last_state else y


def count_flops(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        batch_size: int = 1,
        inputs: Optional[Tensor] = None,
) -> FlopCount:
    """FLOPs of ``model``'s forward pass (eval mode, no grad) on one input, in the published tables' convention.

    Args:
        model: any model; it is put in eval mode for the count and restored afterwards.
        input_size: (C, H, W) of a random input, when ``inputs`` is not given.
        batch_size: batch of that random input.
        inputs: the input batch to use instead.
    Returns:
        ``FlopCount``: ``total`` (one multiply-add = 1 flop) and a per-operator split.

    Works on the meta device too (shapes only, no memory). Not thread-safe: the scan backend is swapped
    process-wide for the duration of the count.
    """
    if inputs is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device('cpu')
        inputs = torch.randn(batch_size, *input_size, device=device)
    counter = _ScanCounter()
    previous_backend = get_scan_backend()
    was_training = model.training
    SCAN_BACKENDS[_COUNTING_BACKEND] = counter
    set_scan_backend(_COUNTING_BACKEND)
    try:
        model.eval()
        mode = FlopCounterMode(display=False, custom_mapping=_EXTRA_OPS)
        with torch.no_grad(), mode:
            model(inputs)
    finally:
        set_scan_backend(previous_backend)
        SCAN_BACKENDS.pop(_COUNTING_BACKEND, None)
        model.train(was_training)
    by_op: Dict[str, int] = defaultdict(int)
    for op, n in mode.get_flop_counts().get('Global', {}).items():
        by_op[getattr(op, '__name__', str(op))] += n // 2
    if counter.flops:
        by_op['selective_scan'] += counter.flops
    return FlopCount(total=sum(by_op.values()), by_op=dict(by_op))
