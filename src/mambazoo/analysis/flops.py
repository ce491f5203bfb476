"""FLOPs of a model, counted the way the published tables of the Mamba vision papers count them.

Convention: the papers' "FLOPs" / "GFLOPs" / "MACs" columns are multiply-accumulates as fvcore counts them, so here
too ONE MULTIPLY-ADD IS ONE FLOP (multiply by 2 for arithmetic FLOPs). Matrix products and convolutions count
their multiply-adds (bias not counted), LayerNorm 5 per element (4 without affine), BatchNorm in eval 2 per element
(1 without affine), average pooling 1 per input element; activations, additions, reshapes and copies are free.
A selective scan over (batch, dim, L) with state size N counts 9 * batch * L * dim * N, plus batch * dim * L for
the D skip and again for the z gate (VMamba's ``flops_selective_scan_fn``, after state-spaces/mamba#110).
``F.scaled_dot_product_attention`` counts its two products, batch * heads * L * S * (E + Ev) (softmax free), and is
reported apart as 'attention': MambaVision's published figures were counted with ptflops, which does not see
that call, so they leave it out (see ``PUBLISHED_FLOPS``).

How: the model runs once under ``torch.utils.flop_counter.FlopCounterMode`` (which counts matrix products and
convolutions as 2 flops per multiply-add: we halve them), with norms and pooling added through its custom
mapping, while every ``mambazoo.ops.selective_scan`` call is routed to a counting stand-in that records the
formula above and returns a tensor of the right shape, and every ``F.scaled_dot_product_attention`` call to
another (the values of these stand-ins change no shape, so the count is the real model's; the stand-ins also keep
the kernels' internal products out of the count and make a count on the meta device equal to one on real tensors,
whatever attention kernel the device would pick). Building a model on the meta device (``count_model_flops``)
counts even the largest models in a fraction of a second.
"""
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from ..ops import get_scan_backend, register_scan_backend, set_scan_backend

__all__ = ['FlopCount', 'count_flops', 'count_model_flops', 'selective_scan_flops', 'attention_flops',
           'PublishedFlops', 'PUBLISHED_FLOPS', 'CONVENTION']

aten = torch.ops.aten
_COUNTING_BACKEND = '_flop_count'
CONVENTION = 'one multiply-add = 1 FLOP (MACs, as fvcore and the papers\' tables count)'
ATTENTION = 'attention'
SCAN = 'selective_scan'


@dataclass
class FlopCount:
    """FLOPs of one forward pass (one multiply-add = 1), in total, by operator, and for the modules asked for."""
    total: int
    by_op: Dict[str, int] = field(default_factory=dict)
    by_module: Dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    def total_without(self, ops: Sequence[str]) -> int:
        """The total less the operators ``ops`` (e.g. ('attention',) for MambaVision's published convention)."""
        return self.total - sum(self.by_op.get(op, 0) for op in ops)

    def __str__(self) -> str:
        parts = ', '.join(f'{k} {v / 1e9:.3f}G' for k, v in sorted(self.by_op.items(), key=lambda kv: -kv[1]))
        return f'{self.gflops:.3f} GFLOPs ({parts})'


@dataclass(frozen=True)
class PublishedFlops:
    """A FLOP count from a paper's table, in GFLOPs as printed, and the operators that table does not count."""
    gflops: float
    source: str
    excludes: Tuple[str, ...] = ()

    def matches(self, count: FlopCount, rel_tol: float = 0.03) -> bool:
        """Whether ``count`` (in this table's convention) is within ``rel_tol`` of the figure, or rounds to it at
        the printed precision (one decimal: MambaOut-femto's 1.156G prints as 1.2G, 3.7% away)."""
        ours = count.total_without(self.excludes) / 1e9
        return abs(ours - self.gflops) <= max(rel_tol * self.gflops, 0.05 + 1e-9)


_MAMBAVISION = ('MambaVision (Hatamizadeh & Kautz, CVPR 2025, arXiv:2407.08083) Table 1, counted with ptflops '
                '(NVlabs/MambaVision#21), which misses F.scaled_dot_product_attention')
_VMAMBA = 'VMamba (Liu et al., NeurIPS 2024, arXiv:2401.10166) Table 1, fvcore + the 9BLDN scan count'
_MAMBAOUT = 'MambaOut (Yu & Wang, CVPR 2025, arXiv:2405.07992) Table 1, "MACs"'

PUBLISHED_FLOPS: Dict[str, PublishedFlops] = {
    'mambavision_tiny': PublishedFlops(4.4, _MAMBAVISION, (ATTENTION,)),
    'mambavision_tiny2': PublishedFlops(5.1, _MAMBAVISION, (ATTENTION,)),
    'mambavision_small': PublishedFlops(7.5, _MAMBAVISION, (ATTENTION,)),
    'mambavision_base': PublishedFlops(15.0, _MAMBAVISION, (ATTENTION,)),
    'mambavision_large': PublishedFlops(34.9, _MAMBAVISION, (ATTENTION,)),
    'vmamba_tiny': PublishedFlops(4.9, _VMAMBA),
    'vmamba_small': PublishedFlops(8.7, _VMAMBA),
    'vmamba_base': PublishedFlops(15.4, _VMAMBA),
    'mambaout_femto': PublishedFlops(1.2, _MAMBAOUT),
    'mambaout_kobe': PublishedFlops(1.5, _MAMBAOUT),
    'mambaout_tiny': PublishedFlops(4.5, _MAMBAOUT),
    'mambaout_small': PublishedFlops(9.0, _MAMBAOUT),
    'mambaout_base': PublishedFlops(15.8, _MAMBAOUT),
}


