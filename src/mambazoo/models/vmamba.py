"""VMamba (v2): a hierarchical backbone of visual state-space blocks that scan the map in four directions.

Paper: "VMamba: Visual State Space Model", Liu et al., NeurIPS 2024 (https://arxiv.org/abs/2401.10166).
Official code and weights: MzeroMiko/VMamba, ``classification/models/vmamba.py`` (MIT licence). This is an
independent implementation with the official ``state_dict`` layout (keys and shapes) and the official forward
pass of the released v2 models, on our pure-PyTorch selective scan.

Layout (released v2 configuration, ``channel_first``: every map is NCHW, norms are LayerNorm over channels and
the "Linear2d" projections are 1x1 convolutions stored as (out, in) matrices): a stem of two 3x3 stride-2
convs (patch embed "v2"), four stages of VSS blocks with a 3x3 stride-2 conv + norm between them (downsample
"v3"), then norm, average pool and a linear head. A VSS block is x + SS2D(norm(x)), then x + MLP(norm2(x)).

SS2D ("v05_noz"): in_proj -> depthwise 3x3 conv -> SiLU -> cross scan (four traversals of the map) ->
per-direction projections to (dt, B, C) -> ONE selective scan over all four directions, folded into the channel
dimension (B and C grouped per direction) -> cross merge (sum back on the grid) -> out_norm -> out_proj.
The cross scan / merge and the scan between them are one op (``mambazoo.ops.cross_selective_scan``), not part of this file.
"""
import functools
import math
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import checkpoint as grad_checkpoint
from timm.models._features import FeatureInfo, feature_take_indices

from ..ops import cross_selective_scan
from ..ops.linear import linear
from ._blocks import check_images
from ._builder import build_model, generate_default_cfgs, register_alias, register_model

__all__ = ['VSSM', 'VSSMBackbone', 'SS2D', 'VSSBlock']

_ACT_LAYERS: Dict[str, Callable[[], nn.Module]] = dict(silu=nn.SiLU, gelu=nn.GELU, relu=nn.ReLU, sigmoid=nn.Sigmoid)
# The official 'ln' (channel-last LayerNorm) and 'ln2d' (channel-first) compute the same thing with the same
# parameters; we always keep maps NCHW, so both become a LayerNorm over channels (eps 1e-5, PyTorch's default).
_NORM_LAYERS: Dict[str, Callable[[int], nn.Module]] = dict(
    ln=lambda c: LayerNorm2d(c, eps=1e-5), ln2d=lambda c: LayerNorm2d(c, eps=1e-5), bn=nn.BatchNorm2d)
# forward_type values whose SS2D is the four-direction ("cross2d") scan with the v2 parameter layout; they differ
# only in CUDA kernels and fp32 casts, not in the computation.
_CROSS2D_FORWARD_TYPES = ('v01', 'v02', 'v03', 'v04', 'v05', 'v2', 'v3')


def _lookup(table: Dict[str, Any], name: Any, what: str) -> Any:
    if not isinstance(name, str) or name.lower() not in table:
        raise ValueError(f'unsupported {what} {name!r}; choose from {", ".join(table)}')
    return table[name.lower()]


