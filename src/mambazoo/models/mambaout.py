"""MambaOut: stacked gated-CNN blocks, the Mamba block without its state space model.

Paper: "MambaOut: Do We Really Need Mamba for Vision?", Weihao Yu & Xinchao Wang, CVPR 2025
(https://arxiv.org/abs/2405.07992). Official code and weights: yuweihao/MambaOut (Apache-2.0); timm 1.0.31
ships the same network under another key layout plus Ross Wightman's ``_rw`` variants. This is an independent
implementation that builds either key layout and computes the official forward pass.

Layout: a two-conv stem (stride 4) and a 3x3 stride-2 conv + LayerNorm before each later stage; each stage is a
stack of gated CNN blocks that work channels-last (B, H, W, C); the head pools, normalises and runs an MLP.

Two key layouts, one network (``key_layout``):
- 'original' (the release .pth files): ``downsample_layers.{i}``, ``stages.{i}.{j}``, ``norm``,
  ``head.{fc1,norm,fc2}``.
- 'timm' (timm's hub weights): ``stem``, ``stages.{i}.downsample``, ``stages.{i}.blocks.{j}``,
  ``head.norm``, ``head.pre_logits.{fc,norm}``, ``head.fc``.
``convert_original_to_timm`` / ``convert_timm_to_original`` map one onto the other, and ``checkpoint_filter_fn``
converts a checkpoint to the layout of the model it is loaded into. The five official variants build the
original layout; the ``_rw`` variants (whose layer-scale keys have no original name) build timm's.
"""
import re
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, LayerScale, calculate_drop_path_rates, get_act_layer, trunc_normal_
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from ._builder import build_model, register_model

__all__ = [
    'MambaOut', 'GatedCNNBlock', 'MlpHead', 'convert_original_to_timm', 'convert_timm_to_original',
    'detect_key_layout', 'checkpoint_filter_fn',
]

KEY_LAYOUTS = ('original', 'timm')
LayerFn = Callable[..., nn.Module]


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


