"""A small isotropic Mamba/attention hybrid: Mamba blocks first, transformer blocks after, one resolution.

Not a published model: a compact baseline in the spirit of MambaVision's "Mamba first, attention last" finding
(https://arxiv.org/abs/2407.08083), without its hierarchy. Layout:

    patch embedding (16x16; 4x4 for 32 px images) + learned position embedding
    -> round(depth * mamba_ratio) Mamba blocks:  x + mixer(LayerNorm(x)), mixer = the shared ``_blocks.Mamba``
       (in_proj with a gate branch, causal depthwise conv1d, selective scan, out_proj; expand 1, d_conv 4,
       d_state 16, dt_rank ceil(dim / 16))
    -> the remaining transformer blocks: x + attn(LN(x)), x + mlp(LN(x)); attention through
       ``F.scaled_dot_product_attention``, MLP ratio 4, qkv bias
    -> LayerNorm, mean over tokens, linear head.

Three configurations, ``hybrid_tiny`` (dim 192, depth 6, 6 heads; 1,900,618 parameters with the default 10
classes), ``hybrid_small`` (dim 384, depth 8, 8 heads; 9,403,786) and ``hybrid_nano`` (4x4 patches for 32 px images,
dim 128, depth 6, 4 heads; 786,186). The default ``num_classes`` is 10 (small-data experiments); pass
``num_classes=1000`` for ImageNet. No pretrained weights are published.
"""
import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import checkpoint as grad_checkpoint
from timm.models._features import feature_take_indices

from ._blocks import Mamba, check_images
from ._builder import build_model, register_model

__all__ = ['MambaHybrid', 'MambaBlock', 'AttentionBlock']


def pos_embed_for_grid(pos_embed: Tensor, height: int, width: int, trained_grid: Tuple[int, int]) -> Tensor:
    """The position embedding (1, P, D) for a (height, width) patch grid: resampled (bicubic, as timm's ViTs) when
    it is not the grid it was trained for."""
    if height == trained_grid[0] and width == trained_grid[1]:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, [height, width], [trained_grid[0], trained_grid[1]], num_prefix_tokens=0)