class Linear2d(nn.Linear):
    """A 1x1 convolution over an NCHW map, stored as an ``nn.Linear`` (weight (out, in)), as the official one."""

    def forward(self, x: Tensor, gelu: bool = False) -> Tensor:
        # A matrix product over the channels-last view: no copy when the map is stored channels-last (as
        # every map after the first LayerNorm2d is), and the output is stored channels-last again.
        return linear(x.permute(0, 2, 3, 1), self.weight, self.bias, gelu=gelu).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """fc1 -> act -> fc2 on NCHW maps; with ``gated``, fc1 doubles and fc2 sees x * act(z) (the official gMlp)."""
    gated: torch.jit.Final[bool]
    gelu_in_fc1: torch.jit.Final[bool]

    def __init__(self, dim: int, hidden: int, act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.,
                 gated: bool = False):
        super().__init__()
        self.gated = gated
        self.fc1 = Linear2d(dim, 2 * hidden if gated else hidden)
        self.act = act_layer()
        # the exact GELU after a plain fc1 is applied by fc1's GEMM (ops.linear); a constant for TorchScript
        self.gelu_in_fc1 = not gated and type(self.act) is nn.GELU and self.act.approximate == 'none'
        self.fc2 = Linear2d(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if self.gelu_in_fc1:
            return self.drop(self.fc2(self.drop(self.fc1(x, gelu=True))))
        x = self.fc1(x)
        if self.gated:
            x, z = x.chunk(2, dim=1)
            return self.drop(self.fc2(x * self.act(z)))
        return self.drop(self.fc2(self.drop(self.act(x))))


def _at_least_f32(t: Tensor) -> Tensor:
    # The scan's parameters stay in float32 under half / bfloat16 (as the official model keeps them), and in
    # float64 for a float64 model.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _strip_suffix(value: str, suffix: str) -> Tuple[bool, str]:
    return (True, value[:-len(suffix)]) if value.endswith(suffix) else (False, value)


class SS2D(nn.Module):
    """2-D selective scan: four traversals of the map through one selective scan, merged back on the grid.

    The parameters of the four directions are stacked (official layout): ``x_proj_weight`` (4, R + 2N, d_inner),
    ``dt_projs_weight`` (4, d_inner, R), ``dt_projs_bias`` (4, d_inner), ``A_logs`` (4 * d_inner, N),
    ``Ds`` (4 * d_inner,), where R is the rank of the step-size projection and N the state size.

    Args:
        d_model: channels in and out.
        d_state: state size N.
        ssm_ratio: d_inner / d_model.
        dt_rank: R, or 'auto' for ceil(d_model / 16).
        act_layer: activation after the depthwise conv (and on z when there is a gate).
        d_conv: depthwise conv kernel (< 2: no conv).
        conv_bias: bias in the depthwise conv.
        dropout: dropout after out_proj.
        bias: bias in in_proj / out_proj.
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: initialisation of the step-size projections.
        initialize: 'v0' (Mamba's init), 'v1' or 'v2' (the official simpler inits).
        forward_type: 'v05_noz' for the released models; '_noz' means no z gate. Any of
            v01..v05, v2, v3 with the official suffixes '_no32', '_oact', '_noz', '_nozact' is accepted.
    """

    def __init__(
            self,
            d_model: int = 96,
            d_state: int = 16,
            ssm_ratio: float = 2.0,
            dt_rank: Union[int, str] = 'auto',
            act_layer: Callable[[], nn.Module] = nn.SiLU,
            d_conv: int = 3,
            conv_bias: bool = True,
            dropout: float = 0.,
            bias: bool = False,
            dt_min: float = 0.001,
            dt_max: float = 0.1,
            dt_init: str = 'random',
            dt_scale: float = 1.0,
            dt_init_floor: float = 1e-4,
            initialize: str = 'v0',
            forward_type: str = 'v2',
    ):
        super().__init__()
        self.k_group = 4
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = int(math.ceil(self.d_model / 16) if dt_rank == 'auto' else dt_rank)
        base = forward_type
        # The official suffixes, parsed in the official order.
        _, base = _strip_suffix(base, '_no32')  # fp32 casting only
        self.out_act_gelu, base = _strip_suffix(base, '_oact')
        no_z, base = _strip_suffix(base, '_noz')
        no_z_act, base = _strip_suffix(base, '_nozact')
        if base not in _CROSS2D_FORWARD_TYPES:
            raise ValueError(f'unsupported forward_type {forward_type!r}: this implementation covers the v2 '
                             f'SS2D ({", ".join(_CROSS2D_FORWARD_TYPES)}, optionally with _noz, _nozact, _oact, '
                             f'_no32); the released v2 models use "v05_noz"')
        self.use_z = not no_z
        self.z_act = not no_z_act
        K, D, R, N = self.k_group, self.d_inner, self.dt_rank, self.d_state

        # Parameters first, then modules, so that state_dict() lists keys in the official order.
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, D))
        if initialize == 'v0':
            self.A_logs = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(K * D, 1))
            self.Ds = nn.Parameter(torch.ones(K * D))
            self.dt_projs_weight = nn.Parameter(torch.empty(K, D, R))
            self.dt_projs_bias = nn.Parameter(torch.empty(K, D))
            dt_std = R ** -0.5 * dt_scale
            with torch.no_grad():
                if dt_init == 'constant':
                    self.dt_projs_weight.fill_(dt_std)
                elif dt_init == 'random':
                    self.dt_projs_weight.uniform_(-dt_std, dt_std)
                else:
                    raise ValueError(f'dt_init must be "random" or "constant", got {dt_init!r}')
                # softplus(bias) is log-uniform in [dt_min, dt_max]: bias = softplus^-1(dt).
                dt = torch.exp(torch.rand(K, D) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
                dt = dt.clamp(min=dt_init_floor)
                self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif initialize == 'v1':
            self.A_logs = nn.Parameter(torch.randn(K * D, N))
            self.Ds = nn.Parameter(torch.ones(K * D))
            self.dt_projs_weight = nn.Parameter(0.1 * torch.randn(K, D, R))
            self.dt_projs_bias = nn.Parameter(0.1 * torch.randn(K, D))
        elif initialize == 'v2':
            self.A_logs = nn.Parameter(torch.zeros(K * D, N))
            self.Ds = nn.Parameter(torch.ones(K * D))
            self.dt_projs_weight = nn.Parameter(0.1 * torch.rand(K, D, R))
            self.dt_projs_bias = nn.Parameter(0.1 * torch.rand(K, D))
        else:
            raise ValueError(f'initialize must be "v0", "v1" or "v2", got {initialize!r}')
        # As the official model, which stacks four default-initialised nn.Linear(d_inner, R + 2N).
        bound = 1 / math.sqrt(D)
        nn.init.uniform_(self.x_proj_weight, -bound, bound)

        self.out_norm = LayerNorm2d(D, eps=1e-5)
        self.in_proj = Linear2d(self.d_model, 2 * D if self.use_z else D, bias=bias)
        self.act = act_layer()
        self.conv2d = (nn.Conv2d(D, D, d_conv, padding=(d_conv - 1) // 2, groups=D, bias=conv_bias)
                       if d_conv > 1 else None)
        self.out_act = nn.GELU() if self.out_act_gelu else nn.Identity()
        self.out_proj = Linear2d(D, self.d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0. else nn.Identity()

    def forward_core(self, x: Tensor) -> Tensor:
        """The four-direction scan: (B, d_inner, H, W) -> (B, d_inner, H, W), before out_norm.

        The official computation in other memory layouts: x_proj runs on the channels-last tokens, and
        ``cross_selective_scan`` traverses, scans and merges (on a CPU through time-major copies; with the Triton
        kernel reading the traversals in place).
        """
        batch, _, H, W = x.shape
        K, D, R, N = self.k_group, self.d_inner, self.dt_rank, self.d_state
        x_hwc = x.permute(0, 2, 3, 1)  # (B, H, W, D)
        # x_proj of every direction, on the row-major tokens (a per-token map: traversing afterwards is the same)
        x_dbl = linear(x_hwc, self.x_proj_weight.to(x.dtype).reshape(K * (R + 2 * N), D))
        dts, Bs, Cs = torch.split(x_dbl.view(batch, H, W, K, R + 2 * N), [R, N, N], dim=4)
        y = cross_selective_scan(
            x_hwc, dts, self.dt_projs_weight.to(x.dtype), -torch.exp(_at_least_f32(self.A_logs)), Bs, Cs,
            _at_least_f32(self.Ds), delta_bias=_at_least_f32(self.dt_projs_bias).reshape(-1), delta_softplus=True,
        )  # (B, H, W, D)
        return y.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, d_model, H, W) -> (B, d_model, H, W)."""
        x = self.in_proj(x)
        z: Optional[Tensor] = None
        if self.use_z:
            x, z = x.chunk(2, dim=1)
            if self.z_act:
                z = self.act(z)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = self.act(x)
        y = self.out_act(self.out_norm(self.forward_core(x)).to(x.dtype))
        if z is not None:
            y = y * z
        return self.dropout(self.out_proj(y))


class VSSBlock(nn.Module):
    """x + drop_path(SS2D(norm(x))), then x + drop_path(MLP(norm2(x))); a branch with ratio 0 is left out."""

    def __init__(
            self,
            hidden_dim: int,
            drop_path: float = 0.,
            norm_layer: Callable[[int], nn.Module] = _NORM_LAYERS['ln2d'],
            ssm_d_state: int = 16,
            ssm_ratio: float = 2.0,
            ssm_dt_rank: Union[int, str] = 'auto',
            ssm_act_layer: Callable[[], nn.Module] = nn.SiLU,
            ssm_conv: int = 3,
            ssm_conv_bias: bool = True,
            ssm_drop_rate: float = 0.,
            ssm_init: str = 'v0',
            forward_type: str = 'v2',
            mlp_ratio: float = 4.0,
            mlp_act_layer: Callable[[], nn.Module] = nn.GELU,
            mlp_drop_rate: float = 0.,
            gmlp: bool = False,
    ):
        super().__init__()
        self.ssm_branch = ssm_ratio > 0
        self.mlp_branch = mlp_ratio > 0
        if self.ssm_branch:
            self.norm = norm_layer(hidden_dim)
            self.op = SS2D(
                d_model=hidden_dim, d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank,
                act_layer=ssm_act_layer, d_conv=ssm_conv, conv_bias=ssm_conv_bias, dropout=ssm_drop_rate,
                initialize=ssm_init, forward_type=forward_type)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        if self.mlp_branch:
            self.norm2 = norm_layer(hidden_dim)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), act_layer=mlp_act_layer, drop=mlp_drop_rate,
                           gated=gmlp)

    def forward(self, x: Tensor) -> Tensor:
        if self.ssm_branch:
            x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp_branch:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class VSSStage(nn.Module):
    """``blocks`` then ``downsample`` (the official nn.Sequential(blocks=..., downsample=...) key layout)."""

    def __init__(self, blocks: List[nn.Module], downsample: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward_blocks(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = grad_checkpoint(blk, x)
            return x
        return self.blocks(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.forward_blocks(x))


def _patch_embed_v1(in_chans: int, dim: int, patch_size: int, norm: Optional[Callable[[int], nn.Module]]):
    # Keys patch_embed.0 (conv) and patch_embed.2 (norm); index 1 is the official channel-last permute.
    return nn.Sequential(nn.Conv2d(in_chans, dim, patch_size, patch_size), nn.Identity(),
                         norm(dim) if norm else nn.Identity())


def _patch_embed_v2(in_chans: int, dim: int, patch_size: int, norm: Optional[Callable[[int], nn.Module]]):
    # Two overlapping stride-(patch/2) convs; keys patch_embed.{0,2,5,7}, the Identity slots are the official
    # permutes of the channel-last layout.
    stride = patch_size // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, stride + 1, stride, 1), nn.Identity(),
        norm(dim // 2) if norm else nn.Identity(), nn.Identity(), nn.GELU(),
        nn.Conv2d(dim // 2, dim, stride + 1, stride, 1), nn.Identity(),
        norm(dim) if norm else nn.Identity())


def _downsample_v2(dim: int, out_dim: int, norm: Callable[[int], nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Identity(), nn.Conv2d(dim, out_dim, 2, 2), nn.Identity(), norm(out_dim))


def _downsample_v3(dim: int, out_dim: int, norm: Callable[[int], nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Identity(), nn.Conv2d(dim, out_dim, 3, 2, 1), nn.Identity(), norm(out_dim))


_PATCH_EMBEDS = dict(v1=_patch_embed_v1, v2=_patch_embed_v2)
_DOWNSAMPLES = dict(v2=_downsample_v2, v3=_downsample_v3, none=lambda *_: nn.Identity())


class VSSM(nn.Module):
    """VMamba. Constructor arguments as in the official class (names, meanings and defaults).

    Args:
        patch_size: stride of the stem.
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        depths: blocks per stage.
        dims: channels per stage, or an int C for [C, 2C, 4C, 8C].
        ssm_d_state: state size N of the selective scan.
        ssm_ratio: SS2D inner channels / block channels (0: no SS2D branch).
        ssm_dt_rank: rank of the step-size projection, or 'auto' (ceil(dim / 16)).
        ssm_act_layer: 'silu', 'gelu', 'relu' or 'sigmoid'.
        ssm_conv: depthwise conv kernel inside SS2D (< 2: none).
        ssm_conv_bias: bias in that conv.
        ssm_drop_rate: dropout after SS2D's out_proj.
        ssm_init: 'v0', 'v1' or 'v2' (initialisation of dt, A and D).
        forward_type: SS2D variant; 'v05_noz' for the released v2 models (see ``SS2D``).
        mlp_ratio: MLP hidden channels / block channels (0: no MLP branch).
        mlp_act_layer: activation of the MLP.
        mlp_drop_rate: MLP dropout.
        gmlp: gated MLP.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        patch_norm: norms in the stem.
        norm_layer: 'ln2d' (released models), 'ln' (same computation) or 'bn'.
        downsample_version: 'v3' (3x3 stride-2 conv + norm, released), 'v2' (2x2 stride-2 conv + norm) or 'none'.
        patchembed_version: 'v2' (two 3x3 stride-2 convs, released) or 'v1' (one patch_size conv).
        use_checkpoint: gradient checkpointing of every block (same as ``set_grad_checkpointing``).
        posembed: a learned position embedding (1, dims[0], imgsize / patch_size, imgsize / patch_size),
            resized bicubically for other input sizes.
        imgsize: the size the position embedding is made for.
        global_pool: 'avg' (the official pooling) or '' for an unpooled ``forward_head``.
    """

    def __init__(
            self,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            depths: Sequence[int] = (2, 2, 9, 2),
            dims: Union[int, Sequence[int]] = (96, 192, 384, 768),
            ssm_d_state: int = 16,
            ssm_ratio: float = 2.0,
            ssm_dt_rank: Union[int, str] = 'auto',
            ssm_act_layer: str = 'silu',
            ssm_conv: int = 3,
            ssm_conv_bias: bool = True,
            ssm_drop_rate: float = 0.,
            ssm_init: str = 'v0',
            forward_type: str = 'v2',
            mlp_ratio: float = 4.0,
            mlp_act_layer: str = 'gelu',
            mlp_drop_rate: float = 0.,
            gmlp: bool = False,
            drop_path_rate: float = 0.1,
            patch_norm: bool = True,
            norm_layer: str = 'LN',
            downsample_version: str = 'v2',
            patchembed_version: str = 'v1',
            use_checkpoint: bool = False,
            posembed: bool = False,
            imgsize: int = 224,
            global_pool: str = 'avg',
            **kwargs: Any,
    ):
        super().__init__()
        if kwargs:
            warnings.warn(f'VSSM ignores unknown arguments: {sorted(kwargs)}', stacklevel=2)
        norm = _lookup(_NORM_LAYERS, norm_layer, 'norm_layer')
        ssm_act = _lookup(_ACT_LAYERS, ssm_act_layer, 'ssm_act_layer')
        mlp_act = _lookup(_ACT_LAYERS, mlp_act_layer, 'mlp_act_layer')
        make_stem = _lookup(_PATCH_EMBEDS, patchembed_version, 'patchembed_version')
        make_downsample = _lookup(_DOWNSAMPLES, downsample_version, 'downsample_version')
        num_stages = len(depths)
        if isinstance(dims, int):
            dims = [int(dims * 2 ** i) for i in range(num_stages)]
        if len(dims) != num_stages:
            raise ValueError(f'dims {list(dims)} and depths {list(depths)} must have one entry per stage')
        self.dims = list(dims)
        self.channel_first = norm_layer.lower() in ('bn', 'ln2d')  # the official flag; our maps are always NCHW
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.dims[-1]

        self.patch_embed = make_stem(in_chans, self.dims[0], patch_size, norm if patch_norm else None)
        if posembed:
            grid = imgsize // patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, self.dims[0], grid, grid))
            trunc_normal_(self.pos_embed, std=.02)
        else:
            self.pos_embed = None
        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linear, as the official
        self.layers = nn.ModuleList()
        self.feature_info: List[Dict[str, Any]] = []
        reduction = patch_size
        for i, depth in enumerate(depths):
            blocks = [
                VSSBlock(
                    self.dims[i], drop_path=dpr[sum(depths[:i]) + j], norm_layer=norm,
                    ssm_d_state=ssm_d_state, ssm_ratio=ssm_ratio, ssm_dt_rank=ssm_dt_rank, ssm_act_layer=ssm_act,
                    ssm_conv=ssm_conv, ssm_conv_bias=ssm_conv_bias, ssm_drop_rate=ssm_drop_rate, ssm_init=ssm_init,
                    forward_type=forward_type, mlp_ratio=mlp_ratio, mlp_act_layer=mlp_act,
                    mlp_drop_rate=mlp_drop_rate, gmlp=gmlp)
                for j in range(depth)]
            last = i == num_stages - 1
            downsample = nn.Identity() if last else make_downsample(self.dims[i], self.dims[i + 1], norm)
            self.layers.append(VSSStage(blocks, downsample))
            self.feature_info.append(dict(num_chs=self.dims[i], reduction=reduction, module=f'layers.{i}'))
            if not last and not isinstance(downsample, nn.Identity):
                reduction *= 2
        # Official key layout: classifier.norm, classifier.head (permute / avgpool / flatten hold no weights).
        self.classifier = nn.Sequential(OrderedDict(
            norm=norm(self.num_features),
            head=nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity(),
        ))
        self.apply(self._init_weights)
        # Maps are stored channels-last after the first norm (Linear2d and LayerNorm2d keep them so); conv
        # kernels stored the same way are not converted again at every call (measured: 6 ms per VMamba-T
        # forward for the last downsample's kernel alone). Values and state_dict keys are unchanged.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        if use_checkpoint:
            self.set_grad_checkpointing(True)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the official model (Linear2d is an nn.Linear: in/out projections and MLPs get this too).
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- timm model surface ------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # The official model exempts pos_embed, and marks A_logs and Ds as _no_weight_decay.
        return {'pos_embed', '*A_logs', '*Ds'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^patch_embed|^pos_embed', blocks=r'^layers\.(\d+)' if coarse else [
            (r'^layers\.(\d+)\.downsample', (0,)), (r'^layers\.(\d+)\.blocks\.(\d+)', None),
            (r'^classifier\.norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f'global_pool must be "avg" or "", got {global_pool!r}')
            self.global_pool = global_pool
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: Tensor) -> None:
        check_images(x, self.in_chans, 'VMamba', dtype=self.patch_embed[0].weight.dtype)

    def _stem(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[-2:] != x.shape[-2:]:
                pos = F.interpolate(pos, size=x.shape[-2:], mode='bicubic', align_corners=False)
            x = x + pos
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normalised last-stage map (B, num_features, H', W'); any H, W."""
        x = self._stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.classifier.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        return x if pre_logits else self.classifier.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def _stage_norm(self, i: int, x: Tensor) -> Tensor:
        norm = getattr(self, f'outnorm{i}', None)
        if norm is not None:
            return norm(x)
        # A freshly initialised LayerNorm of the official detection backbone (weight 1, bias 0) is this.
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-5).permute(0, 3, 1, 2)

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage maps (each stage's blocks, before its downsample): strides 4, 8, 16, 32 for the released models.

        Args:
            indices: which stages (None: all; n: the last n; a list: those).
            norm: put each map through its per-stage norm, as the official detection backbone
                (``Backbone_VSSM``) returns them: the ``outnorm{i}`` layers of a ``VSSMBackbone``, or on a
                classification model the LayerNorm those layers start as (no affine).
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the list of maps.
        Returns:
            (final normalised map as ``forward_features``, maps), or only the maps.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f'output_fmt must be NCHW or NHWC, got {output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x = self._stem(x)
        layers = self.layers if not stop_early else self.layers[:max_index + 1]
        intermediates = []
        for i, layer in enumerate(layers):
            x = layer.forward_blocks(x)
            if i in take_indices:
                feat = self._stage_norm(i, x) if norm else x
                intermediates.append(feat.permute(0, 2, 3, 1) if output_fmt == 'NHWC' else feat)
            if stop_early and i == max_index:
                break  # the downsample's output would be unused
            x = layer.downsample(x)
        if intermediates_only:
            return intermediates
        classifier = getattr(self, 'classifier', None)
        if len(layers) == len(self.layers) and classifier is not None:
            x = classifier.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last index (and the head) for feature extraction."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = nn.Identity()
        if hasattr(self, 'classifier'):  # a VSSMBackbone has none
            if prune_norm or max_index < len(self.dims) - 1:
                self.classifier.norm = nn.Identity()
            if prune_head:
                self.reset_classifier(0, '')
        return take_indices


class VSSMBackbone(VSSM):
    """VMamba as the official detection / segmentation backbone (``Backbone_VSSM``): no classifier, and the map
    of each stage in ``out_indices`` through its own norm ``outnorm{i}``.

    Its ``state_dict`` has the official backbone keys (``patch_embed.*``, ``layers.*``, ``outnorm{i}.*``), so
    the backbone part of the official detection checkpoints loads into it (see ``checkpoint_filter_fn``).
    ``create_model(name, features_only=True)`` builds one. Calling it returns the list of maps.

    Args:
        out_indices: the stages to return.
        output_fmt: 'NCHW' or 'NHWC'.
        **kwargs: the ``VSSM`` arguments.
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), output_fmt: str = 'NCHW', **kwargs: Any):
        kwargs.pop('num_classes', None)
        super().__init__(num_classes=0, **kwargs)
        take_indices, _ = feature_take_indices(len(self.layers), list(out_indices))
        self.out_indices = tuple(take_indices)
        self.output_fmt = output_fmt
        norm = _lookup(_NORM_LAYERS, kwargs.get('norm_layer', 'LN'), 'norm_layer')
        for i in self.out_indices:
            self.add_module(f'outnorm{i}', norm(self.dims[i]))
        del self.classifier
        self.feature_info = FeatureInfo(self.feature_info, self.out_indices)

    def forward_features(self, x: Tensor) -> List[Tensor]:  # type: ignore[override]
        return self.forward(x)

    def forward(self, x: Tensor) -> List[Tensor]:
        return self.forward_intermediates(x, indices=list(self.out_indices), norm=True, stop_early=True,
                                          output_fmt=self.output_fmt, intermediates_only=True)


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Official checkpoints (also older or detection ones) -> our keys, which are the official v2 keys.

    - old names, as the official ``VSSM._load_from_state_dict`` renames them (patch_embed.proj/norm,
      blocks' ln_1/self_attention, top-level norm/head);
    - Linear2d weights saved as 1x1 conv kernels (out, in, 1, 1) -> (out, in);
    - a position embedding of another grid is resized (bicubic);
    - detection / segmentation checkpoints: the 'backbone.' part only;
    - for a ``VSSMBackbone``: the classifier of a classification checkpoint is dropped, and per-stage norms the
      checkpoint lacks keep their initial values (as the official backbone, which loads non-strictly).
    """
    if any(k.startswith('backbone.') for k in state_dict):
        state_dict = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    renames = [('patch_embed.proj.', 'patch_embed.0.'), ('patch_embed.norm.', 'patch_embed.2.'),
               ('norm.', 'classifier.norm.'), ('head.', 'classifier.head.')]
    out: Dict[str, Tensor] = {}
    for k, v in state_dict.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        k = k.replace('.ln_1.', '.norm.').replace('.self_attention.', '.op.')
        out[k] = v
    own = model.state_dict()
    for k, v in out.items():
        if k in own and v.dim() == 4 and own[k].dim() == 2 and v.shape[2:] == (1, 1):
            out[k] = v.flatten(1)
    if 'pos_embed' in out and 'pos_embed' in own and out['pos_embed'].shape != own['pos_embed'].shape:
        pos = out['pos_embed']
        out['pos_embed'] = F.interpolate(pos.float(), size=own['pos_embed'].shape[2:], mode='bicubic',
                                         align_corners=False).to(pos.dtype)
    if isinstance(model, VSSMBackbone):
        out = {k: v for k, v in out.items() if not k.startswith('classifier.')}
        for k, v in own.items():
            if k.startswith('outnorm') and k not in out:
                out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------
# Configurations

_RELEASE = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/'


def _cfg(filename: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """The official evaluation (classification/data/build.py with TEST.CROP): resize to 224 * 256 / 224 = 256 px,
    bicubic, center crop 224, ImageNet mean/std; weights from the release page (cached by torch hub)."""
    return {
        'url': _RELEASE + filename if filename else None, 'num_classes': 1000,
        'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875, 'crop_mode': 'center',
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.0', 'classifier': 'classifier.head', 'license': 'mit',
        'origin_url': 'https://github.com/MzeroMiko/VMamba', **kwargs,
    }


def _untrained_cfg(**kwargs: Any) -> Dict[str, Any]:
    """A small configuration of ours, without weights (no url or licence), evaluated as it is trained from scratch:
    32 px images, no crop, bilinear, ImageNet mean/std; the last stage's map is 1x1."""
    return {
        'num_classes': 1000, 'input_size': (3, 32, 32), 'pool_size': (1, 1), 'crop_pct': 1.0, 'crop_mode': 'center',
        'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.0', 'classifier': 'classifier.head', **kwargs,
    }


# The released v2 weights (assets/performance.md of the official repository), as timm's ``name.tag``. Our small
# configuration (vmamba_nano) has no weights: one untagged cfg, its training input size.
default_cfgs = generate_default_cfgs({
    'vmamba_tiny.in1k': _cfg('vssm1_tiny_0230s_ckpt_epoch_264.pth'),  # [s1l8]
    'vmamba_small.in1k': _cfg('vssm_small_0229_ckpt_epoch_222.pth'),  # [s2l15]
    'vmamba_base.in1k': _cfg('vssm_base_0229_ckpt_epoch_237.pth'),  # [s2l15]
    'vmamba_tiny_s2l5.in1k': _cfg('vssm_tiny_0230_ckpt_epoch_262.pth'),
    'vmamba_small_s1l20.in1k': _cfg('vssm1_small_0229s_ckpt_epoch_240.pth'),
    'vmamba_base_s1l20.in1k': _cfg('vssm1_base_0229s_ckpt_epoch_225.pth'),
    'vmamba_nano': _untrained_cfg(),
})

# Official names -> ours: the model names of the release (MODEL.NAME in the configs), the config files, and the
# builder functions of the official vmamba.py.
_OFFICIAL_NAMES = {
    'vssm1_tiny_0230s': 'vmamba_tiny', 'vmambav2v_tiny_224': 'vmamba_tiny', 'vmamba_tiny_s1l8': 'vmamba_tiny',
    'vssm1_small_0229': 'vmamba_small', 'vssm_small_0229': 'vmamba_small', 'vmambav2_small_224': 'vmamba_small',
    'vmamba_small_s2l15': 'vmamba_small',
    'vssm1_base_0229': 'vmamba_base', 'vssm_base_0229': 'vmamba_base', 'vmambav2_base_224': 'vmamba_base',
    'vmamba_base_s2l15': 'vmamba_base',
    'vssm1_tiny_0230': 'vmamba_tiny_s2l5', 'vmambav2_tiny_224': 'vmamba_tiny_s2l5',
    'vssm1_small_0229s': 'vmamba_small_s1l20', 'vmambav2v_small_224': 'vmamba_small_s1l20',
    'vssm1_base_0229s': 'vmamba_base_s1l20', 'vmambav2v_base_224': 'vmamba_base_s1l20',
}
for _alias, _name in _OFFICIAL_NAMES.items():
    register_alias(_alias, _name)


def _create_vssm(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build through the shared builder. ``features_only``: timm's feature wrapper (FeatureGetterNet), as for every
    family: the raw stage maps of ``forward_intermediates``. With ``feature_cfg=dict(norm=True)`` (or
    ``feature_norm=True``) the wrapped model is the official detection backbone's layout (``VSSMBackbone``: each map
    through its own norm ``outnorm{i}``), into which the backbone part of the official detection checkpoints loads.
    """
    feature_cfg = dict(kwargs.pop('feature_cfg', None) or {})
    if kwargs.get('feature_norm') is not None:
        feature_cfg['norm'] = kwargs.pop('feature_norm')
    model_cls: Callable[..., nn.Module] = VSSM
    feature_cls = kwargs.get('feature_cls', feature_cfg.get('feature_cls', 'getter'))
    if kwargs.get('features_only') and feature_cls == 'getter' and feature_cfg.get('norm'):
        out_indices = kwargs.get('out_indices', feature_cfg.get('out_indices', (0, 1, 2, 3)))
        take_indices, _ = feature_take_indices(len(kwargs.get('depths', (2, 2, 9, 2))), out_indices)
        model_cls = functools.partial(VSSMBackbone, out_indices=tuple(take_indices))
    return build_model(model_cls, variant, pretrained, default_cfgs=default_cfgs,
                       checkpoint_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **kwargs)


# Every hyper-parameter of the official v2 configs (classification/configs/vssm/*.yaml).
_V2 = dict(patch_size=4, ssm_d_state=1, ssm_dt_rank='auto', ssm_act_layer='silu', ssm_conv=3, ssm_conv_bias=False,
           ssm_drop_rate=0., ssm_init='v0', forward_type='v05_noz', mlp_ratio=4.0, mlp_act_layer='gelu',
           mlp_drop_rate=0., gmlp=False, patch_norm=True, norm_layer='ln2d', downsample_version='v3',
           patchembed_version='v2', posembed=False, imgsize=224)


@register_model
def vmamba_nano(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-nano, ours (no weights): VMamba-T's v2 blocks (ssm_ratio 1, d_state 1), widths 32-256 and depths
    [1, 1, 2, 1], for training from scratch on 32 px images on a CPU (maps of 8, 4, 2 and 1 px; other sizes, 224
    included, work too). 1.76M params (1.51M with 10 classes)."""
    args = dict(_V2, dims=32, depths=[1, 1, 2, 1], ssm_ratio=1.0, drop_path_rate=0.05)
    return _create_vssm('vmamba_nano', pretrained, **dict(args, **kwargs))


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-T [s1l8] (vssm1_tiny_0230s, config vmambav2v_tiny_224): 30.2M params, 4.9 GFLOPs, 82.6% top-1."""
    args = dict(_V2, dims=96, depths=[2, 2, 8, 2], ssm_ratio=1.0, drop_path_rate=0.2)
    return _create_vssm('vmamba_tiny', pretrained, **dict(args, **kwargs))


@register_model
def vmamba_small(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-S [s2l15] (vssm1_small_0229, config vmambav2_small_224): 50.1M params, 8.7 GFLOPs, 83.6% top-1."""
    args = dict(_V2, dims=96, depths=[2, 2, 15, 2], ssm_ratio=2.0, drop_path_rate=0.3)
    return _create_vssm('vmamba_small', pretrained, **dict(args, **kwargs))


@register_model
def vmamba_base(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-B [s2l15] (vssm1_base_0229, config vmambav2_base_224): 88.6M params, 15.4 GFLOPs, 83.9% top-1."""
    args = dict(_V2, dims=128, depths=[2, 2, 15, 2], ssm_ratio=2.0, drop_path_rate=0.6)
    return _create_vssm('vmamba_base', pretrained, **dict(args, **kwargs))


@register_model
def vmamba_tiny_s2l5(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-T [s2l5] (vssm1_tiny_0230, config vmambav2_tiny_224): 30.7M params."""
    args = dict(_V2, dims=96, depths=[2, 2, 5, 2], ssm_ratio=2.0, drop_path_rate=0.2)
    return _create_vssm('vmamba_tiny_s2l5', pretrained, **dict(args, **kwargs))


@register_model
def vmamba_small_s1l20(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-S [s1l20] (vssm1_small_0229s, config vmambav2v_small_224): 49.0M params."""
    args = dict(_V2, dims=96, depths=[2, 2, 20, 2], ssm_ratio=1.0, drop_path_rate=0.3)
    return _create_vssm('vmamba_small_s1l20', pretrained, **dict(args, **kwargs))


@register_model
def vmamba_base_s1l20(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-B [s1l20] (vssm1_base_0229s, config vmambav2v_base_224): 86.6M params."""
    args = dict(_V2, dims=128, depths=[2, 2, 20, 2], ssm_ratio=1.0, drop_path_rate=0.5)
    return _create_vssm('vmamba_base_s1l20', pretrained, **dict(args, **kwargs))