class GatedCNNBlock(nn.Module):
    """Gated CNN block on channels-last maps: x + fc2(act(g) * [i, dwconv(c)]) with (g, i, c) = fc1(norm(x)).

    fc1 gives 2 * hidden channels: the gate g (hidden), then i and c (hidden together); only the last
    int(conv_ratio * dim) channels c go through the depthwise conv (a partial conv, as in InceptionNeXt).

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


class MlpHead(nn.Module):
    """The official classifier on pooled, normalised features: fc1 -> act -> norm -> dropout -> fc2.

    Args:
        dim: input features.
        num_classes: outputs (0: no classifier, ``forward`` returns the hidden features).
        act_layer: activation.
        mlp_ratio: hidden / dim.
        norm_layer: norm after the activation (None: none, timm's 'norm_mlp' head of the ``_rw`` variants).
        head_dropout: dropout before fc2.
        bias: biases in fc1 and fc2.
    """

    def __init__(
            self,
            dim: int,
            num_classes: int = 1000,
            act_layer: LayerFn = nn.GELU,
            mlp_ratio: float = 4,
            norm_layer: Optional[LayerFn] = LayerNorm,
            head_dropout: float = 0.,
            bias: bool = True,
    ):
        super().__init__()
        self.in_features = dim
        self.num_features = int(mlp_ratio * dim)
        self.bias = bias
        self.fc1 = nn.Linear(dim, self.num_features, bias=bias)
        self.act = act_layer()
        self.norm = norm_layer(self.num_features) if norm_layer is not None else nn.Identity()
        self.head_dropout = nn.Dropout(head_dropout)
        self.fc2 = _classifier(self.num_features, num_classes, bias)

    def reset(self, num_classes: int, reset_other: bool = False, in_features: Optional[int] = None) -> None:
        """New classifier; ``reset_other`` also drops fc1/act/norm (the head becomes a linear classifier)."""
        if reset_other:
            self.fc1, self.act, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
            self.num_features = self.in_features = in_features or self.in_features
        self.fc2 = _classifier(self.num_features, num_classes, self.bias, like=self.head_dropout, ref=self)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_dropout(self.norm(self.act(self.fc1(x))))
        return x if pre_logits else self.fc2(x)


class NormMlpHead(nn.Module):
    """The same head in timm's key layout, with the output norm inside: norm -> pre_logits (fc -> act -> [norm])
    -> dropout -> fc. ``mid_norm_layer=None`` is timm's 'norm_mlp' head."""

    def __init__(
            self,
            dim: int,
            num_classes: int = 1000,
            act_layer: LayerFn = nn.GELU,
            mlp_ratio: float = 4,
            norm_layer: LayerFn = LayerNorm,
            mid_norm_layer: Optional[LayerFn] = LayerNorm,
            head_dropout: float = 0.,
    ):
        super().__init__()
        self.in_features = dim
        self.num_features = int(mlp_ratio * dim)
        self.norm = norm_layer(dim)
        layers = OrderedDict([('fc', nn.Linear(dim, self.num_features)), ('act', act_layer())])
        if mid_norm_layer is not None:
            layers['norm'] = mid_norm_layer(self.num_features)
        self.pre_logits = nn.Sequential(layers)
        self.head_dropout = nn.Dropout(head_dropout)
        self.fc = _classifier(self.num_features, num_classes)

    def reset(self, num_classes: int, reset_other: bool = False, in_features: Optional[int] = None) -> None:
        """New classifier; ``reset_other`` also drops the norm and the MLP (the head becomes a linear classifier)."""
        if reset_other:
            self.norm, self.pre_logits = nn.Identity(), nn.Identity()
            self.num_features = self.in_features = in_features or self.in_features
        self.fc = _classifier(self.num_features, num_classes, like=self.head_dropout, ref=self)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_dropout(self.pre_logits(self.norm(x)))
        return x if pre_logits else self.fc(x)


def _classifier(in_features: int, num_classes: int, bias: bool = True, like: Optional[nn.Module] = None,
                ref: Optional[nn.Module] = None) -> nn.Module:
    """Linear classifier (or Identity for 0 classes), on the device/dtype and in the train mode of ``ref``."""
    if num_classes <= 0:
        return nn.Identity()
    param = next(ref.parameters(), None) if ref is not None else None
    fc = nn.Linear(in_features, num_classes, bias=bias,
                   device=param.device if param is not None else None, dtype=param.dtype if param is not None else None)
    if like is not None:
        fc.train(like.training)
    return fc


class MambaOutStage(nn.Module):
    """One stage in timm's key layout: the downsample (Identity in stage 0, whose stem is the model's) + blocks."""

    def __init__(self, downsample: nn.Module, blocks: nn.Sequential):
        super().__init__()
        self.downsample = downsample
        self.blocks = blocks
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


# The official default of ``downsample_layers``: the stem, then a conv + post-norm before each later stage.
DOWNSAMPLE_LAYERS_FOUR_STAGES: List[LayerFn] = [Stem] + [Downsample] * 3


class MambaOut(nn.Module):
    """MambaOut. The official constructor arguments (names and defaults), plus timm's for its ``_rw`` variants.

    The body works channels-last: ``forward_features`` returns (B, H/32, W/32, C) (``output_fmt`` 'NHWC', as
    timm), ``forward_intermediates`` and ``features_only`` give NCHW maps unless asked for NHWC.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        depths: blocks per stage (an int: one stage).
        dims: channels per stage.
        downsample_layers: callables ``(in_channels, out_channels) -> module`` for the layer before each stage,
            or one callable for all (the official argument; they are built with their own default norm and
            activation, as the official code does). None: a ``Stem`` and ``Downsample`` layers built from
            ``norm_layer``, ``act_layer``, ``stem_mid_norm`` and ``downsample`` (as timm does).
        norm_layer: norm of the blocks, the downsample layers and inside the head.
        act_layer: activation of the blocks and the stem (a class or a timm name such as 'silu').
        conv_ratio: share of the channels that go through the depthwise conv.
        kernel_size: depthwise conv kernel.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        output_norm: norm of the pooled features before the head.
        head_fn: 'mlp' (or ``MlpHead``, the official head), 'norm_mlp' (timm's head without the norm inside the
            MLP), or a callable ``(dim, num_classes[, head_dropout=])`` building a head on the normalised pooled
            features (original key layout only).
        head_dropout: dropout before the classifier.
        expansion_ratio: hidden width of the blocks / dim (timm's argument; the official code fixes 8/3).
        stem_mid_norm: norm between the stem's convs (timm's argument; False in the ``_rw`` variants).
        downsample: 'conv' (official: conv, then norm) or 'conv_nf' (timm's ``_rw``: norm, then conv).
        ls_init_value: layer scale in every block with this initial value (timm's ``_rw`` variants); None: none.
        global_pool: 'avg', or '' for a head applied to every position of an unpooled map.
        drop_rate: timm's name for ``head_dropout`` (timm's training script passes it).
        key_layout: 'original' (official state_dict keys) or 'timm' (timm's keys); the same network either way.
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
            head_fn: Union[str, LayerFn] = 'mlp',
            head_dropout: float = 0.,
            expansion_ratio: float = 8 / 3,
            stem_mid_norm: bool = True,
            downsample: str = 'conv',
            ls_init_value: Optional[float] = None,
            global_pool: str = 'avg',
            drop_rate: Optional[float] = None,
            key_layout: str = 'original',
            **kwargs: Any,
    ):
        super().__init__()
        if kwargs:
            # The official class swallows unknown arguments silently; we say which ones are ignored.
            warnings.warn(f'MambaOut ignores unknown arguments: {sorted(kwargs)}', stacklevel=2)
        depths = [depths] if isinstance(depths, int) else list(depths)
        dims = [dims] if isinstance(dims, int) else list(dims)
        head_kind = _head_kind(head_fn)
        if key_layout not in KEY_LAYOUTS:
            raise ValueError(f'key_layout must be one of {KEY_LAYOUTS}, got {key_layout!r}')
        if len(depths) != len(dims) or not depths:
            raise ValueError(f'depths and dims need one entry per stage; got depths={depths}, dims={dims}')
        if downsample not in ('conv', 'conv_nf'):
            raise ValueError(f"downsample must be 'conv' or 'conv_nf', got {downsample!r}")
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if head_kind == 'custom' and key_layout == 'timm':
            raise ValueError("key_layout='timm' has keys only for head_fn 'mlp' or 'norm_mlp', not a custom head")
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
        self.global_pool = global_pool
        self.drop_rate = head_dropout
        self.key_layout = key_layout
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False
        self.num_features = dims[-1]

        down = self._downsample_layers(downsample_layers, in_chans, dims, norm_layer, act_layer, stem_mid_norm,
                                       downsample)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)  # the official linspace, split
        blocks = [
            nn.Sequential(*[
                GatedCNNBlock(dims[i], expansion_ratio=expansion_ratio, kernel_size=kernel_size,
                              conv_ratio=conv_ratio, norm_layer=norm_layer, act_layer=act_layer,
                              drop_path=dpr[i][j], ls_init_value=ls_init_value)
                for j in range(depth)])
            for i, depth in enumerate(depths)]
        mid_norm = norm_layer if head_kind == 'mlp' else None
        if key_layout == 'original':
            self.downsample_layers = nn.ModuleList(down)
            self.stages = nn.ModuleList(blocks)
            self.norm = output_norm(dims[-1])
            if head_kind == 'custom':
                self.head = (head_fn(dims[-1], num_classes, head_dropout=head_dropout) if head_dropout > 0.
                             else head_fn(dims[-1], num_classes))
            else:
                self.head = MlpHead(dims[-1], num_classes, norm_layer=mid_norm, head_dropout=head_dropout)
        else:
            self.stem = down[0]
            self.stages = nn.Sequential(*[
                MambaOutStage(down[i] if i > 0 else nn.Identity(), blocks[i]) for i in range(len(depths))])
            self.head = NormMlpHead(dims[-1], num_classes, norm_layer=output_norm, mid_norm_layer=mid_norm,
                                    head_dropout=head_dropout)
        self.head_hidden_size = getattr(self.head, 'num_features', self.num_features)
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')
                             for i in range(len(depths))]
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
        if self.key_layout == 'original':
            return dict(stem=r'^downsample_layers\.0\.', blocks=r'^(?:downsample_layers|stages)\.(\d+)' if coarse else [
                (r'^downsample_layers\.(\d+)', (0,)), (r'^stages\.(\d+)\.(\d+)', None)])
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)), (r'^stages\.(\d+)\.blocks\.(\d+)', None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            if isinstance(stage, MambaOutStage):
                stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        if isinstance(self.head, MlpHead):
            return self.head.fc2
        if isinstance(self.head, NormMlpHead):
            return self.head.fc
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """New classifier for ``num_classes``; ``reset_other`` also drops the output norm and the head's MLP."""
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        if reset_other and self.key_layout == 'original':
            self.norm = nn.Identity()
        if isinstance(self.head, (MlpHead, NormMlpHead)):
            self.head.reset(num_classes, reset_other=reset_other, in_features=self.num_features)
            self.head_hidden_size = self.head.num_features
        else:
            self.head = _classifier(self.num_features, num_classes, like=self.norm, ref=self)
            self.head_hidden_size = self.num_features

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'expected images (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}')

    def _forward_stage(self, i: int, x: Tensor) -> Tensor:
        """Stage i: its downsample layer (the stem for i = 0), then its blocks. Channels-last out."""
        if self.key_layout == 'timm':
            if i == 0:
                x = self.stem(x)
            return self.stages[i](x)
        x = self.downsample_layers[i](x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages[i], x)
        return self.stages[i](x)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> last-stage map, channels-last (B, ceil(H/32), ceil(W/32), num_features)."""
        self._check_input(x)
        for i in range(len(self.stages)):
            x = self._forward_stage(i, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool (B, H, W, C) -> (B, C), output norm, MLP head. ``pre_logits``: the head's hidden features."""
        if self.global_pool == 'avg':
            x = x.mean((1, 2))
        if self.key_layout == 'original':
            x = self.norm(x)
        if isinstance(self.head, (MlpHead, NormMlpHead)):
            return self.head(x, pre_logits=pre_logits)
        return x if pre_logits else self.head(x)

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
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        last = max_index if stop_early else len(self.stages) - 1
        for i in range(last + 1):
            x = self._forward_stage(i, x)
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
        if self.key_layout == 'original':
            self.downsample_layers = self.downsample_layers[:max_index + 1]
        self.num_stage = len(self.stages)
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices


