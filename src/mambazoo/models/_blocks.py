"""Blocks shared by the model families: the Mamba mixer (one scan direction, or Vim's two), and the input check.

``Mamba`` has the constructor arguments and ``state_dict`` layout of mamba_ssm's ``modules/mamba_simple.Mamba`` as
modified by Vim (hustvl/Vim ``mamba-1p1p1``): ``bimamba_type='v2'`` adds a backward branch with its own conv1d,
x_proj, dt_proj, A and D (the ``*_b`` keys) that reads the sequence in reverse. Only the official fused CUDA path
computes that backward branch (its fallback path silently drops it); this module always does.

The forward is the official fused path's computation split around its GEMMs: in_proj, then the ops
``mamba_inner_conv`` (conv1d + SiLU of both branches; the backward branch's conv is anti-causal in the original
token order) and, between them, x_proj and dt_proj as module calls, ``mamba_inner_scan`` (the gated scan of both
directions, the backward one from the last step), then out_proj. Which implementation the ops run (compiled CPU
loops, pure PyTorch, Triton, the loop-free export scan) is theirs to decide (``ops.policy``).
"""
import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops.mamba_inner import fused_inner_applies, mamba_inner_conv, mamba_inner_fused, mamba_inner_scan

__all__ = ['Mamba', 'check_images']


def check_images(x: Tensor, in_chans: int, family: str, minimum: int = 1, offset: int = 0, multiple: int = 1,
                 multiple_name: str = '', dtype: Optional[torch.dtype] = None) -> None:
    """Raise a ValueError naming the problem unless ``x`` is a batch of images (B, in_chans, H, W) whose height and
    width are at least ``minimum`` and of the form ``offset + k * multiple`` (the family's size rule; the message
    calls ``multiple`` by ``multiple_name``, e.g. 'the patch size '), of the model's floating ``dtype`` (that of its
    first convolution's weight; any floating type under autocast, which casts).

    Tracers record no check: under FX tracing (a Proxy) it returns at once; TorchScript compiles it as is.
    """
    if not torch.jit.is_scripting():
        if isinstance(x, torch.fx.Proxy):
            return
    if x.dim() != 4 or x.shape[1] != in_chans:
        shape = '(' + ', '.join([str(size) for size in x.shape]) + ')'
        raise ValueError(f'expected images (B, {in_chans}, H, W), got shape {shape}')
    if not x.is_floating_point():
        raise ValueError(f'expected floating-point images, got {x.dtype}: convert them (e.g. x.float() / 255)')
    if dtype is not None and x.dtype != dtype and not torch.jit.is_scripting():
        if not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f'{family} has {dtype} weights but the images are {x.dtype}: convert the images '
                             f'(x.to({dtype})) or the model (model.to({x.dtype}))')
    height, width = x.shape[-2], x.shape[-1]
    if height < minimum or width < minimum or (height - offset) % multiple or (width - offset) % multiple:
        rule = (f'divisible by {multiple_name}{multiple}' if offset % multiple == 0
                else f'of the form {offset} + k * {multiple}')
        if minimum > max(multiple, offset):
            rule = f'{rule}, at least {minimum}'
        raise ValueError(f'{family} needs height and width {rule}; got ({height}, {width}). Resize or pad the image.')


