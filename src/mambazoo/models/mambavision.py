"""MambaVision: a hybrid Mamba-Transformer backbone.

Paper: "MambaVision: A Hybrid Mamba-Transformer Vision Backbone", Hatamizadeh & Kautz, CVPR 2025
(https://arxiv.org/abs/2407.08083). Official code and weights: NVlabs/MambaVision (NVIDIA Source Code
License-NC for the weights). This is an independent implementation with the official ``state_dict`` layout
(keys and shapes) and the official forward pass, on our pure-PyTorch selective scan.

Layout: a two-conv stem (stride 4), two stages of residual conv blocks, then two stages of windowed blocks
whose first half mixes tokens with the MambaVision mixer and second half with self-attention; every stage
but the last ends with a 3x3 stride-2 conv that doubles the channels. BatchNorm, average pool, linear head.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, Mlp, trunc_normal_
from timm.models import checkpoint as grad_checkpoint
from timm.models._features import feature_take_indices

from ..ops import selective_scan
from ._blocks import check_images
from ._builder import build_model, generate_default_cfgs, register_alias, register_model

__all__ = ['MambaVision', 'MambaVisionMixer']


class Stem(nn.Module):
    """Two 3x3 stride-2 convs with BatchNorm and ReLU: (B, in_chans, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, in_chans: int = 3, in_dim: int = 64, dim: int = 96):
        super().__init__()
        # Key layout of the official PatchEmbed: conv_down.{0,1,3,4}.
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_down(x)


class Downsample(nn.Module):
    """3x3 stride-2 conv without bias, doubling the channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(x)


class ConvBlock(nn.Module):
    """Residual block of two 3x3 convs with BatchNorm and tanh-GELU (stages 0 and 1)."""

    def __init__(self, dim: int, drop_path: float = 0., layer_scale: Optional[float] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate='tanh')
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        # The official code enables layer scale only for an int or float value (not for None).
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if _is_scale(layer_scale) else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            x = x * self.gamma.view(1, -1, 1, 1)
        return shortcut + self.drop_path(x)


class MambaVisionMixer(nn.Module):
    """The MambaVision token mixer: a selective-scan branch and a gate-free symmetric branch, concatenated.

    in_proj splits into x and z (d_inner / 2 channels each); both go through their own depthwise conv1d
    ('same' padding, no bias) and SiLU; x is scanned (no z gate inside the scan); out = out_proj([y, z]).
    """

    def __init__(
            self,
            d_model: int,
            d_state: int = 8,
            d_conv: int = 3,
            expand: int = 1,
            dt_rank: Union[int, str] = 'auto',
            dt_min: float = 0.001,
            dt_max: float = 0.1,
            dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == 'auto' else int(dt_rank)
        half = self.d_inner // 2
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        # S4D-real initialisation of A, and dt_proj's bias = softplus^-1 of a log-uniform step size.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, groups=half, bias=False)
        with torch.no_grad():
            dt_std = self.dt_rank ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
            dt = torch.exp(torch.rand(half) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(B, L, d_model) -> (B, L, d_model)."""
        xz = self.in_proj(hidden_states).transpose(1, 2)
        x, z = xz.chunk(2, dim=1)
        half = self.d_inner // 2
        x = F.silu(F.conv1d(x, self.conv1d_x.weight, self.conv1d_x.bias, padding='same', groups=half))
        z = F.silu(F.conv1d(z, self.conv1d_z.weight, self.conv1d_z.bias, padding='same', groups=half))
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The official mixer adds dt_proj.bias twice: once in dt_proj and again as the scan's delta_bias.
        # The released weights were trained that way, so we keep it.
        dt = self.dt_proj(dt).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        dt_bias = self.dt_proj.bias
        if not torch.jit.is_scripting():
            if not isinstance(dt_bias, (Tensor, torch.fx.Proxy)):  # dynamically quantized (torch.ao): a method
                dt_bias = dt_bias()
        y = selective_scan(
            x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
            z=None, delta_bias=dt_bias.float(), delta_softplus=True,
        )
        if isinstance(y, tuple):  # a (y, last state) pair only when asked for: this refines TorchScript's type
            y = y[0]
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))