torch.fx.wrap('pos_embed_for_grid')  # a leaf for FX tracing: it branches on the input's size


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba block: x + drop_path(mixer(norm(x))). (B, L, dim) -> (B, L, dim)."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 1, drop_path: float = 0.):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        # timm can be told (TIMM_FUSED_ATTN=0) to use its explicit softmax path; this block always uses SDPA.
        self.attn.fused_attn = True
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MambaHybrid(nn.Module):
    """Isotropic hybrid: the first ``mamba_ratio`` of the blocks are Mamba blocks, the rest transformer blocks.

    Args:
        img_size: size of the position embedding's grid (other sizes resample it bicubically).
        patch_size: patch size (and stride) of the patch embedding.
        in_chans: input channels.
        num_classes: classifier outputs (0 for no classifier). Default 10.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads of the transformer blocks.
        mamba_ratio: fraction of the blocks, from the first, that are Mamba blocks (rounded half up).
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: bias in the qkv projection.
        d_state, d_conv, expand: the Mamba mixer's state size, conv kernel and expansion.
        drop_rate: dropout after the position embedding, in attention/MLP projections and before the head.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linear over the blocks.
        global_pool: 'avg' (mean over tokens) or '' (``forward_head`` returns per-token logits).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 10,
            embed_dim: int = 192,
            depth: int = 6,
            num_heads: int = 6,
            mamba_ratio: float = 0.5,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 1,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            global_pool: str = 'avg',
    ):
        super().__init__()
        if not 0. <= mamba_ratio <= 1.:
            raise ValueError(f'mamba_ratio must be in [0, 1], got {mamba_ratio}')
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.num_mamba_blocks = int(math.floor(depth * mamba_ratio + 0.5))
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, strict_img_size=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            MambaBlock(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, drop_path=dpr[i])
            if i < self.num_mamba_blocks else
            AttentionBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                           attn_drop=attn_drop_rate, drop_path=dpr[i])
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f'blocks.{i}') for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT-style (trunc-normal 0.02 Linear weights, zero biases), except inside the Mamba mixers, which keep
        their own initialisation (dt_proj's bias sets the initial step sizes)."""
        trunc_normal_(self.pos_embed, std=.02)
        mixer_modules = {id(m) for blk in self.blocks if isinstance(blk, MambaBlock) for m in blk.mixer.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in mixer_modules:
                trunc_normal_(module.weight, std=.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # -- timm model surface ------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', '*A_log', '*.D'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^pos_embed|^patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- forward -----------------------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        p = self.patch_embed.patch_size[0]
        check_images(x, self.in_chans, 'MambaHybrid', minimum=p, multiple=p, multiple_name='the patch size ',
                     dtype=self.patch_embed.proj.weight.dtype)

    def _embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        self._check_input(x)
        p = self.patch_embed.patch_size[0]
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.patch_embed(x)
        pos_embed = pos_embed_for_grid(self.pos_embed, grid[0], grid[1], self.patch_embed.grid_size)
        return self.pos_drop(x + pos_embed), grid

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return grad_checkpoint(block, x)
        return block(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normalised tokens (B, H/p * W/p, embed_dim), p the patch size."""
        x, _ = self._embed(x)
        for block in self.blocks:  # not through _run_block: TorchScript takes no module as an argument
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = grad_checkpoint(block, x)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        x = self.head_drop(x)
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
        """Block outputs as maps (B, C, H/p, W/p) ('NCHW'), 'NHWC' or tokens ('NLC'); see VisionMamba's."""
        if output_fmt not in ('NCHW', 'NHWC', 'NLC'):
            raise ValueError(f'output_fmt must be NCHW, NHWC or NLC, got {output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (gh, gw) = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x)
            if i in take_indices:
                feat = self.norm(x) if norm else x
                if output_fmt != 'NLC':
                    feat = feat.reshape(feat.shape[0], gh, gw, -1)
                    if output_fmt == 'NCHW':
                        feat = feat.permute(0, 3, 1, 2).contiguous()
                intermediates.append(feat)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Resample a position embedding trained on another square grid to the model's grid."""
    pos_embed = state_dict.get('pos_embed')
    own = getattr(model, 'pos_embed', None)
    if pos_embed is None or own is None or pos_embed.shape == own.shape or pos_embed.dim() != 3 \
            or pos_embed.shape[-1] != own.shape[-1]:
        return state_dict
    side = math.isqrt(pos_embed.shape[1])
    if side * side != pos_embed.shape[1]:
        return state_dict
    state_dict = dict(state_dict)
    state_dict['pos_embed'] = resample_abs_pos_embed(pos_embed, list(model.patch_embed.grid_size), [side, side],
                                                     num_prefix_tokens=0)
    return state_dict


# ---------------------------------------------------------------------------------------------------------
# Configurations (no published weights)

def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'num_classes': 10, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': 0.875,
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0', **kwargs,
    }


default_cfgs = {
    'hybrid_tiny': _cfg(),
    'hybrid_small': _cfg(),
    'hybrid_nano': _cfg(input_size=(3, 32, 32), crop_pct=1.0, crop_mode='center', interpolation='bilinear'),
}


def _create_hybrid(variant: str, pretrained: bool = False, **kwargs: Any) -> MambaHybrid:
    feature_cfg = {'out_indices': 3, **(kwargs.pop('feature_cfg', None) or {})}  # features_only: the last 3 blocks
    return build_model(MambaHybrid, variant, pretrained, default_cfgs=default_cfgs,
                       checkpoint_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **kwargs)


@register_model
def hybrid_tiny(pretrained: bool = False, **kwargs: Any) -> MambaHybrid:
    """Hybrid-T: dim 192, 3 Mamba + 3 attention blocks, 6 heads (1.90M params at 10 classes)."""
    args = dict(embed_dim=192, depth=6, num_heads=6, mamba_ratio=0.5, d_state=16)
    return _create_hybrid('hybrid_tiny', pretrained, **dict(args, **kwargs))


@register_model
def hybrid_small(pretrained: bool = False, **kwargs: Any) -> MambaHybrid:
    """Hybrid-S: dim 384, 4 Mamba + 4 attention blocks, 8 heads (9.40M params at 10 classes)."""
    args = dict(embed_dim=384, depth=8, num_heads=8, mamba_ratio=0.5, d_state=16)
    return _create_hybrid('hybrid_small', pretrained, **dict(args, **kwargs))


@register_model
def hybrid_nano(pretrained: bool = False, **kwargs: Any) -> MambaHybrid:
    """Hybrid-nano: 4x4 patches of 32 px images (an 8x8 grid), dim 128, 3 Mamba + 3 attention blocks, 4 heads
    (0.79M params at 10 classes), for training from scratch on a CPU."""
    args = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mamba_ratio=0.5, d_state=16)
    return _create_hybrid('hybrid_nano', pretrained, **dict(args, **kwargs))
