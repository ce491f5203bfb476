"""Blocks shared by the model families: the Mamba mixer (one scan direction, or Vim's two).

``Mamba`` has the constructor arguments and ``state_dict`` layout of mamba_ssm's ``modules/mamba_simple.Mamba`` as
modified by Vim (hustvl/Vim ``mamba-1p1p1``): ``bimamba_type='v2'`` adds a backward branch with its own conv1d,
x_proj, dt_proj, A and D (the ``*_b`` keys) that reads the sequence in reverse. Only the official fused CUDA path
computes that backward branch (its fallback path silently drops it); this module always does.

Layout. Tokens come in and go out as (B, L, d_model). Inside, activations are time-major, (L, B, channels):
that is the layout the selective scan walks (one time step = one contiguous slab), so the scan's inputs need no
transposing copy, and the flip of the backward branch is a flip of the leading dimension. Both directions run
through ONE ``selective_scan`` call: the backward branch's channels are stacked after the forward ones (2 * d_inner
channels, A/D/delta_bias concatenated, B and C as two channel groups), which halves the per-step work of the scan's
time loop, the part that dominates on a CPU.

Float32 inference on a CPU (with the 'chunked' scan backend, the default there) takes another road,
``_forward_compiled``: two numba-compiled loops (``ops.scan_numba``) read in_proj's batch-major output in place,
the conv + SiLU of both branches and the scan of both directions (the backward one from the last step to the
first, so nothing is flipped, concatenated or transposed), and only the GEMMs run in PyTorch.
"""
import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import selective_scan
from ..ops.linear import linear
from ..ops.selective_scan import resolve_scan_backend
from ..ops.scan_numba import compiled_inference_applies, run_mixer_conv_silu, run_mixer_scan

__all__ = ['Mamba', 'causal_conv1d_time_major']