def _head_kind(head_fn: Union[str, LayerFn]) -> str:
    if head_fn in ('mlp', 'default') or head_fn is MlpHead:
        return 'mlp'
    if head_fn == 'norm_mlp':
        return 'norm_mlp'
    if callable(head_fn) and not isinstance(head_fn, str):
        return 'custom'
    raise ValueError(f"head_fn must be 'mlp', 'norm_mlp' or a callable, got {head_fn!r}")


# ---------------------------------------------------------------------------------------------------------
# Key layouts: original release <-> timm. Pure functions of the keys; values pass through untouched.

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
    """Rename the keys of an official MambaOut state dict to timm's layout (values unchanged).

    ``strict``: raise on a key that is not an official MambaOut key; otherwise keep it as it is.
    """
    return _rename(state_dict, _ORIGINAL_TO_TIMM, 'original', strict)


def convert_timm_to_original(state_dict: Mapping[str, V], strict: bool = True) -> Dict[str, V]:
    """Rename the keys of a timm MambaOut state dict to the official layout (values unchanged).

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


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Convert a checkpoint (official or timm layout) to the key layout of ``model``.

    Keys of neither layout are left for the strict loader to report.
    """
    have = detect_key_layout(state_dict)
    want = getattr(model, 'key_layout', 'original')
    if have is None or have == want:
        return dict(state_dict)
    convert = convert_timm_to_original if want == 'original' else convert_original_to_timm
    return convert(state_dict, strict=False)


