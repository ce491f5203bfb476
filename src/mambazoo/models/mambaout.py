"""MambaOut: stacked gated-CNN blocks, the Mamba block without its state space model.

Paper: "MambaOut: Do We Really Need Mamba for Vision?", Weihao Yu & Xinchao Wang, CVPR 2025
(https://arxiv.org/abs/2405.07992). Official code and weights: yuweihao/MambaOut (Apache-2.0); timm 1.0.31
ships the same network under its own module names, plus Ross Wightman's ``_rw`` variants. This is an independent
implementation in timm's module layout, the one the hub weights use: ``stem``, ``stages.{i}.downsample``,
``stages.{i}.blocks.{j}``, ``head.norm``, ``head.pre_logits.{fc,norm}``, ``head.fc``.

Layout: a two-conv stem (stride 4) and a 3x3 stride-2 conv + LayerNorm before each later stage; each stage is a
stack of gated CNN blocks that work channels-last (B, H, W, C); the head pools, normalises and runs an MLP.

The original release's checkpoints (``downsample_layers.{i}``, ``stages.{i}.{j}``, ``norm``,
``head.{fc1,norm,fc2}``) are renamed by ``checkpoint_filter_fn`` when they are loaded; ``convert_timm_to_original``
is the way back, for saving a model in the original layout.
"""
import re
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (ClNormMlpClassifierHead, DropPath, LayerNorm, LayerScale, calculate_drop_path_rates,
                         get_act_layer, get_device_dtype, trunc_normal_)
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from ._blocks import check_images
from ._builder import build_model, generate_default_cfgs, register_model

__all__ = [
    'MambaOut', 'GatedCNNBlock', 'MlpHead', 'convert_original_to_timm', 'convert_timm_to_original',
    'detect_key_layout', 'checkpoint_filter_fn',
]

LayerFn = Callable[..., nn.Module]
GLOBAL_POOLS = ('avg', '')