def causal_conv1d_time_major(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise causal conv1d (zero left padding of k - 1 steps) on time-major input.

    Args:
        x: (L, B, C).
        weight: (C, 1, k), as stored by ``nn.Conv1d(C, C, k, groups=C)``.
        bias: (C,) or None.
    Returns:
        (L, B, C): out[t] = bias + sum_j weight[:, 0, j] * x[t - (k - 1) + j].

    Equal to ``F.conv1d(x.permute(1, 2, 0), weight, bias, padding=k - 1, groups=C)[..., :L]`` but without the
    two layout copies that conv1d needs here; k shifted multiply-adds over contiguous time slabs.
    """
    length, k = x.shape[0], weight.shape[-1]
    w = weight.view(weight.shape[0], k).to(x.dtype)
    out = x * w[:, k - 1]
    if bias is not None:
        out.add_(bias.to(x.dtype))
    for shift in range(1, min(k, length)):
        out[shift:].addcmul_(x[:-shift], w[:, k - 1 - shift])
    return out


class _Branch(NamedTuple):
    """One scan direction's own modules and parameters in ``Mamba``."""
    conv: nn.Conv1d
    x_proj: nn.Linear
    dt_proj: nn.Linear
    A_log: Tensor
    D: Tensor


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
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f'Mamba expects (B, L, {self.d_model}) tokens, got {tuple(hidden_states.shape)}')
        if self._compiled_path_applies(hidden_states):
            return self._forward_compiled(hidden_states)
        d_inner, rank, n = self.d_inner, self.dt_rank, self.d_state
        xz = self.in_proj(hidden_states).transpose(0, 1)  # (L, B, 2 * d_inner), a view
        x, z = xz[..., :d_inner], xz[..., d_inner:]
        if self.bidirectional:
            # Channels [0, d_inner) read the sequence forwards, [d_inner, 2 d_inner) backwards (time flipped).
            # The concatenations also make the time-major layout contiguous, in the same copy.
            x = torch.cat((x, x.flip(0)), dim=-1)
            z = torch.cat((z, z.flip(0)), dim=-1)
            del xz  # only the copies are used from here on: free it before the scan's buffers are allocated
            conv_w = torch.cat((self.conv1d.weight, self.conv1d_b.weight))
            conv_b = (torch.cat((self.conv1d.bias, self.conv1d_b.bias))
                      if self.conv1d.bias is not None else None)
        else:
            x = x.contiguous()
            conv_w, conv_b = self.conv1d.weight, self.conv1d.bias
        u = F.silu(causal_conv1d_time_major(x, conv_w, conv_b))  # (L, B, C), C = d_inner or 2 d_inner
        del x

        if self.bidirectional:
            x_dbl = linear(u[..., :d_inner], self.x_proj.weight)  # (L, B, rank + 2N)
            x_dbl_b = linear(u[..., d_inner:], self.x_proj_b.weight)
            # dt_proj's bias is applied inside the scan (delta_bias), in float32, as the official kernel does.
            delta = torch.cat((linear(x_dbl[..., :rank], self.dt_proj.weight),
                               linear(x_dbl_b[..., :rank], self.dt_proj_b.weight)), dim=-1)
            # B and C: (L, B, 2 groups, N), passed to the scan as (B, G, N, L) views.
            B = torch.stack((x_dbl[..., rank:rank + n], x_dbl_b[..., rank:rank + n]), dim=2).permute(1, 2, 3, 0)
            C = torch.stack((x_dbl[..., rank + n:], x_dbl_b[..., rank + n:]), dim=2).permute(1, 2, 3, 0)
            A = -torch.exp(torch.cat((self.A_log, self.A_b_log)).float())
            D = torch.cat((self.D, self.D_b)).float()
            delta_bias = torch.cat((self.dt_proj.bias, self.dt_proj_b.bias)).float()
        else:
            x_dbl = self.x_proj(u)
            delta = linear(x_dbl[..., :rank], self.dt_proj.weight)
            B = x_dbl[..., rank:rank + n].permute(1, 2, 0)  # (B, N, L) view
            C = x_dbl[..., rank + n:].permute(1, 2, 0)
            A = -torch.exp(self.A_log.float())
            D = self.D.float()
            delta_bias = self.dt_proj.bias.float()

        y = selective_scan(u.permute(1, 2, 0), delta.permute(1, 2, 0), A, B, C, D, z=z.permute(1, 2, 0),
                           delta_bias=delta_bias, delta_softplus=True)
        y = y.permute(2, 0, 1)  # back to (L, B, C), a view
        if self.bidirectional:
            y = y[..., :d_inner] + y[..., d_inner:].flip(0)
            if self.if_divide_out:
                y = y * 0.5
        out = self.out_proj(y).transpose(0, 1)  # (B, L, d_model)
        if self.init_layer_scale is not None:
            out = out * self.gamma
        return out

    def _compiled_path_applies(self, hidden_states: Tensor) -> bool:
        """Float32 inference on a CPU with the scan backend on 'chunked' (explicitly or by 'auto'), whose CPU
        inference the compiled kernels are: another backend chosen (the reference, a FLOP counter) is obeyed.
        Not under autocast, whose GEMMs would hand the kernels bfloat16 activations."""
        params = list(self.parameters())
        return (hidden_states.dtype == torch.float32 and all(p.dtype == torch.float32 for p in params)
                and compiled_inference_applies(hidden_states, *params)  # on a CPU, among others
                and not torch.is_autocast_enabled('cpu')
                and resolve_scan_backend(hidden_states) == 'chunked')

    def _forward_compiled(self, hidden_states: Tensor) -> Tensor:
        """``forward`` for float32 inference on a CPU: the conv + SiLU and the scan (both directions in one pass)
        are compiled loops (``ops.scan_numba``) that read in_proj's batch-major output in place. The backward
        branch is computed in the original token order (an anti-causal conv, a scan from the last step), so
        nothing is flipped or concatenated; only the GEMMs run in PyTorch."""
        d_inner, rank = self.d_inner, self.dt_rank
        branches = [_Branch(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)]
        if self.bidirectional:
            branches.append(_Branch(self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b))
        conv_w = torch.cat([b.conv.weight for b in branches])
        conv_b = torch.cat([b.conv.bias for b in branches]) if self.conv1d.bias is not None else None
        xz = self.in_proj(hidden_states)  # (B, L, 2 d_inner)
        u = run_mixer_conv_silu(xz, conv_w, conv_b)  # (B, L, K d_inner), K branches
        projections = [linear(u[..., k * d_inner:(k + 1) * d_inner], b.x_proj.weight) for k, b in enumerate(branches)]
        deltas = [linear(proj[..., :rank], b.dt_proj.weight) for proj, b in zip(projections, branches)]
        A = -torch.exp(torch.cat([b.A_log for b in branches]))
        D = torch.cat([b.D for b in branches])
        delta_bias = torch.cat([b.dt_proj.bias for b in branches])
        y = run_mixer_scan(u, deltas, projections, xz, A, D, delta_bias, rank,
                           divide=self.bidirectional and self.if_divide_out)
        out = self.out_proj(y)
        if self.init_layer_scale is not None:
            out = out * self.gamma
        return out
