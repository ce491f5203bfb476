"""Vision Mamba (Vim): a plain stack of bidirectional Mamba blocks over image patches.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model", Zhu et al.,
ICML 2024 (https://arxiv.org/abs/2401.09417). Official code and weights: hustvl/Vim (Apache-2.0). This is an
independent implementation with the official ``state_dict`` layout (keys and shapes; the released checkpoints load
strictly, weights under 'model') and the official forward pass, on our pure-PyTorch selective scan.

Layout: 16x16 patch embedding (stride 16, or 8 for the fine-grained '+' models), a class token inserted in the
MIDDLE of the patch sequence, an absolute position embedding laid out in that same order, then ``depth`` blocks
"add -> RMSNorm -> bidirectional Mamba" with the residual stream carried apart in float32 (the official fused
add-norm), a final add -> RMSNorm, and a linear head on the class token.

Facts from the official code worth knowing:
* The released names say ``final_pool_mean``, but with a class token the official ``forward_features`` returns the
  class token's final state; ``final_pool_type`` is only used by models without one. We do the same.
* The base entrypoint passes a misspelt ``if_devide_out=True`` that the official class swallows in ``**kwargs``;
  ``if_divide_out`` defaults to True anyway, so all released models average the two scan directions.
* The position embedding is in sequence order, so its class-token entry sits at index ``num_patches // 2``. When the
  grid changes (other input sizes, at load time or on the fly) we resample the patch entries bicubically, as timm
  does for ViTs, and put the class-token entry back in the middle of the new sequence. (The official fine-tuning
  script treats entry 0 as the class token, which is wrong for these models.)
"""
import math
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, RmsNorm, lecun_normal_, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import checkpoint as grad_checkpoint
from timm.models._features import feature_take_indices

from ._blocks import Mamba, check_images
from ._builder import build_model, generate_default_cfgs, register_alias, register_model

__all__ = ['VisionMamba', 'class_token_positions', 'resample_pos_embed']

# Where the class token(s) sit in the token sequence.
CLASS_TOKEN_LAYOUTS = ('middle', 'first', 'double', 'none')