class MambaVisionBlock(nn.Module):
    """Pre-norm block on window tokens: x + mixer(norm(x)), then x + mlp(norm(x)); mixer = Mamba or attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            use_attention: bool,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale: Optional[float] = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if use_attention:
            self.mixer = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                   attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=nn.LayerNorm)
        else:
            self.mixer = MambaVisionMixer(d_model=dim, d_state=8, d_conv=3, expand=1)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        use_ls = _is_scale(layer_scale)
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else None
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.mixer(self.norm1(x))
        x = x + self.drop_path(y * self.gamma_1 if self.gamma_1 is not None else y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y * self.gamma_2 if self.gamma_2 is not None else y)


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, C, H, W) with H, W multiples of window_size -> (B * windows, window_size**2, C), row-major."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // window_size, window_size, W // window_size, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window_size * window_size, C)


def pad_to_windows(x: Tensor, window_size: int) -> Tensor:
    """Zero-pad a map (B, C, H, W) at the bottom and right to multiples of ``window_size`` (as the official code)."""
    pad_r = (window_size - x.shape[-1] % window_size) % window_size
    pad_b = (window_size - x.shape[-2] % window_size) % window_size
    return F.pad(x, (0, pad_r, 0, pad_b)) if pad_r or pad_b else x


def crop_map(x: Tensor, height: int, width: int) -> Tensor:
    """The top-left (height, width) of a map, contiguous (a no-op when it is the whole map)."""
    if x.shape[-2] == height and x.shape[-1] == width:
        return x
    return x[:, :, :height, :width].contiguous()


# Branches on a map's size: leaves for FX tracing (torchvision's and timm's feature extractors) instead of control flow
# on traced values.
torch.fx.wrap('pad_to_windows')
torch.fx.wrap('crop_map')


def window_reverse(windows: Tensor, window_size: int, H: int, W: int) -> Tensor:
    """Inverse of ``window_partition``: (B * windows, window_size**2, C) -> (B, C, H, W)."""
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // window_size) * (W // window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


class MambaVisionStage(nn.Module):
    """One stage: conv blocks, or windowed Mamba/attention blocks; then the optional downsample.

    Windowed stages pad the map on the right and bottom with zeros up to a multiple of the window (as the
    official code does: padded tokens take part in the scan and in attention), then crop back.
    """

    def __init__(
            self,
            dim: int,
            depth: int,
            num_heads: int,
            window_size: int,
            conv: bool,
            downsample: bool,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[float, Sequence[float]] = 0.,
            layer_scale: Optional[float] = None,
            layer_scale_conv: Optional[float] = None,
    ):
        super().__init__()
        dpr = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.conv = conv
        self.window_size = window_size
        self.grad_checkpointing = False
        if conv:
            self.blocks = nn.ModuleList(
                [ConvBlock(dim, drop_path=dpr[i], layer_scale=layer_scale_conv) for i in range(depth)])
        else:
            # The second half of the blocks use attention; with an odd depth the Mamba half is the larger one.
            first_attention = depth // 2 + 1 if depth % 2 else depth // 2
            self.blocks = nn.ModuleList([
                MambaVisionBlock(
                    dim, num_heads, use_attention=i >= first_attention, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    qk_norm=qk_norm, proj_drop=drop, attn_drop=attn_drop, drop_path=dpr[i],
                    layer_scale=layer_scale)
                for i in range(depth)])
        self.downsample = Downsample(dim) if downsample else None

    def forward_blocks(self, x: Tensor) -> Tensor:
        """The stage without its downsample: (B, C, H, W) -> (B, C, H, W)."""
        if self.conv:
            return self._run_blocks(x)
        H, W = x.shape[-2], x.shape[-1]
        ws = self.window_size
        x = pad_to_windows(x, ws)
        x = window_reverse(self._run_blocks(window_partition(x, ws)), ws, x.shape[-2], x.shape[-1])
        return crop_map(x, H, W)

    def _run_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = grad_checkpoint(blk, x)
            else:
                x = blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


class MambaVision(nn.Module):
    """MambaVision. Constructor arguments as in the official class (names, meanings and defaults).

    Args:
        dim: channels of the first stage (doubled at each following stage).
        in_dim: channels of the stem's first conv.
        depths: blocks per stage (4 stages).
        window_size: attention/scan window per stage (stages 2 and 3 use it).
        mlp_ratio: MLP hidden size / dim.
        num_heads: attention heads per stage.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        qkv_bias: bias in the attention's qkv projection.
        qk_scale: the official name for normalising q and k (a LayerNorm per head when truthy).
        drop_rate: dropout after attention/MLP projections and before the head.
        attn_drop_rate: attention dropout.
        layer_scale: initial layer-scale value of the windowed blocks (None: no layer scale).
        layer_scale_conv: initial layer-scale value of the conv blocks (None: no layer scale).
        resolution: accepted for compatibility with the official entrypoints; unused (any size works).
        global_pool: 'avg' (the official pooling) or '' for an unpooled output of ``forward_head``.
    """

    def __init__(
            self,
            dim: int,
            in_dim: int,
            depths: Sequence[int],
            window_size: Sequence[int],
            mlp_ratio: float,
            num_heads: Sequence[int],
            drop_path_rate: float = 0.2,
            in_chans: int = 3,
            num_classes: int = 1000,
            qkv_bias: bool = True,
            qk_scale: Optional[bool] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            layer_scale: Optional[float] = None,
            layer_scale_conv: Optional[float] = None,
            resolution: Optional[int] = None,
            global_pool: str = 'avg',
            **kwargs: Any,
    ):
        super().__init__()
        if kwargs:
            # The official class swallows unknown arguments silently; we say which ones are ignored.
            import warnings
            warnings.warn(f'MambaVision ignores unknown arguments: {sorted(kwargs)}', stacklevel=2)
        if len(depths) != 4:
            raise ValueError(f'MambaVision has 4 stages; got depths={list(depths)}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = int(dim * 2 ** (len(depths) - 1))
        self.patch_embed = Stem(in_chans=in_chans, in_dim=in_dim, dim=dim)
        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linear, as the official
        self.levels = nn.ModuleList()
        self.feature_info: List[Dict[str, Any]] = []
        for i, depth in enumerate(depths):
            stage_dim = int(dim * 2 ** i)
            self.levels.append(MambaVisionStage(
                dim=stage_dim, depth=depth, num_heads=num_heads[i], window_size=window_size[i],
                conv=i < 2, downsample=i < 3, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=bool(qk_scale),
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                layer_scale=layer_scale, layer_scale_conv=layer_scale_conv,
            ))
            self.feature_info.append(dict(num_chs=stage_dim, reduction=4 * 2 ** i, module=f'levels.{i}'))
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the official model: this also resets dt_proj (weights trunc-normal, bias zero).
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- timm model surface ------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # timm's optimizer factory skips 1-D params and biases itself; A_log is 2-D and must be named.
        return {'*A_log', '*.D', '*gamma*'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^patch_embed', blocks=r'^levels\.(\d+)' if coarse else [
            (r'^levels\.(\d+)\.downsample', (0,)), (r'^levels\.(\d+)\.blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: Tensor) -> None:
        check_images(x, self.in_chans, 'MambaVision', minimum=32, multiple=32,  # a stride-4 stem, 3 halvings
                     dtype=self.patch_embed.conv_down[0].weight.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normalised last-stage map (B, num_features, H/32, W/32)."""
        self._check_input(x)
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
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
        """Stage maps at strides 4, 8, 16, 32 (each stage's blocks, before its downsample), as timm returns them.

        Args:
            indices: which stages (None: all; n: the last n; a list: those).
            norm: apply the final BatchNorm to the last stage's map.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list of maps.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f'output_fmt must be NCHW or NHWC, got {output_fmt!r}')
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        intermediates = []
        x = self.patch_embed(x)
        last = len(self.levels) - 1
        levels = self.levels if not stop_early else self.levels[:max_index + 1]
        for i, level in enumerate(levels):
            x = level.forward_blocks(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 2, 3, 1) if output_fmt == 'NHWC' else feat)
            if level.downsample is not None:
                x = level.downsample(x)
        if intermediates_only:
            return intermediates
        if len(levels) == len(self.levels):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last index (and the head) for feature extraction."""
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        self.levels = self.levels[:max_index + 1]
        if max_index < 3:
            self.levels[-1].downsample = None
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def _is_scale(value: Any) -> bool:
    return value is not None and type(value) in (int, float)


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Official checkpoints already have our layout; HF 'MambaVisionModel' exports prefix keys with 'model.'."""
    if any(k.startswith('model.') for k in state_dict) and not any(k.startswith('patch_embed') for k in state_dict):
        state_dict = {k[len('model.'):]: v for k, v in state_dict.items() if k.startswith('model.')}
    return state_dict


# ---------------------------------------------------------------------------------------------------------
# Configurations

def _cfg(hf_hub_id: str, filename: str, **kwargs: Any) -> Dict[str, Any]:
    """The official cfgs (NVlabs ``mamba_vision.py``): ImageNet mean/std, bicubic, 224 px, center crop unless
    said otherwise; weights on the Hugging Face hub."""
    return {
        'hf_hub_id': hf_hub_id, 'hf_hub_filename': filename, 'num_classes': 1000,
        'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 1.0, 'crop_mode': 'center',
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.conv_down.0', 'classifier': 'head',
        'license': 'nvidia-source-code-license-nc', 'origin_url': 'https://github.com/NVlabs/MambaVision', **kwargs,
    }


def _untrained_cfg(**kwargs: Any) -> Dict[str, Any]:
    """A small configuration of ours, without weights (no hub id, url or licence), evaluated as it is trained from
    scratch: 32 px images, no crop, bilinear, ImageNet mean/std; the last stage's map is 1x1."""
    return {
        'num_classes': 1000, 'input_size': (3, 32, 32), 'pool_size': (1, 1), 'crop_pct': 1.0, 'crop_mode': 'center',
        'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.conv_down.0', 'classifier': 'head', **kwargs,
    }


