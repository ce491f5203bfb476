"""Any mambazoo model as a torchvision detection / segmentation backbone: multi-scale maps plus an FPN.

    from mambazoo.downstream import build_backbone
    backbone = build_backbone('mambavision_tiny', fpn_channels=256)   # .out_channels == 256
    features = backbone(images)    # OrderedDict '0'..'3' (strides 4, 8, 16, 32) and 'pool' (stride 64)

The hierarchical families (MambaVision, VMamba, MambaOut) give their four stage maps through timm's features
API (``create_model(name, features_only=True)``). The isotropic ones (Vim, the hybrid) keep one resolution
(stride 16, or 8 for Vim's ``*_stride8``); ViTDet's simple feature pyramid (Li et al. 2022) builds the four
scales from their last block's map: transposed convolutions up to stride 4 and 8, the map itself at 16, max
pooling down to 32. torchvision's ``FeaturePyramidNetwork`` then gives every level the same width, as
torchvision's own ``BackboneWithFPN`` does for ResNets.
"""
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

from torch import Tensor, nn

from ..models import create_model, resolve_name

__all__ = ['PYRAMID_STRIDES', 'FeatureBackbone', 'SimpleFeaturePyramid', 'MambaBackboneWithFPN', 'build_backbone',
           'is_isotropic']

PYRAMID_STRIDES = (4, 8, 16, 32)

# Families that keep one resolution throughout; they go through the simple feature pyramid.
_ISOTROPIC_PREFIXES = ('vim_', 'hybrid_')


def is_isotropic(name: str) -> bool:
    """Whether model ``name`` (or an official alias of it) keeps a single resolution (Vim, the hybrid)."""
    return resolve_name(name).startswith(_ISOTROPIC_PREFIXES)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ViTDet normalises between its two upsampling steps)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one map at ``in_stride`` -> maps at ``strides``.

    Each step up halves the channels (a 2x2 transposed convolution, as ViTDet), a step down is a 2x2 max pool,
    the input stride itself passes through unchanged.

    Args:
        in_channels: channels of the input map.
        in_stride: its stride (16 for Vim / the hybrid, 8 for Vim's stride-8 variants).
        strides: output strides, powers of two times ``in_stride``.
    """

    def __init__(self, in_channels: int, in_stride: int, strides: Sequence[int] = PYRAMID_STRIDES):
        super().__init__()
        self.strides = tuple(strides)
        self.out_channels: List[int] = []
        self.levels = nn.ModuleList()
        for stride in self.strides:
            ratio = math.log2(in_stride / stride)  # > 0: upsample that many times; < 0: downsample
            if ratio != int(ratio):
                raise ValueError(f'strides must be powers of two times the input stride {in_stride}, got {stride}')
            ups, layers, channels = int(ratio), [], in_channels
            for i in range(ups):
                layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
                channels //= 2
                if i < ups - 1:
                    layers += [LayerNorm2d(channels), nn.GELU()]
            for _ in range(-ups):
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            self.levels.append(nn.Sequential(*layers))  # empty Sequential: identity
            self.out_channels.append(channels)

    def forward(self, x: Tensor) -> List[Tensor]:
        return [level(x) for level in self.levels]


class FeatureBackbone(nn.Module):
    """A mambazoo model as maps at strides 4, 8, 16 and 32 (a list, finest first).

    Args:
        name: model name (``mambazoo.list_models()``) or official alias.
        pretrained, checkpoint_path: initial weights, as in ``create_model`` (classification checkpoints load;
            the classifier is dropped).
        in_chans: input channels.
        feature_norm: normalise the isotropic families' map with their final norm (default True; it keeps
            the residual stream's scale in check). Hierarchical families use their own features API.
        **model_kwargs: constructor arguments (small configurations: dims, depths, ...).
    """

    def __init__(self, name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None,
                 in_chans: int = 3, feature_norm: bool = True, **model_kwargs: Any):
        super().__init__()
        self.name = name
        self.isotropic = is_isotropic(name)
        common: Dict[str, Any] = dict(pretrained=pretrained, checkpoint_path=checkpoint_path, in_chans=in_chans,
                                      features_only=True, **model_kwargs)
        if self.isotropic:
            self.body = create_model(name, out_indices=(-1,), feature_norm=feature_norm, **common)
            (in_channels,), (in_stride,) = self.body.feature_info.channels(), self.body.feature_info.reduction()
            self.pyramid: Optional[SimpleFeaturePyramid] = SimpleFeaturePyramid(in_channels, in_stride)
            self.out_channels = list(self.pyramid.out_channels)
        else:
            if resolve_name(name).startswith('vmamba'):  # the official detection backbone: a norm per stage
                common['feature_norm'] = True
            self.body = create_model(name, out_indices=(0, 1, 2, 3), **common)
            self.pyramid = None
            self.out_channels = list(self.body.feature_info.channels())
            reductions = tuple(self.body.feature_info.reduction())
            if reductions != PYRAMID_STRIDES:
                raise ValueError(f'{name}: expected stage strides {PYRAMID_STRIDES}, got {reductions}')
        self.strides = PYRAMID_STRIDES

    def forward(self, x: Tensor) -> List[Tensor]:
        maps = self.body(x)
        return self.pyramid(maps[-1]) if self.pyramid is not None else list(maps)


class MambaBackboneWithFPN(nn.Module):
    """``FeatureBackbone`` + torchvision's FPN: what torchvision's detectors expect of a backbone.

    ``forward`` returns an OrderedDict of maps '0', '1', '2', '3' (strides 4-32) and, with ``extra_pool``,
    'pool' (stride 64, a max pool of '3', as torchvision's ``LastLevelMaxPool``); all ``out_channels`` wide.
    """

    def __init__(self, features: FeatureBackbone, out_channels: int = 256, extra_pool: bool = True):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        self.features = features
        self.fpn = FeaturePyramidNetwork(features.out_channels, out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_pool else None)
        self.out_channels = out_channels
        self.strides = features.strides

    def forward(self, x: Tensor) -> 'OrderedDict[str, Tensor]':
        maps = self.features(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def build_backbone(name: str, fpn_channels: int = 256, pretrained: bool = False,
                   checkpoint_path: Optional[str] = None, in_chans: int = 3, extra_pool: bool = True,
                   model_kwargs: Optional[Dict[str, Any]] = None) -> MambaBackboneWithFPN:
    """A torchvision-compatible backbone with FPN (``out_channels`` = ``fpn_channels``) from model ``name``."""
    if fpn_channels < 1:
        raise ValueError(f'fpn_channels must be positive, got {fpn_channels}')
    features = FeatureBackbone(name, pretrained=pretrained, checkpoint_path=checkpoint_path, in_chans=in_chans,
                               **(model_kwargs or {}))
    return MambaBackboneWithFPN(features, fpn_channels, extra_pool=extra_pool)