def selective_scan_flops(batch: int, dim: int, length: int, d_state: int, with_d: bool = True,
                         with_z: bool = False) -> int:
    """9 * B * L * D * N for the recurrence and readout, + B * D * L each for the D skip and the z gate."""
    return 9 * batch * length * dim * d_state + (batch * dim * length if with_d else 0) + (
        batch * dim * length if with_z else 0)


def attention_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """softmax(q k^T) v: q (..., L, E), k (..., S, E), v (..., S, Ev) -> prod(...) * L * S * (E + Ev)."""
    *batch, length, embed = query_shape
    return prod(batch) * length * key_shape[-2] * (embed + value_shape[-1])


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


class _AttentionCounter(TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` calls and answers them with zeros of the output's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            names = ('query', 'key', 'value')
            q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
            self.flops += attention_flops(q.shape, k.shape, v.shape)
            return q.new_zeros(*q.shape[:-1], v.shape[-1])
        return func(*args, **kwargs)


class _ModuleFlops:
    """Forward hooks attributing the running count to named modules (nested calls of one module counted once)."""

    def __init__(self, model: nn.Module, names: Sequence[str], running_total) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f'no module named {missing[0]!r} in {type(model).__name__}')
        self.flops: Dict[str, int] = {n: 0 for n in names}
        self._starts: Dict[str, List[int]] = defaultdict(list)
        self._running_total = running_total
        self._handles = []
        for name in names:
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name), always_call=True))

    def _pre(self, name: str):
        def hook(module, args):
            self._starts[name].append(self._running_total())
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            start = self._starts[name].pop()
            if not self._starts[name]:
                self.flops[name] += self._running_total() - start
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def count_flops(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        batch_size: int = 1,
        inputs: Optional[Tensor] = None,
        modules: Sequence[str] = (),
) -> FlopCount:
    """FLOPs of ``model``'s forward pass (eval mode, no grad) on one input, in the published tables' convention.

    Args:
        model: any model; it is put in eval mode for the count and restored afterwards.
        input_size: (C, H, W) of a random input, when ``inputs`` is not given.
        batch_size: batch of that random input.
        inputs: the input batch to use instead.
        modules: names (as in ``model.named_modules()``) of modules whose share to report in ``by_module``.
    Returns:
        ``FlopCount``: ``total`` (one multiply-add = 1 flop), a per-operator split (the scan as 'selective_scan',
        fused attention as 'attention'), and ``by_module``.

    Works on the meta device too (shapes only, no memory). Not thread-safe: the scan backend is swapped
    process-wide for the duration of the count.
    """
    if inputs is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device('cpu')
        inputs = torch.randn(batch_size, *input_size, device=device)
    scan_counter = _ScanCounter()
    attention_counter = _AttentionCounter()
    mode = FlopCounterMode(display=False, custom_mapping=_EXTRA_OPS)

    def running_total() -> int:
        return mode.get_total_flops() // 2 + scan_counter.flops + attention_counter.flops

    module_flops = _ModuleFlops(model, modules, running_total)
    previous_backend = get_scan_backend()
    was_training = model.training
    register_scan_backend(_COUNTING_BACKEND, scan_counter)
    set_scan_backend(_COUNTING_BACKEND)
    try:
        model.eval()
        with torch.no_grad(), mode, attention_counter:
            model(inputs)
    finally:
        set_scan_backend(previous_backend)
        register_scan_backend(_COUNTING_BACKEND, None)
        model.train(was_training)
        module_flops.remove()
    by_op: Dict[str, int] = defaultdict(int)
    for op, n in mode.get_flop_counts().get('Global', {}).items():
        by_op[getattr(op, '__name__', str(op))] += n // 2
    if scan_counter.flops:
        by_op[SCAN] += scan_counter.flops
    if attention_counter.flops:
        by_op[ATTENTION] += attention_counter.flops
    return FlopCount(total=sum(by_op.values()), by_op=dict(by_op), by_module=module_flops.flops)


def count_model_flops(
        name: str,
        img_size: Optional[int] = None,
        batch_size: int = 1,
        device: str = 'meta',
        modules: Sequence[str] = (),
        **model_kwargs: Any,
) -> Tuple[FlopCount, int, nn.Module]:
    """Build the model ``name`` (a mambazoo name, else a timm one; on the meta device by default: no memory, no
    initialisation cost) for ``img_size`` and count its FLOPs there (default size: its pretrained input size).

    Returns the count, the number of parameters, and the (meta) model.
    """
    from ..models import create_any_model
    model = create_any_model(name, img_size, device=device, **model_kwargs)
    in_chans, height, width = getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))
    if img_size:
        height = width = img_size
    count = count_flops(model, input_size=(in_chans, height, width), batch_size=batch_size, modules=modules)
    return count, sum(p.numel() for p in model.parameters()), model