# One cfg per released weight file, as timm's ``name.tag``: 'in1k' trained on ImageNet-1K, 'in21k_ft_in1k'
# pre-trained on ImageNet-21K and fine-tuned on ImageNet-1K. The 512 px models are evaluated with a 'squash' crop
# (resize both sides to 512 / 0.93, then a center crop), as their official cfgs say. Our small configuration
# (mambavision_nano) has no weights: one untagged cfg, its training input size.
default_cfgs = generate_default_cfgs({
    'mambavision_tiny.in1k': _cfg('nvidia/MambaVision-T-1K', 'mambavision_tiny_1k.pth.tar'),
    'mambavision_tiny2.in1k': _cfg('nvidia/MambaVision-T2-1K', 'mambavision_tiny2_1k.pth.tar', crop_pct=0.98),
    'mambavision_small.in1k': _cfg('nvidia/MambaVision-S-1K', 'mambavision_small_1k.pth.tar', crop_pct=0.93),
    'mambavision_base.in1k': _cfg('nvidia/MambaVision-B-1K', 'mambavision_base_1k.pth.tar'),
    'mambavision_base_21k.in21k_ft_in1k': _cfg('nvidia/MambaVision-B-21K', 'mambavision_base_21k.pth.tar'),
    'mambavision_large.in1k': _cfg('nvidia/MambaVision-L-1K', 'mambavision_large_1k.pth.tar'),
    'mambavision_large_21k.in21k_ft_in1k': _cfg('nvidia/MambaVision-L-21K', 'mambavision_large_21k.pth.tar'),
    'mambavision_large2.in1k': _cfg('nvidia/MambaVision-L2-1K', 'mambavision_large2_1k.pth.tar'),
    'mambavision_large2_512_21k.in21k_ft_in1k': _cfg(
        'nvidia/MambaVision-L2-512-21K', 'mambavision_L2_21k_240m_512.pth.tar',
        input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93, crop_mode='squash'),
    'mambavision_large3_256_21k.in21k_ft_in1k': _cfg(
        'nvidia/MambaVision-L3-256-21K', 'mambavision_L3_21k_740m_256.pth.tar',
        input_size=(3, 256, 256), pool_size=(8, 8)),
    'mambavision_large3_512_21k.in21k_ft_in1k': _cfg(
        'nvidia/MambaVision-L3-512-21K', 'mambavision_L3_21k_740m_512.pth.tar',
        input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93, crop_mode='squash'),
    'mambavision_nano': _untrained_cfg(),
})