# ---------------------------------------------------------------------------------------------------------
# Configurations

_RELEASE = 'https://github.com/yuweihao/MambaOut/releases/download/model/'


def _cfg(hf_hub_id: Optional[str] = None, key_layout: str = 'original', **kwargs: Any) -> Dict[str, Any]:
    """Weights: the official release file (``url``) and timm's converted copy on the Hugging Face hub
    (``hf_hub_id``, timm layout: ``checkpoint_filter_fn`` converts it on load)."""
    first_conv, classifier = (('downsample_layers.0.conv1', 'head.fc2') if key_layout == 'original'
                              else ('stem.conv1', 'head.fc'))
    return {
        'hf_hub_id': hf_hub_id, 'hf_hub_filename': 'model.safetensors' if hf_hub_id else None,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'test_input_size': (3, 288, 288), 'pool_size': (7, 7),
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': first_conv, 'classifier': classifier, 'license': 'apache-2.0',
        'origin_url': 'https://github.com/yuweihao/MambaOut', 'paper_ids': 'arXiv:2405.07992', **kwargs,
    }


default_cfgs = {
    'mambaout_femto': _cfg('timm/mambaout_femto.in1k', url=_RELEASE + 'mambaout_femto.pth', tag='in1k'),
    'mambaout_kobe': _cfg('timm/mambaout_kobe.in1k', url=_RELEASE + 'mambaout_kobe.pth', tag='in1k'),
    'mambaout_tiny': _cfg('timm/mambaout_tiny.in1k', url=_RELEASE + 'mambaout_tiny.pth', tag='in1k'),
    'mambaout_small': _cfg('timm/mambaout_small.in1k', url=_RELEASE + 'mambaout_small.pth', tag='in1k'),
    'mambaout_base': _cfg('timm/mambaout_base.in1k', url=_RELEASE + 'mambaout_base.pth', tag='in1k'),
    # timm's own variants (weights only on the hub; the default tag of each).
    'mambaout_small_rw': _cfg('timm/mambaout_small_rw.sw_e450_in1k', 'timm', tag='sw_e450_in1k'),
    'mambaout_base_short_rw': _cfg('timm/mambaout_base_short_rw.sw_e500_in1k', 'timm', tag='sw_e500_in1k',
                                   crop_pct=0.95, test_crop_pct=1.0),
    'mambaout_base_tall_rw': _cfg('timm/mambaout_base_tall_rw.sw_e500_in1k', 'timm', tag='sw_e500_in1k',
                                  crop_pct=0.95, test_crop_pct=1.0),
    'mambaout_base_wide_rw': _cfg('timm/mambaout_base_wide_rw.sw_e500_in1k', 'timm', tag='sw_e500_in1k',
                                  crop_pct=0.95, test_crop_pct=1.0),
    'mambaout_base_plus_rw': _cfg('timm/mambaout_base_plus_rw.sw_e150_in12k_ft_in1k', 'timm',
                                  tag='sw_e150_in12k_ft_in1k'),
    'test_mambaout': _cfg(None, 'timm', input_size=(3, 160, 160), test_input_size=(3, 192, 192), pool_size=(5, 5)),
}