class Stem(nn.Module):
    """Two 3x3 stride-2 convs (from InternImage): (B, in_channels, H, W) -> channels-last (B, H/4, W/4, C).

    Args:
        in_channels: image channels.
        out_channels: channels of the first stage (the first conv gives half of them).
        act_layer: activation between the convs.
        norm_layer: LayerNorm over channels.
        mid_norm: normalise between the convs (the official stem does; timm's ``_rw`` variants do not).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            act_layer: LayerFn = nn.GELU,
            norm_layer: LayerFn = LayerNorm,
            mid_norm: bool = True,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = norm_layer(out_channels // 2) if mid_norm else None
        self.act = act_layer()
        self.conv2 = nn.Conv2d(out_channels // 2, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm2 = norm_layer(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if self.norm1 is not None:
            x = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.conv2(self.act(x))
        return self.norm2(x.permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """3x3 stride-2 conv between stages, channels-last in and out, with a LayerNorm after it (official) or
    before it (``norm_first``: timm's 'conv_nf', used by the ``_rw`` variants)."""

    norm_first: torch.jit.Final[bool]

    def __init__(self, in_channels: int, out_channels: int, norm_layer: LayerFn = LayerNorm, norm_first: bool = False):
        super().__init__()
        self.norm_first = norm_first
        if norm_first:
            self.norm = norm_layer(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        if not norm_first:
            self.norm = norm_layer(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = self.norm(x)
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x if self.norm_first else self.norm(x)


class MlpHead(nn.Module):
    """The official classifier on channels-last maps: pool -> norm -> fc -> act -> norm -> dropout -> fc.

    The official code keeps the first norm outside its head (``norm``) and names the rest ``head.fc1``,
    ``head.norm``, ``head.fc2``; timm's names, used here, are ``head.norm``, ``head.pre_logits.{fc,norm}``,
    ``head.fc``.

    Args:
        in_features: channels of the last stage.
        num_classes: outputs (0: no classifier, ``forward`` returns the hidden features).
        pool_type: 'avg' (global average over H and W) or '' (the head runs at every position).
        act_layer: activation of the MLP.
        mlp_ratio: hidden / in_features.
        norm_layer: norm of the pooled features.
        mlp_norm_layer: norm after the activation (None: ``norm_layer``).
        drop_rate: dropout before the classifier.
        bias: bias in the classifier.
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int = 1000,
            pool_type: str = 'avg',
            act_layer: LayerFn = nn.GELU,
            mlp_ratio: float = 4,
            norm_layer: LayerFn = LayerNorm,
            mlp_norm_layer: Optional[LayerFn] = None,
            drop_rate: float = 0.,
            bias: bool = True,
    ):
        super().__init__()
        hidden = int(mlp_ratio * in_features)
        self.pool_type = pool_type
        self.in_features = in_features
        self.num_features = hidden
        self.bias = bias
        self.norm = norm_layer(in_features)
        self.pre_logits = nn.Sequential(OrderedDict([
            ('fc', nn.Linear(in_features, hidden)),
            ('act', act_layer()),
            ('norm', (mlp_norm_layer or norm_layer)(hidden)),
        ]))
        self.head_dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden, num_classes, bias=bias) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: Optional[str] = None, reset_other: bool = False,
              in_features: Optional[int] = None) -> None:
        """New classifier; ``reset_other`` also drops the norm and the MLP (the head becomes a linear classifier)."""
        if pool_type is not None:
            self.pool_type = pool_type
        if reset_other:
            self.norm, self.pre_logits = nn.Identity(), nn.Identity()
            self.num_features = self.in_features = in_features or self.in_features
        dd = get_device_dtype(self)
        self.fc = nn.Linear(self.num_features, num_classes, bias=self.bias, **dd) if num_classes > 0 else nn.Identity()
        self.fc.train(self.training)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.pool_type == 'avg':
            x = x.mean((1, 2))
        x = self.head_dropout(self.pre_logits(self.norm(x)))
        return x if pre_logits else self.fc(x)


class GatedCNNBlock(nn.Module):
    """Gated CNN block on channels-last maps: x + fc2(act(g) * [i, dwconv(c)]) with (g, i, c) = fc1(norm(x)).

    fc1 gives 2 * hidden channels: the gate g (hidden), then i and c (hidden together); only the last
    int(conv_ratio * dim) channels c go through the depthwise conv (a partial conv, as in InceptionNeXt).
    (timm calls this block GatedConvBlock; the official code GatedCNNBlock.)

    Args:
        dim: channels.
        expansion_ratio: hidden / dim (int() of the product, as the official code).
        kernel_size: depthwise conv kernel.
        conv_ratio: conv channels / dim.
        norm_layer: pre-norm.
        act_layer: activation of the gate.
        drop_path: stochastic depth of the residual branch.
        ls_init_value: initial layer scale (None: no layer scale; timm's ``_rw`` variants use one).
    """

    def __init__(
            self,
            dim: int,
            expansion_ratio: float = 8 / 3,
            kernel_size: int = 7,
            conv_ratio: float = 1.0,
            norm_layer: LayerFn = LayerNorm,
            act_layer: LayerFn = nn.GELU,
            drop_path: float = 0.,
            ls_init_value: Optional[float] = None,
    ):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        if not 0 < conv_channels <= hidden:
            raise ValueError(f'conv_ratio {conv_ratio} gives {conv_channels} conv channels at dim {dim}; it must be '
                             f'between 1 and the hidden width {hidden} (expansion_ratio {expansion_ratio:g})')
        self.split_indices = (hidden, hidden - conv_channels, conv_channels)
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = act_layer()
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2,
                              groups=conv_channels)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, init_values=ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split_indices, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.fc2(self.act(g) * torch.cat((i, c), dim=-1))
        return self.drop_path(self.ls(x)) + shortcut


class MambaOutStage(nn.Module):
    """One stage, channels-last: its downsample layer (None: Identity, stage 0, after the model's stem), then
    ``depth`` gated CNN blocks.

    Args:
        dim: channels of the blocks.
        depth: number of blocks.
        downsample: the layer before the blocks (None: none).
        drop_path: stochastic depth per block (one value for all, or one per block).
        **block_kwargs: the blocks' other arguments (``GatedCNNBlock``).
    """

    def __init__(
            self,
            dim: int,
            depth: int,
            downsample: Optional[nn.Module] = None,
            drop_path: Union[float, Sequence[float]] = 0.,
            **block_kwargs: Any,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        drop_path = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.Sequential(*[GatedCNNBlock(dim, drop_path=drop_path[j], **block_kwargs)
                                      for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


# The official default of ``downsample_layers``: the stem, then a conv + post-norm before each later stage.
DOWNSAMPLE_LAYERS_FOUR_STAGES: List[LayerFn] = [Stem] + [Downsample] * 3


class MambaOut(nn.Module):
    """MambaOut in timm's module layout. The official constructor arguments (names and defaults), plus timm's for
    its ``_rw`` variants.

    The body works channels-last: ``forward_features`` returns (B, H/32, W/32, C) (``output_fmt`` 'NHWC', as
    timm), ``forward_intermediates`` and ``features_only`` give NCHW maps unless asked for NHWC.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        depths: blocks per stage (an int: one stage).
        dims: channels per stage.
        downsample_layers: callables ``(in_channels, out_channels) -> module`` for the layer before each stage,
            or one callable for all (the official argument; they are built with their own default norm and
            activation, as the official code does). The first becomes ``stem``, the others
            ``stages.{i}.downsample``. None: a ``Stem`` and ``Downsample`` layers built from ``norm_layer``,
            ``act_layer``, ``stem_mid_norm`` and ``downsample`` (as timm does).
        norm_layer: norm of the blocks, the downsample layers and inside the head's MLP.
        act_layer: activation of the blocks and the stem (a class or a timm name such as 'silu').
        conv_ratio: share of the channels that go through the depthwise conv.
        kernel_size: depthwise conv kernel.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        output_norm: norm of the pooled features, the first layer of the head (``head.norm``).
        head_fn: 'default' (or 'mlp', or the official ``MlpHead``: fc -> act -> norm -> fc) or 'norm_mlp'
            (timm's ``_rw`` head, without the norm inside the MLP).
        head_dropout: dropout before the classifier.
        expansion_ratio: hidden width of the blocks / dim (timm's argument; the official code fixes 8/3).
        stem_mid_norm: norm between the stem's convs (timm's argument; False in the ``_rw`` variants).
        downsample: 'conv' (official: conv, then norm) or 'conv_nf' (timm's ``_rw``: norm, then conv).
        ls_init_value: layer scale in every block with this initial value (timm's ``_rw`` variants); None: none.
        global_pool: 'avg', or '' for a head applied to every position of an unpooled map.
        drop_rate: timm's name for ``head_dropout`` (timm's training script passes it).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            depths: Union[int, Sequence[int]] = (3, 3, 9, 3),
            dims: Union[int, Sequence[int]] = (96, 192, 384, 576),
            downsample_layers: Optional[Union[LayerFn, Sequence[LayerFn]]] = None,
            norm_layer: LayerFn = LayerNorm,
            act_layer: Union[str, LayerFn] = nn.GELU,
            conv_ratio: float = 1.0,
            kernel_size: int = 7,
            drop_path_rate: float = 0.,
            output_norm: LayerFn = LayerNorm,
            head_fn: Union[str, LayerFn] = 'default',
            head_dropout: float = 0.,
            expansion_ratio: float = 8 / 3,
            stem_mid_norm: bool = True,
            downsample: str = 'conv',
            ls_init_value: Optional[float] = None,
            global_pool: str = 'avg',
            drop_rate: Optional[float] = None,
            **kwargs: Any,
    ):
        super().__init__()
        if kwargs:
            # The official class swallows unknown arguments silently; we say which ones are ignored.
            warnings.warn(f'MambaOut ignores unknown arguments: {sorted(kwargs)}', stacklevel=2)
        depths = [depths] if isinstance(depths, int) else list(depths)
        dims = [dims] if isinstance(dims, int) else list(dims)
        head_kind = _head_kind(head_fn)
        if len(depths) != len(dims) or not depths:
            raise ValueError(f'depths and dims need one entry per stage; got depths={depths}, dims={dims}')
        if downsample not in ('conv', 'conv_nf'):
            raise ValueError(f"downsample must be 'conv' or 'conv_nf', got {downsample!r}")
        _check_pool(global_pool)
        if downsample_layers is not None and (not stem_mid_norm or downsample != 'conv'):
            raise ValueError('give either downsample_layers or stem_mid_norm/downsample, not both')
        if drop_rate:
            if head_dropout and head_dropout != drop_rate:
                raise ValueError(f'drop_rate is another name for head_dropout; got {drop_rate} and {head_dropout}')
            head_dropout = drop_rate
        act_layer = get_act_layer(act_layer)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_stage = len(depths)
        self.global_pool = global_pool  # the head pools ('avg') or not (''): its pool_type, kept in step
        self.drop_rate = head_dropout
        self.output_fmt = 'NHWC'
        self.num_features = dims[-1]

        down = self._downsample_layers(downsample_layers, in_chans, dims, norm_layer, act_layer, stem_mid_norm,
                                       downsample)
        self.stem = down[0]
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)  # the official linspace, split
        self.stages = nn.Sequential(*[
            MambaOutStage(dims[i], depths[i], downsample=down[i] if i > 0 else None, drop_path=dpr[i],
                          expansion_ratio=expansion_ratio, kernel_size=kernel_size, conv_ratio=conv_ratio,
                          norm_layer=norm_layer, act_layer=act_layer, ls_init_value=ls_init_value)
            for i in range(len(depths))])
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')
                             for i in range(len(depths))]

        if head_kind == 'default':
            self.head = MlpHead(dims[-1], num_classes, pool_type=global_pool, norm_layer=output_norm,
                                mlp_norm_layer=norm_layer, drop_rate=head_dropout)
        else:  # timm's: norm -> fc -> act -> fc, with GELU whatever the blocks use
            self.head = ClNormMlpClassifierHead(dims[-1], num_classes, hidden_size=4 * dims[-1],
                                                pool_type=global_pool, norm_layer=output_norm, drop_rate=head_dropout)
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)

    @staticmethod
    def _downsample_layers(
            layers: Optional[Union[LayerFn, Sequence[LayerFn]]],
            in_chans: int,
            dims: List[int],
            norm_layer: LayerFn,
            act_layer: LayerFn,
            stem_mid_norm: bool,
            downsample: str,
    ) -> List[nn.Module]:
        in_dims = [in_chans] + dims[:-1]
        if layers is None:
            return [Stem(in_chans, dims[0], act_layer=act_layer, norm_layer=norm_layer, mid_norm=stem_mid_norm)] + [
                Downsample(in_dims[i], dims[i], norm_layer=norm_layer, norm_first=downsample == 'conv_nf')
                for i in range(1, len(dims))]
        layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(dims)
        if len(layers) < len(dims):
            raise ValueError(f'downsample_layers has {len(layers)} entries for {len(dims)} stages')
        return [layers[i](in_dims[i], dims[i]) for i in range(len(dims))]

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- timm model surface ------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Patterns over parameter names. Norms and layer scales are 1-D (timm's optimizer factory skips those
        # anyway); named for optimizers that do not.
        return {'*norm*', '*.ls.gamma'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)), (r'^stages\.(\d+)\.blocks\.(\d+)', None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """New classifier for ``num_classes``; ``reset_other`` also drops the head's norm and MLP."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> last-stage map, channels-last (B, ceil(H/32), ceil(W/32), num_features)."""
        check_images(x, self.in_chans, 'MambaOut', dtype=self.stem.conv1.weight.dtype)
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool (B, H, W, C) -> (B, C), norm, MLP, classifier. ``pre_logits``: the MLP's hidden features."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Each stage's output (strides 4, 8, 16, 32), as timm returns them.

        Args:
            indices: which stages (None: all; n: the last n; a list: those).
            norm: accepted for the timm API; MambaOut's only output norm acts on pooled features, so the
                maps are returned as they are.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' (default) or 'NHWC' (the body's own layout).
            intermediates_only: return only the list of maps.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f'output_fmt must be NCHW or NHWC, got {output_fmt!r}')
        check_images(x, self.in_chans, 'MambaOut', dtype=self.stem.conv1.weight.dtype)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last index (and the head) for feature extraction."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        self.num_stage = len(self.stages)
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices


def _head_kind(head_fn: Union[str, LayerFn]) -> str:
    if head_fn in ('default', 'mlp') or head_fn is MlpHead:
        return 'default'
    if head_fn == 'norm_mlp':
        return 'norm_mlp'
    raise ValueError(f"head_fn must be 'default' (the official MLP head) or 'norm_mlp' (timm's), got {head_fn!r}; "
                     f"for another head build the model with num_classes=0 and put yours after it")


def _check_pool(global_pool: str) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")


# ---------------------------------------------------------------------------------------------------------
# Checkpoints of the original release <-> timm's layout. Pure functions of the keys; values pass through.

# (pattern, replacement), first match wins; everything after the matched prefix is the same in both layouts.
_ORIGINAL_TO_TIMM = [
    (re.compile(r'^downsample_layers\.0\.'), 'stem.'),
    (re.compile(r'^downsample_layers\.(\d+)\.'), r'stages.\1.downsample.'),
    (re.compile(r'^stages\.(\d+)\.(\d+)\.'), r'stages.\1.blocks.\2.'),
    (re.compile(r'^norm\.'), 'head.norm.'),  # the output norm: timm moved it into the head
    (re.compile(r'^head\.fc1\.'), 'head.pre_logits.fc.'),
    (re.compile(r'^head\.norm\.'), 'head.pre_logits.norm.'),
    (re.compile(r'^head\.fc2\.'), 'head.fc.'),
]
_TIMM_TO_ORIGINAL = [
    (re.compile(r'^stem\.'), 'downsample_layers.0.'),
    (re.compile(r'^stages\.([1-9]\d*)\.downsample\.'), r'downsample_layers.\1.'),
    (re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.'), r'stages.\1.\2.'),
    (re.compile(r'^head\.norm\.'), 'norm.'),
    (re.compile(r'^head\.pre_logits\.fc\.'), 'head.fc1.'),
    (re.compile(r'^head\.pre_logits\.norm\.'), 'head.norm.'),
    (re.compile(r'^head\.fc\.'), 'head.fc2.'),
]

V = TypeVar('V')


def _rename(state_dict: Mapping[str, V], rules: List[Tuple[re.Pattern, str]], source: str,
            strict: bool) -> Dict[str, V]:
    out: Dict[str, V] = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            new_key, n = pattern.subn(replacement, key, count=1)
            if n:
                break
        else:
            if strict:
                raise ValueError(f'{key!r} is not a MambaOut key of the {source} layout')
            new_key = key
        if new_key in out:
            raise ValueError(f'two keys map to {new_key!r}: is the state dict a mix of both layouts?')
        out[new_key] = value
    return out


def convert_original_to_timm(state_dict: Mapping[str, V], strict: bool = True) -> Dict[str, V]:
    """Rename the keys of an original-release MambaOut state dict to timm's layout (values unchanged).

    ``strict``: raise on a key that is not an original MambaOut key; otherwise keep it as it is.
    """
    return _rename(state_dict, _ORIGINAL_TO_TIMM, 'original', strict)


def convert_timm_to_original(state_dict: Mapping[str, V], strict: bool = True) -> Dict[str, V]:
    """Rename the keys of a timm-layout MambaOut state dict (ours) to the original release's (values unchanged):
    ``torch.save(convert_timm_to_original(model.state_dict()), path)`` writes a file the official code loads.

    ``strict``: raise on a key that is not a timm MambaOut key; otherwise keep it as it is.
    """
    return _rename(state_dict, _TIMM_TO_ORIGINAL, 'timm', strict)


_ORIGINAL_MARK = re.compile(r'^(?:downsample_layers\.|stages\.\d+\.\d+\.)')
_TIMM_MARK = re.compile(r'^(?:stem\.|stages\.\d+\.(?:blocks|downsample)\.)')


def detect_key_layout(state_dict: Mapping[str, Any]) -> Optional[str]:
    """'original', 'timm', or None when the keys look like neither (or like both)."""
    original = any(_ORIGINAL_MARK.match(k) for k in state_dict)
    timm_like = any(_TIMM_MARK.match(k) for k in state_dict)
    if original == timm_like:
        return None
    return 'original' if original else 'timm'


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: Optional[nn.Module] = None) -> Dict[str, Tensor]:
    """A checkpoint in this module's layout (timm's): original-release keys renamed, timm's kept.

    Keys of neither layout are left for the strict loader to report. ``model`` is unused (timm's signature).
    """
    if isinstance(state_dict.get('model'), Mapping):  # the release .pth files as torch.load reads them
        state_dict = state_dict['model']
    if detect_key_layout(state_dict) == 'original':
        return convert_original_to_timm(state_dict, strict=False)
    return dict(state_dict)


# ---------------------------------------------------------------------------------------------------------
# Pretrained configurations, per weight tag (timm's, plus the original release's files)

_RELEASE = 'https://github.com/yuweihao/MambaOut/releases/download/model/'


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'test_input_size': (3, 288, 288), 'pool_size': (7, 7),
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head.fc', 'license': 'apache-2.0',
        'origin_url': 'https://github.com/yuweihao/MambaOut', 'paper_ids': 'arXiv:2405.07992',
        **kwargs,
    }


# timm's cfgs, one per 'name.tag' (the first tag of a name is its default); 'timm/' is the hub repository named
# after the name and tag. The original five also name the release file (``url``, original layout:
# ``checkpoint_filter_fn`` renames its keys on load); timm's hub copy is the same weights in timm's layout.
default_cfgs = generate_default_cfgs({
    'mambaout_femto.in1k': _cfg(_RELEASE + 'mambaout_femto.pth', hf_hub_id='timm/'),
    'mambaout_kobe.in1k': _cfg(_RELEASE + 'mambaout_kobe.pth', hf_hub_id='timm/'),
    'mambaout_tiny.in1k': _cfg(_RELEASE + 'mambaout_tiny.pth', hf_hub_id='timm/'),
    'mambaout_small.in1k': _cfg(_RELEASE + 'mambaout_small.pth', hf_hub_id='timm/'),
    'mambaout_base.in1k': _cfg(_RELEASE + 'mambaout_base.pth', hf_hub_id='timm/'),

    # timm's variants: weights on the hub only
    'mambaout_small_rw.sw_e450_in1k': _cfg(hf_hub_id='timm/'),
    'mambaout_base_short_rw.sw_e500_in1k': _cfg(hf_hub_id='timm/', crop_pct=0.95, test_crop_pct=1.0),
    'mambaout_base_tall_rw.sw_e500_in1k': _cfg(hf_hub_id='timm/', crop_pct=0.95, test_crop_pct=1.0),
    'mambaout_base_wide_rw.sw_e500_in1k': _cfg(hf_hub_id='timm/', crop_pct=0.95, test_crop_pct=1.0),
    'mambaout_base_plus_rw.sw_e150_in12k_ft_in1k': _cfg(hf_hub_id='timm/'),
    'mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k': _cfg(
        hf_hub_id='timm/', input_size=(3, 384, 384), test_input_size=(3, 384, 384), crop_mode='squash',
        pool_size=(12, 12)),
    'mambaout_base_plus_rw.sw_e150_in12k': _cfg(hf_hub_id='timm/', num_classes=11821),
    'test_mambaout': _cfg(input_size=(3, 160, 160), test_input_size=(3, 192, 192), pool_size=(5, 5)),
})


def _create_mambaout(variant: str, pretrained: bool = False, **kwargs: Any) -> MambaOut:
    return build_model(MambaOut, variant, pretrained, default_cfgs=default_cfgs,
                       checkpoint_filter_fn=checkpoint_filter_fn, **kwargs)


# timm's variants: partial conv wider than 1.0, norm-first downsampling, layer scale, 'norm_mlp' head.
_RW = dict(stem_mid_norm=False, downsample='conv_nf', ls_init_value=1e-6, head_fn='norm_mlp')


@register_model
def mambaout_femto(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """MambaOut-Femto (7.3M params, 1.2 GMACs, 78.9% top-1)."""
    args = dict(depths=[3, 3, 9, 3], dims=[48, 96, 192, 288])
    return _create_mambaout('mambaout_femto', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_kobe(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """MambaOut-Kobe, the Kobe memorial version with 24 blocks (9.1M params, 1.5 GMACs, 80.0% top-1)."""
    args = dict(depths=[3, 3, 15, 3], dims=[48, 96, 192, 288])
    return _create_mambaout('mambaout_kobe', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_tiny(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """MambaOut-Tiny (26.5M params, 4.5 GMACs, 82.7% top-1)."""
    args = dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 576])
    return _create_mambaout('mambaout_tiny', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_small(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """MambaOut-Small (48.5M params, 9.0 GMACs, 84.1% top-1)."""
    args = dict(depths=[3, 4, 27, 3], dims=[96, 192, 384, 576])
    return _create_mambaout('mambaout_small', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_base(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """MambaOut-Base (84.8M params, 15.8 GMACs, 84.2% top-1)."""
    args = dict(depths=[3, 4, 27, 3], dims=[128, 256, 512, 768])
    return _create_mambaout('mambaout_base', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_small_rw(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's MambaOut-Small variant (48.5M params)."""
    args = dict(_RW, depths=[3, 4, 27, 3], dims=[96, 192, 384, 576])
    return _create_mambaout('mambaout_small_rw', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_base_short_rw(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's shorter, wider-block MambaOut-Base (88.8M params)."""
    args = dict(_RW, depths=[3, 3, 25, 3], dims=[128, 256, 512, 768], expansion_ratio=3.0, conv_ratio=1.25)
    return _create_mambaout('mambaout_base_short_rw', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_base_tall_rw(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's deeper, narrower-block MambaOut-Base (86.5M params)."""
    args = dict(_RW, depths=[3, 4, 30, 3], dims=[128, 256, 512, 768], expansion_ratio=2.5, conv_ratio=1.25)
    return _create_mambaout('mambaout_base_tall_rw', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_base_wide_rw(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's wide-block MambaOut-Base with SiLU (94.4M params)."""
    args = dict(_RW, depths=[3, 4, 27, 3], dims=[128, 256, 512, 768], expansion_ratio=3.0, conv_ratio=1.5,
                act_layer='silu')
    return _create_mambaout('mambaout_base_wide_rw', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_base_plus_rw(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's MambaOut-Base+ with SiLU (101.7M params; ImageNet-12k pre-training)."""
    args = dict(_RW, depths=[3, 4, 30, 3], dims=[128, 256, 512, 768], expansion_ratio=3.0, conv_ratio=1.5,
                act_layer='silu')
    return _create_mambaout('mambaout_base_plus_rw', pretrained, **dict(args, **kwargs))


@register_model
def test_mambaout(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's tiny test configuration (0.45M params, no weights)."""
    args = dict(_RW, depths=[1, 1, 3, 1], dims=[16, 32, 48, 64], expansion_ratio=3, ls_init_value=1e-4,
                act_layer='silu')
    return _create_mambaout('test_mambaout', pretrained, **dict(args, **kwargs))