# Official entrypoint names (pip package mambavision 1.2.0) -> ours.
_OFFICIAL_NAMES = {
    'mamba_vision_T': 'mambavision_tiny',
    'mamba_vision_T2': 'mambavision_tiny2',
    'mamba_vision_S': 'mambavision_small',
    'mamba_vision_B': 'mambavision_base',
    'mamba_vision_B_21k': 'mambavision_base_21k',
    'mamba_vision_L': 'mambavision_large',
    'mamba_vision_L_21k': 'mambavision_large_21k',
    'mamba_vision_L2': 'mambavision_large2',
    'mamba_vision_L2_512_21k': 'mambavision_large2_512_21k',
    'mamba_vision_L3_256_21k': 'mambavision_large3_256_21k',
    'mamba_vision_L3_512_21k': 'mambavision_large3_512_21k',
}
for _alias, _name in _OFFICIAL_NAMES.items():
    register_alias(_alias, _name)


def _create_mambavision(variant: str, pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """Also takes the official package's ``model_path``: with ``pretrained=True`` that file is loaded when it
    exists, as the official entrypoints do (where they would download the weights to a missing one, the official
    file is looked up in the caches, and downloaded when allowed, as for any ``pretrained=True``)."""
    from pathlib import Path
    model_path = kwargs.pop('model_path', None)
    if pretrained and model_path is not None and kwargs.get('checkpoint_path') is None \
            and Path(model_path).expanduser().is_file():
        kwargs['checkpoint_path'] = Path(model_path).expanduser()
    return build_model(MambaVision, variant, pretrained, default_cfgs=default_cfgs,
                       checkpoint_filter_fn=checkpoint_filter_fn, **kwargs)


_T = dict(dim=80, in_dim=32, num_heads=[2, 4, 8, 16], window_size=[8, 8, 14, 7], mlp_ratio=4)
_B = dict(dim=128, in_dim=64, depths=[3, 3, 10, 5], num_heads=[2, 4, 8, 16], window_size=[8, 8, 14, 7],
          mlp_ratio=4, drop_path_rate=0.3, layer_scale=1e-5)
_L = dict(dim=196, in_dim=64, num_heads=[4, 8, 16, 32], mlp_ratio=4, layer_scale=1e-5, drop_path_rate=0.3)
_L3 = dict(dim=256, in_dim=64, num_heads=[4, 8, 16, 32], mlp_ratio=4, layer_scale=1e-5, drop_path_rate=0.5)


@register_model
def mambavision_nano(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-nano, ours (no weights): MambaVision-T's blocks scaled down for training from scratch on 32 px
    images on a CPU (the README's main job, Fashion-MNIST). 2.64M params (2.38M with 10 classes); windows 2 and 1
    are the 2x2 and 1x1 maps of stages 3 and 4 at 32 px."""
    args = dict(_T, dim=32, in_dim=16, depths=[1, 2, 2, 2], num_heads=[2, 4, 8, 8], window_size=[8, 8, 2, 1],
                drop_path_rate=0.05)
    return _create_mambavision('mambavision_nano', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_tiny(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-T (31.8M params, 4.4 GFLOPs at 224)."""
    args = dict(_T, depths=[1, 3, 8, 4], drop_path_rate=0.2)
    return _create_mambavision('mambavision_tiny', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_tiny2(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-T2 (35.1M params)."""
    args = dict(_T, depths=[1, 3, 11, 4], drop_path_rate=0.2)
    return _create_mambavision('mambavision_tiny2', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_small(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-S (50.1M params)."""
    args = dict(dim=96, in_dim=64, depths=[3, 3, 7, 5], num_heads=[2, 4, 8, 16], window_size=[8, 8, 14, 7],
                mlp_ratio=4, drop_path_rate=0.2)
    return _create_mambavision('mambavision_small', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_base(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-B (97.7M params), ImageNet-1K."""
    args = dict(_B)
    return _create_mambavision('mambavision_base', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_base_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-B pre-trained on ImageNet-21K, fine-tuned on ImageNet-1K at 224."""
    args = dict(_B)
    return _create_mambavision('mambavision_base_21k', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_large(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L (228.0M params), ImageNet-1K."""
    args = dict(_L, depths=[3, 3, 10, 5], window_size=[8, 8, 14, 7])
    return _create_mambavision('mambavision_large', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_large_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L pre-trained on ImageNet-21K, fine-tuned on ImageNet-1K at 224."""
    args = dict(_L, depths=[3, 3, 10, 5], window_size=[8, 8, 14, 7])
    return _create_mambavision('mambavision_large_21k', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_large2(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L2 (241.6M params), ImageNet-1K."""
    args = dict(_L, depths=[3, 3, 12, 5], window_size=[8, 8, 14, 7])
    return _create_mambavision('mambavision_large2', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_large2_512_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L2 at 512 px (ImageNet-21K pre-training), windows [8, 8, 32, 16]."""
    args = dict(_L, depths=[3, 3, 12, 5], window_size=[8, 8, 32, 16])
    return _create_mambavision('mambavision_large2_512_21k', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_large3_256_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L3 (739.6M params) at 256 px (ImageNet-21K pre-training), windows [8, 8, 16, 8]."""
    args = dict(_L3, depths=[3, 3, 20, 10], window_size=[8, 8, 16, 8])
    return _create_mambavision('mambavision_large3_256_21k', pretrained, **dict(args, **kwargs))


@register_model
def mambavision_large3_512_21k(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L3 at 512 px (ImageNet-21K pre-training), windows [8, 8, 32, 16]."""
    args = dict(_L3, depths=[3, 3, 20, 10], window_size=[8, 8, 32, 16])
    return _create_mambavision('mambavision_large3_512_21k', pretrained, **dict(args, **kwargs))