def class_token_positions(num_patches: int, layout: str) -> List[int]:
    """Indices of the class token(s) in a sequence of ``num_patches`` patches plus the class token(s).

    'middle': [num_patches // 2] (released models); 'first': [0]; 'double': [0, num_patches + 1] (a head and a tail
    token); 'none': [].
    """
    if layout == 'middle':
        return [num_patches // 2]
    if layout == 'first':
        return [0]
    if layout == 'double':
        return [0, num_patches + 1]
    if layout == 'none':
        return []
    raise ValueError(f"unknown class-token layout '{layout}'; one of middle, first, double, none")


def insert_tokens(x: Tensor, tokens: List[Tensor], positions: List[int]) -> Tensor:
    """Insert ``tokens[i]`` (B, 1, D) into the sequence ``x`` (B, L, D) so that it ends up at ``positions[i]``
    (positions ascending, as ``class_token_positions`` gives them)."""
    for i in range(len(positions)):
        pos = positions[i]
        x = torch.cat([x[:, :pos], tokens[i], x[:, pos:]], dim=1)
    return x


def split_tokens(x: Tensor, layout: str) -> Tuple[Tensor, Tensor]:
    """(B, L, D) -> (patch tokens (B, P, D), class tokens (B, n_cls, D)) for a class-token ``layout``."""
    n_cls = len(class_token_positions(0, layout))
    positions = class_token_positions(x.shape[1] - n_cls, layout)
    if len(positions) == 0:
        return x, x[:, :0]
    # the kept tokens by index ranges, not a boolean mask: exporters then know the output's size
    kept: List[Tensor] = []
    start = 0
    for pos in positions:
        kept.append(torch.arange(start, pos, device=x.device))
        start = pos + 1
    kept.append(torch.arange(start, x.shape[1], device=x.device))
    return x.index_select(1, torch.cat(kept)), x.index_select(1, torch.tensor(positions, device=x.device))


def resample_pos_embed(
        pos_embed: Tensor,
        new_grid: List[int],
        old_grid: List[int],
        layout: str = 'middle',
        interpolation: str = 'bicubic',
        antialias: bool = True,
) -> Tensor:
    """Resample a Vim position embedding (1, P + n_cls, D) laid out in sequence order to another patch grid.

    The class-token entries are taken out at their positions for the old grid, the patch entries are resampled as
    timm does for ViTs (``resample_abs_pos_embed``, bicubic), and the class-token entries are put back at their
    positions for the new grid (for 'middle': in the middle of the new sequence).
    """
    old = [int(old_grid[0]), int(old_grid[1])]
    new = [int(new_grid[0]), int(new_grid[1])]
    if old == new:
        return pos_embed
    patches, cls = split_tokens(pos_embed, layout)
    if patches.shape[1] != old[0] * old[1]:
        raise ValueError(f'position embedding has {patches.shape[1]} patch entries, not {old[0]}x{old[1]}')
    patches = resample_abs_pos_embed(patches, new, old, num_prefix_tokens=0, interpolation=interpolation,
                                     antialias=antialias)
    return insert_tokens(patches, list(cls.split(1, dim=1)), class_token_positions(new[0] * new[1], layout))


# Leaves for FX tracing: they branch on the input's size (class-token positions, a grid other than the trained one).
torch.fx.wrap('insert_tokens')
torch.fx.wrap('resample_pos_embed')


def _norm_in_input_dtype(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)`` computed in x's dtype (upcasting the weights): the official fused add-norm kernel normalises the
    float32 residual in float32 whatever the model's dtype."""
    if isinstance(norm, RmsNorm):
        weight = norm.weight.to(x.dtype) if norm.weight is not None else None
        return F.rms_norm(x, norm.normalized_shape, weight, norm.eps)
    if isinstance(norm, nn.LayerNorm):
        weight = norm.weight.to(x.dtype) if norm.weight is not None else None
        bias = norm.bias.to(x.dtype) if norm.bias is not None else None
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    return norm(x)


class PatchEmbed(nn.Module):
    """Conv patch embedding with a stride (8 for the fine-grained models): (B, C, H, W) -> (B, P, D)."""

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, stride: int = 16,
                 in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = int(stride)
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def feat_size(self, img_size: List[int]) -> Tuple[int, int]:
        """The patch grid for an input of ``img_size`` (H, W)."""
        return ((img_size[0] - self.patch_size[0]) // self.stride + 1, (img_size[1] - self.patch_size[1]) // self.stride + 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VimBlock(nn.Module):
    """Add -> norm -> mixer, returning (mixer output, residual stream), as the official ``Block``.

    The residual stream is the sum of the block inputs; with ``residual_in_fp32`` it is kept in (at least)
    float32 and normalised at that precision, the output cast back to the mixer's dtype (the fused add-norm).
    """

    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, drop_path: float = 0.,
                 residual_in_fp32: bool = True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = mixer
        self.norm = norm
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, hidden_states: Tensor, residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
        if self.residual_in_fp32:
            residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        if torch.jit.is_scripting():  # scripted: the module's own dtype (the same for a float32 model)
            normed = self.norm(residual)
        else:
            normed = _norm_in_input_dtype(self.norm, residual)
        hidden_states = normed.to(hidden_states.dtype)
        return self.mixer(hidden_states), residual


class VisionMamba(nn.Module):
    """Vision Mamba. Constructor arguments as in the official class (names, meanings and defaults).

    Args:
        img_size: training input size; the position embedding has this grid (other sizes resample it).
        patch_size: patch size of the patch embedding.
        stride: stride of the patch embedding (16, or 8 for the fine-grained models).
        depth: number of blocks.
        embed_dim: token width.
        d_state: SSM state size.
        channels: input channels (official name; ``in_chans`` is the timm name for the same thing).
        num_classes: classifier outputs (0 for no classifier).
        ssm_cfg: extra arguments of the Mamba mixer (d_conv, expand, dt_rank, dt_min, ...); unknown ones raise,
            as in the official module.
        drop_rate: dropout after the position embedding.
        drop_path_rate: stochastic depth (linear over the blocks; the last rate also drops the final add).
        norm_epsilon: epsilon of the norms.
        rms_norm: RMSNorm (True) or LayerNorm.
        initializer_cfg: arguments of the official Mamba initialiser (rescale_prenorm_residual,
            n_residuals_per_layer, initializer_range).
        fused_add_norm: accepted: the official kernel choice; the math is the same either way.
        residual_in_fp32: carry the residual stream in float32.
        device, dtype: where to create the model and in which dtype (the whole model is moved/cast).
        ft_seq_len, pt_hw_seq_len, if_rope_residual: rotary-embedding settings, unused without rope.
        if_bidirectional: the official alternative of pairing unidirectional blocks; not implemented (no release).
        final_pool_type: pooling of models WITHOUT a class token: 'none' (last token), 'mean', 'max' (max of the
            per-token logits) or 'all' (per-token logits).
        if_abs_pos_embed: learned absolute position embedding.
        if_rope: rotary embedding; not implemented (no released model uses it).
        flip_img_sequences_ratio: random sequence flip during training; not implemented (no released model uses it).
        if_bimamba: the official switch to bimamba 'v1'; not implemented.
        bimamba_type: 'v2' (released: a forward and a backward scan with their own parameters) or 'none'.
        if_cls_token: use a class token (its final state is the pooled feature).
        if_divide_out: average (True) instead of sum the two scan directions.
        init_layer_scale: layer scale on the mixer output (``gamma`` keys) if set.
        use_double_cls_token: a class token at each end instead of one.
        use_middle_cls_token: the class token in the middle of the sequence (released) instead of first.
        in_chans: timm name for ``channels`` (timm's builder passes it).
        global_pool: override the pooling: 'token', 'avg', 'last', 'max' or '' (see ``forward_head``).
        **kwargs: accepted and ignored with a warning, as the official class ignores them; the official base
            entrypoint's misspelt ``if_devide_out`` is ignored silently.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            stride: int = 16,
            depth: int = 24,
            embed_dim: int = 192,
            d_state: int = 16,
            channels: int = 3,
            num_classes: int = 1000,
            ssm_cfg: Optional[Dict[str, Any]] = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            norm_epsilon: float = 1e-5,
            rms_norm: bool = True,
            initializer_cfg: Optional[Dict[str, Any]] = None,
            fused_add_norm: bool = True,
            residual_in_fp32: bool = True,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            ft_seq_len: Optional[int] = None,
            pt_hw_seq_len: int = 14,
            if_bidirectional: bool = False,
            final_pool_type: str = 'none',
            if_abs_pos_embed: bool = True,
            if_rope: bool = False,
            if_rope_residual: bool = False,
            flip_img_sequences_ratio: float = -1.,
            if_bimamba: bool = False,
            bimamba_type: str = 'v2',
            if_cls_token: bool = True,
            if_divide_out: bool = True,
            init_layer_scale: Optional[float] = None,
            use_double_cls_token: bool = False,
            use_middle_cls_token: bool = True,
            in_chans: Optional[int] = None,
            global_pool: Optional[str] = None,
            **kwargs: Any,
    ):
        super().__init__()
        kwargs.pop('if_devide_out', None)  # the official base entrypoint's typo; the official class ignores it
        if kwargs:
            warnings.warn(f'VisionMamba ignores unknown arguments (as the official class does): {sorted(kwargs)}',
                          stacklevel=2)
        for flag, name in ((if_rope, 'if_rope'), (if_bidirectional, 'if_bidirectional'),
                           (flip_img_sequences_ratio > 0, 'flip_img_sequences_ratio > 0')):
            if flag:
                raise NotImplementedError(f'VisionMamba: {name} is not implemented (no released Vim model uses it)')
        if if_bimamba:
            bimamba_type = 'v1'  # as the official create_block does; the mixer says it is not implemented
        if in_chans is not None and channels not in (3, in_chans):
            raise ValueError(f'channels={channels} and in_chans={in_chans} disagree (they name the same thing)')
        in_chans = channels if in_chans is None else in_chans
        if final_pool_type not in _POOL_OF_FINAL_POOL_TYPE:
            raise ValueError(f'final_pool_type must be one of {sorted(_POOL_OF_FINAL_POOL_TYPE)}, got '
                             f'{final_pool_type!r}')

        self.in_chans = in_chans
        self.num_classes = num_classes
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.final_pool_type = final_pool_type
        self.if_abs_pos_embed = if_abs_pos_embed
        self.if_cls_token = if_cls_token
        self.use_double_cls_token = use_double_cls_token
        self.use_middle_cls_token = use_middle_cls_token
        if not if_cls_token:
            self.class_token_layout = 'none'
        elif use_double_cls_token:
            self.class_token_layout = 'double'
        else:
            self.class_token_layout = 'middle' if use_middle_cls_token else 'first'
        self.num_prefix_tokens = self.num_tokens = len(class_token_positions(0, self.class_token_layout))
        self.d_model = self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.global_pool = self._check_pool(global_pool if global_pool is not None else (
            'token' if if_cls_token else _POOL_OF_FINAL_POOL_TYPE[final_pool_type]))
        self.grad_checkpointing = False

        # Registration order follows the official module (state_dict lists keys in the official order).
        if self.class_token_layout == 'double':
            self.cls_token_head = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.cls_token_tail = nn.Parameter(torch.zeros(1, 1, embed_dim))
        elif if_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, stride=stride, in_chans=in_chans,
                                      embed_dim=embed_dim)
        if if_abs_pos_embed:
            self.pos_embed = nn.Parameter(
                torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
            self.pos_drop = nn.Dropout(p=drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        # Block i drops the output of block i - 1 (the official ``inter_dpr = [0] + dpr``); the final add uses
        # the full rate.
        dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0. else nn.Identity()

        def norm_layer() -> nn.Module:
            return RmsNorm(embed_dim, eps=norm_epsilon) if rms_norm else nn.LayerNorm(embed_dim, eps=norm_epsilon)

        self.layers = nn.ModuleList([
            VimBlock(
                embed_dim,
                mixer=Mamba(embed_dim, d_state=d_state, layer_idx=i, bimamba_type=bimamba_type,
                            if_divide_out=if_divide_out, init_layer_scale=init_layer_scale, **(ssm_cfg or {})),
                norm=norm_layer(),
                drop_path=dpr[i],
                residual_in_fp32=residual_in_fp32,
            )
            for i in range(depth)])
        self.norm_f = norm_layer()
        self.feature_info = [dict(num_chs=embed_dim, reduction=self.patch_embed.stride, module=f'layers.{i}')
                             for i in range(depth)]
        self._init_weights(depth, **(initializer_cfg or {}))
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _init_weights(self, depth: int, initializer_range: float = 0.02, rescale_prenorm_residual: bool = True,
                      n_residuals_per_layer: int = 1) -> None:
        """The official initialisation (``segm_init_weights`` for the embeddings/head, then Mamba's)."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)
        for name in ('pos_embed', 'cls_token', 'cls_token_head', 'cls_token_tail'):
            if hasattr(self, name):
                trunc_normal_(getattr(self, name), std=.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None \
                    and not getattr(module.bias, '_no_reinit', False):
                nn.init.zeros_(module.bias)
            if rescale_prenorm_residual and isinstance(module, Mamba):
                # GPT-2 style: the projection into the residual stream scaled by 1 / sqrt(residuals per layer * depth).
                nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.out_proj.weight /= math.sqrt(n_residuals_per_layer * depth)

    @staticmethod
    def _check_pool(global_pool: str) -> str:
        if global_pool not in ('token', 'avg', 'last', 'max', ''):
            raise ValueError(f"global_pool must be 'token', 'avg', 'last', 'max' or '', got {global_pool!r}")
        return global_pool

    # -- timm model surface ------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # The official set, plus A (2-D, so timm's optimizer factory would decay it) and D, as fnmatch patterns.
        return {'pos_embed', 'cls_token', 'dist_token', 'cls_token_head', 'cls_token_tail',
                '*A_log', '*A_b_log', '*.D', '*.D_b'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^cls_token|^pos_embed|^patch_embed', blocks=[(r'^layers\.(\d+)', None),
                                                                        (r'^norm_f', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool == 'token' and not self.num_prefix_tokens:
                raise ValueError("global_pool='token' needs a class token (if_cls_token=True)")
            self.global_pool = self._check_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- forward -----------------------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        patch, stride = self.patch_embed.patch_size[0], self.patch_embed.stride
        check_images(x, self.in_chans, 'Vim', minimum=patch, offset=patch, multiple=stride,
                     multiple_name='the patch size ' if patch == stride else '', dtype=self.patch_embed.proj.weight.dtype)

    def _pos_embed(self, grid: Tuple[int, int]) -> Tensor:
        """The position embedding for a patch grid (resampled on the fly when it is not the training grid)."""
        trained = self.patch_embed.grid_size
        return resample_pos_embed(self.pos_embed, [grid[0], grid[1]], [trained[0], trained[1]],
                                  self.class_token_layout)

    def _class_tokens(self, batch: int) -> List[Tensor]:
        # hasattr, not the layout's name: TorchScript skips the branches of the tokens this model does not have
        if hasattr(self, 'cls_token_head'):
            return [self.cls_token_head.expand(batch, -1, -1), self.cls_token_tail.expand(batch, -1, -1)]
        if hasattr(self, 'cls_token'):
            return [self.cls_token.expand(batch, -1, -1)]
        return []

    def _embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Images -> (tokens (B, P + n_cls, D) with class token(s) and position embedding, patch grid)."""
        self._check_input(x)
        grid = self.patch_embed.feat_size(x.shape[-2:])
        x = self.patch_embed(x)
        x = insert_tokens(x, self._class_tokens(x.shape[0]), class_token_positions(x.shape[1], self.class_token_layout))
        if self.if_abs_pos_embed:
            x = self.pos_drop(x + self._pos_embed(grid))
        return x, grid

    def _run_layer(self, layer: nn.Module, hidden: Tensor, residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return grad_checkpoint(layer, hidden, residual)
        return layer(hidden, residual)

    def _final_norm(self, hidden: Tensor, residual: Tensor) -> Tensor:
        residual = residual + self.drop_path(hidden)
        if torch.jit.is_scripting():  # scripted: the module's own dtype (the same for a float32 model)
            return self.norm_f(residual).to(hidden.dtype)
        return _norm_in_input_dtype(self.norm_f, residual).to(hidden.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normalised tokens (B, P + n_cls, D), class token(s) in place (P = patch count)."""
        hidden, _ = self._embed(x)
        residual: Optional[Tensor] = None
        for layer in self.layers:  # not through _run_layer: TorchScript takes no module as an argument
            if self.grad_checkpointing and not torch.jit.is_scripting():
                hidden, residual = grad_checkpoint(layer, hidden, residual)
            else:
                hidden, residual = layer(hidden, residual)
        assert residual is not None  # (there is at least one layer)
        return self._final_norm(hidden, residual)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens -> logits (or the pooled feature with ``pre_logits``). Pooling by ``global_pool``:
        'token' the class token (the mean of both for two), 'avg' the mean of the patch tokens, 'last' the last
        token, 'max' the max over tokens of the per-token logits, '' per-token logits."""
        if self.global_pool == 'token':
            positions = class_token_positions(x.shape[1] - self.num_prefix_tokens, self.class_token_layout)
            x = x[:, positions[0]] if len(positions) == 1 else x[:, positions].mean(dim=1)
        elif self.global_pool == 'avg':
            x = split_tokens(x, self.class_token_layout)[0].mean(dim=1)
        elif self.global_pool == 'last':
            x = x[:, -1]
        if pre_logits:
            return x
        x = self.head(x)
        return x.max(dim=1).values if self.global_pool == 'max' else x

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        """Logits, or with ``return_features`` the pooled feature (what the official ``forward_features`` returns)."""
        if not torch.jit.is_scripting():
            if isinstance(return_features, torch.fx.Proxy):  # FX makes every argument a placeholder: trace the logits
                return_features = False
        return self.forward_head(self.forward_features(x), pre_logits=return_features)

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Any], Tuple[Tensor, List[Any]]]:
        """Per-block feature maps for dense tasks: the residual stream after each block, class token(s) removed.

        Args:
            indices: which blocks (None: all; n: the last n; a list: those).
            return_prefix_tokens: return (map, class tokens (B, n_cls, D)) pairs.
            norm: apply the final norm to each map.
            stop_early: stop after the last requested block.
            output_fmt: 'NCHW' (B, D, H', W'), 'NHWC' or 'NLC' (B, P, D); H' = H/16 for the stride-16 models.
            intermediates_only: return only the list.
        Returns:
            (final normalised tokens as ``forward_features`` returns them, list), or the list.
        """
        if output_fmt not in ('NCHW', 'NHWC', 'NLC'):
            raise ValueError(f'output_fmt must be NCHW, NHWC or NLC, got {output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        hidden, (gh, gw) = self._embed(x)
        layers = self.layers[:max_index + 1] if stop_early else self.layers
        residual = None
        intermediates = []
        for i, layer in enumerate(layers):
            hidden, residual = self._run_layer(layer, hidden, residual)
            if i in take_indices:
                stream = residual + hidden
                stream = (_norm_in_input_dtype(self.norm_f, stream) if norm else stream).to(hidden.dtype)
                patches, cls = split_tokens(stream, self.class_token_layout)
                if output_fmt != 'NLC':
                    patches = patches.reshape(patches.shape[0], gh, gw, -1)
                    if output_fmt == 'NCHW':
                        patches = patches.permute(0, 3, 1, 2).contiguous()
                intermediates.append((patches, cls) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        return self._final_norm(hidden, residual), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last index (and the final norm / head) for feature extraction."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


# The official ``final_pool_type`` of models without a class token -> our ``global_pool``.
_POOL_OF_FINAL_POOL_TYPE = {'none': 'last', 'mean': 'avg', 'max': 'max', 'all': ''}


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Official checkpoints have our layout. A position embedding for another (square) patch grid is resampled to
    the model's grid, with the class token(s) kept where the model puts them (the middle for released models)."""
    pos_embed = state_dict.get('pos_embed')
    own = getattr(model, 'pos_embed', None)
    if pos_embed is None or own is None or pos_embed.shape == own.shape or pos_embed.dim() != 3 \
            or pos_embed.shape[-1] != own.shape[-1]:
        return state_dict
    n_patches = pos_embed.shape[1] - model.num_prefix_tokens
    side = math.isqrt(max(n_patches, 0))
    if side * side != n_patches:
        return state_dict  # not a square grid: leave it, the loader reports the mismatch
    state_dict = dict(state_dict)
    state_dict['pos_embed'] = resample_pos_embed(pos_embed, model.patch_embed.grid_size, (side, side),
                                                 model.class_token_layout)
    return state_dict


# ---------------------------------------------------------------------------------------------------------
# Configurations

def _cfg(hf_hub_id: str, filename: str, **kwargs: Any) -> Dict[str, Any]:
    return {
        'hf_hub_id': hf_hub_id, 'hf_hub_filename': filename, 'num_classes': 1000,
        'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': 0.875, 'crop_mode': 'center',
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0', **kwargs,
    }


def _untrained_cfg(**kwargs: Any) -> Dict[str, Any]:
    """A small configuration of ours, without weights (no hub id, url or licence), evaluated as it is trained from
    scratch: 32 px images, no crop, bilinear, ImageNet mean/std."""
    return {
        'num_classes': 1000, 'input_size': (3, 32, 32), 'pool_size': None, 'crop_pct': 1.0, 'crop_mode': 'center',
        'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', **kwargs,
    }


# One cfg per released weight file, as timm's ``name.tag`` (all trained on ImageNet-1K; the stride-8 ones fine-tuned
# from the stride-16 ones). Evaluated as the official main.py does: resize to 224 / 0.875, bicubic, center crop.
# Our small configuration (vim_nano) has no weights: one untagged cfg, its training input size.
default_cfgs = generate_default_cfgs({
    'vim_tiny.in1k': _cfg('hustvl/Vim-tiny-midclstok', 'vim_t_midclstok_76p1acc.pth'),
    'vim_tiny_stride8.in1k': _cfg('hustvl/Vim-tiny-midclstok', 'vim_t_midclstok_ft_78p3acc.pth'),
    'vim_small.in1k': _cfg('hustvl/Vim-small-midclstok', 'vim_s_midclstok_80p5acc.pth'),
    'vim_small_stride8.in1k': _cfg('hustvl/Vim-small-midclstok', 'vim_s_midclstok_ft_81p6acc.pth'),
    'vim_base.in1k': _cfg('hustvl/Vim-base-midclstok', 'vim_b_midclstok_81p9acc.pth'),
    'vim_nano': _untrained_cfg(),
})

# Official entrypoint names (hustvl/Vim vim/models_mamba.py) -> ours.
_OFFICIAL_NAMES = {
    'vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2': 'vim_tiny',
    'vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2': 'vim_tiny_stride8',
    'vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2': 'vim_small',
    'vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2': 'vim_small_stride8',
    'vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2': 'vim_base',
}
for _alias, _name in _OFFICIAL_NAMES.items():
    register_alias(_alias, _name)


def _create_vim(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    if 'channels' in kwargs:  # the official name; timm's builder passes in_chans=3 unless told otherwise
        kwargs['in_chans'] = kwargs.pop('channels')
    feature_cfg = {'out_indices': 3, **(kwargs.pop('feature_cfg', None) or {})}  # the last 3 blocks, as timm's ViTs
    return build_model(VisionMamba, variant, pretrained, default_cfgs=default_cfgs,
                       checkpoint_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg, **kwargs)


# The released configuration (official entrypoints): bimamba v2 averaged, middle class token, absolute position
# embedding, RMSNorm with the residual in float32.
_RELEASED = dict(patch_size=16, depth=24, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                 final_pool_type='mean', if_abs_pos_embed=True, if_rope=False, if_rope_residual=False,
                 bimamba_type='v2', if_cls_token=True, if_divide_out=True, use_middle_cls_token=True)


@register_model
def vim_nano(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-nano, ours (no weights): the released block configuration, narrow and shallow, for training from scratch
    on 32 px images on a CPU: 4x4 patches (an 8x8 grid and the middle class token at 32 px), width 96, 8 blocks.
    0.76M params (0.66M with 10 classes)."""
    args = dict(_RELEASED, img_size=32, patch_size=4, stride=4, embed_dim=96, depth=8, drop_path_rate=0.05)
    return _create_vim('vim_nano', pretrained, **dict(args, **kwargs))


@register_model
def vim_tiny(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-Ti (7.1M params, 76.1% ImageNet top-1)."""
    args = dict(_RELEASED, embed_dim=192)
    return _create_vim('vim_tiny', pretrained, **dict(args, **kwargs))


@register_model
def vim_tiny_stride8(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-Ti+ (7.3M params, 78.3%): patch 16 at stride 8 (27x27 patches at 224), fine-tuned from Vim-Ti."""
    args = dict(_RELEASED, embed_dim=192, stride=8)
    return _create_vim('vim_tiny_stride8', pretrained, **dict(args, **kwargs))


@register_model
def vim_small(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-S (25.8M params, 80.5%)."""
    args = dict(_RELEASED, embed_dim=384)
    return _create_vim('vim_small', pretrained, **dict(args, **kwargs))


@register_model
def vim_small_stride8(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-S+ (26.0M params, 81.6%): patch 16 at stride 8, fine-tuned from Vim-S."""
    args = dict(_RELEASED, embed_dim=384, stride=8)
    return _create_vim('vim_small_stride8', pretrained, **dict(args, **kwargs))


@register_model
def vim_base(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-B (97.6M params, 81.9%)."""
    args = dict(_RELEASED, embed_dim=768, d_state=16)
    return _create_vim('vim_base', pretrained, **dict(args, **kwargs))