class Mamba(nn.Module):
    """The Mamba mixer: in_proj to (x, z), causal depthwise conv1d + SiLU on x, input-dependent (dt, B, C) from
    x_proj/dt_proj, selective scan gated by SiLU(z), out_proj. (B, L, d_model) -> (B, L, d_model).

    Args (names and defaults of the official ``Mamba``, so that Vim's ``ssm_cfg`` dicts work unchanged):
        d_model: token width.
        d_state: SSM state size N.
        d_conv: conv1d kernel size.
        expand: d_inner = expand * d_model.
        dt_rank: rank of the dt projection ('auto': ceil(d_model / 16)).
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: initialisation of dt_proj (softplus(bias) log-uniform in
            [dt_min, dt_max]; weight uniform or constant with scale dt_rank ** -0.5 * dt_scale).
        conv_bias: bias in conv1d.
        bias: bias in in_proj and out_proj.
        use_fast_path: accepted for compatibility; there is one path here (the official fast path's math).
        layer_idx: kept as an attribute (the official uses it for generation caches).
        device, dtype: factory arguments of the parameters.
        bimamba_type: 'none' (one direction) or 'v2' (Vim: a backward branch with its own parameters).
        if_divide_out: with 'v2', average the two directions instead of summing them.
        init_layer_scale: if set, the output is scaled by a learned per-channel ``gamma`` (this initial value).
    """

    bidirectional: torch.jit.Final[bool]  # a constant for TorchScript: the one-direction mixer has no *_b modules
    if_divide_out: torch.jit.Final[bool]
    init_layer_scale: torch.jit.Final[Optional[float]]

    def __init__(
            self,
            d_model: int,
            d_state: int = 16,
            d_conv: int = 4,
            expand: float = 2,
            dt_rank: Union[int, str] = 'auto',
            dt_min: float = 0.001,
            dt_max: float = 0.1,
            dt_init: str = 'random',
            dt_scale: float = 1.0,
            dt_init_floor: float = 1e-4,
            conv_bias: bool = True,
            bias: bool = False,
            use_fast_path: bool = True,
            layer_idx: Optional[int] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            bimamba_type: str = 'none',
            if_divide_out: bool = False,
            init_layer_scale: Optional[float] = None,
    ):
        super().__init__()
        if bimamba_type not in ('none', 'v2'):
            raise NotImplementedError(
                f'bimamba_type={bimamba_type!r} is not implemented: only "none" (one direction) and "v2" (the '
                f'released Vim models) are; "v1" shares one conv1d/x_proj between directions and has no release')
        if dt_init not in ('random', 'constant'):
            raise NotImplementedError(f'dt_init must be "random" or "constant", got {dt_init!r}')
        factory = {'device': device, 'dtype': dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == 'auto' else int(dt_rank)
        self.layer_idx = layer_idx
        self.bimamba_type = bimamba_type
        self.bidirectional = bimamba_type == 'v2'
        self.if_divide_out = if_divide_out
        self.init_layer_scale = init_layer_scale
        d_inner = self.d_inner

        # Registration order follows the official module, so state_dict() lists keys in the official order.
        if init_layer_scale is not None:
            self.gamma = nn.Parameter(init_layer_scale * torch.ones(d_model, device=device, dtype=dtype))
        # A and D stay float32 whatever ``dtype`` is, as in the official module.
        self.A_log = nn.Parameter(self._s4d_real_log(d_inner, d_state, device))
        self.D = nn.Parameter(torch.ones(d_inner, device=device))
        if self.bidirectional:
            self.A_b_log = nn.Parameter(self._s4d_real_log(d_inner, d_state, device))
            self.D_b = nn.Parameter(torch.ones(d_inner, device=device))
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias, **factory)
        self.conv1d, self.x_proj, self.dt_proj = self._branch(conv_bias, factory)
        if self.bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._branch(conv_bias, factory)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)

        for dt_proj in (self.dt_proj, self.dt_proj_b) if self.bidirectional else (self.dt_proj,):
            self._init_dt_proj(dt_proj, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)

    def _projections(self) -> List[nn.Linear]:
        """x_proj and dt_proj of each branch, forward first."""
        pairs = [(self.x_proj, self.dt_proj)] + ([(self.x_proj_b, self.dt_proj_b)] if self.bidirectional else [])
        return [m for pair in pairs for m in pair]

    @torch.jit.unused
    def _fuses_inner(self, xz: Tensor) -> bool:
        """Whether the projections' calls may be left to ``mamba_inner_fused`` (CPU training: it keeps less for the
        backward; ``fused_inner_applies`` checks that the calls would compute nothing else, hooks included)."""
        return fused_inner_applies(xz, self._projections())

    @torch.jit.unused
    def _inner_fused(self, xz: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], A: Tensor, D: Tensor
                     ) -> Tensor:
        projections = self._projections()
        x_projs, dt_projs = projections[0::2], projections[1::2]
        return mamba_inner_fused(xz, conv_weight, conv_bias, [m.weight for m in x_projs], [m.weight for m in dt_projs],
                                 [m.bias for m in dt_projs], A, D, self.dt_rank,
                                 self.bidirectional and self.if_divide_out)

    def _branch(self, conv_bias: bool, factory: dict) -> Tuple[nn.Conv1d, nn.Linear, nn.Linear]:
        d_inner = self.d_inner
        # padding=d_conv-1 as in the official module (it only shows in repr: forward pads causally itself).
        conv1d = nn.Conv1d(d_inner, d_inner, self.d_conv, groups=d_inner, padding=self.d_conv - 1,
                           bias=conv_bias, **factory)
        x_proj = nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory)
        dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True, **factory)
        return conv1d, x_proj, dt_proj

    @staticmethod
    def _s4d_real_log(d_inner: int, d_state: int, device: Optional[torch.device]) -> Tensor:
        """log of the S4D-real initialisation A[d, n] = n + 1 (A itself is -exp(A_log))."""
        return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32, device=device)).repeat(d_inner, 1)

    def _init_dt_proj(self, dt_proj: nn.Linear, dt_init: str, dt_scale: float, dt_min: float, dt_max: float,
                      dt_init_floor: float) -> None:
        std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == 'constant':
                nn.init.constant_(dt_proj.weight, std)
            else:
                nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner, device=dt_proj.bias.device)
                           * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        # Model-level initialisers that zero Linear biases must leave this one alone (official flag name).
        dt_proj.bias._no_reinit = True

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(B, L, d_model) -> (B, L, d_model)."""
        d_inner, rank = self.d_inner, self.dt_rank
        xz = self.in_proj(hidden_states)  # (B, L, 2 d_inner)
        conv_weight, conv_bias = self.conv1d.weight, self.conv1d.bias
        A, D = -torch.exp(self.A_log.float()), self.D.float()
        if self.bidirectional:
            conv_weight = torch.cat([conv_weight, self.conv1d_b.weight])
            bias_b = self.conv1d_b.bias
            if conv_bias is not None and bias_b is not None:
                conv_bias = torch.cat([conv_bias, bias_b])
            A = torch.cat([A, -torch.exp(self.A_b_log.float())])
            D = torch.cat([D, self.D_b.float()])
        if not torch.jit.is_scripting() and self._fuses_inner(xz):
            y = self._inner_fused(xz, conv_weight, conv_bias, A, D)
        else:
            u = mamba_inner_conv(xz, conv_weight, conv_bias)  # (B, L, K d_inner), K branches
            # dt_proj applies its bias in its GEMM (the official kernel adds it inside the scan, in float32: the
            # same sum in float32 models); module calls keep the projections visible to hooks and quantization.
            projections = [self.x_proj(u[..., :d_inner])]
            deltas = [self.dt_proj(projections[0][..., :rank])]
            if self.bidirectional:
                projections.append(self.x_proj_b(u[..., d_inner:]))
                deltas.append(self.dt_proj_b(projections[1][..., :rank]))
            y = mamba_inner_scan(u, deltas, projections, xz, A, D, None, rank,
                                 self.bidirectional and self.if_divide_out)
        out = self.out_proj(y)
        if self.init_layer_scale is not None:
            out = out * self.gamma
        return out