def _create_mambaout(variant: str, pretrained: bool = False, **kwargs: Any) -> MambaOut:
    return build_model(MambaOut, variant, pretrained, default_cfgs=default_cfgs,
                       checkpoint_filter_fn=checkpoint_filter_fn, **kwargs)


# timm's variants: partial conv wider than 1.0, norm-first downsampling, layer scale, 'norm_mlp' head.
_RW = dict(stem_mid_norm=False, downsample='conv_nf', ls_init_value=1e-6, head_fn='norm_mlp', key_layout='timm')


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
    """timm's MambaOut-Small variant (48.5M params), timm key layout."""
    args = dict(_RW, depths=[3, 4, 27, 3], dims=[96, 192, 384, 576])
    return _create_mambaout('mambaout_small_rw', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_base_short_rw(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's shorter, wider-block MambaOut-Base (88.8M params), timm key layout."""
    args = dict(_RW, depths=[3, 3, 25, 3], dims=[128, 256, 512, 768], expansion_ratio=3.0, conv_ratio=1.25)
    return _create_mambaout('mambaout_base_short_rw', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_base_tall_rw(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's deeper, narrower-block MambaOut-Base (86.5M params), timm key layout."""
    args = dict(_RW, depths=[3, 4, 30, 3], dims=[128, 256, 512, 768], expansion_ratio=2.5, conv_ratio=1.25)
    return _create_mambaout('mambaout_base_tall_rw', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_base_wide_rw(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's wide-block MambaOut-Base with SiLU (94.4M params), timm key layout."""
    args = dict(_RW, depths=[3, 4, 27, 3], dims=[128, 256, 512, 768], expansion_ratio=3.0, conv_ratio=1.5,
                act_layer='silu')
    return _create_mambaout('mambaout_base_wide_rw', pretrained, **dict(args, **kwargs))


@register_model
def mambaout_base_plus_rw(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's MambaOut-Base+ with SiLU (101.7M params; ImageNet-12k pre-training), timm key layout."""
    args = dict(_RW, depths=[3, 4, 30, 3], dims=[128, 256, 512, 768], expansion_ratio=3.0, conv_ratio=1.5,
                act_layer='silu')
    return _create_mambaout('mambaout_base_plus_rw', pretrained, **dict(args, **kwargs))


@register_model
def test_mambaout(pretrained: bool = False, **kwargs: Any) -> MambaOut:
    """timm's tiny test configuration (0.45M params, no weights), timm key layout."""
    args = dict(_RW, depths=[1, 1, 3, 1], dims=[16, 32, 48, 64], expansion_ratio=3, ls_init_value=1e-4,
                act_layer='silu')
    return _create_mambaout('test_mambaout', pretrained, **dict(args, **kwargs))
