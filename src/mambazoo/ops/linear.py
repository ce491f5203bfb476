"""Linear layers through oneDNN for float32 inference on an x86 CPU.

Why: on a CPU, ``F.linear`` is MKL's sgemm, and MKL runs its AVX2 code on AMD processors whatever they support;
oneDNN (PyTorch's other CPU backend, already used for every convolution) picks its AVX-512 kernels by the ISA.
Measured on the project's 2-core AMD EPYC (Zen 5) VM, at the shapes of the tiny models' GEMMs: 85-110 GMAC/s
by ``F.linear``, 200-240 GMAC/s by oneDNN's ``mkldnn::_linear_pointwise`` (the op torch.compile's CPU backend
emits for a linear layer). On Intel processors both use AVX-512 and the difference is small.

``linear`` is ``F.linear`` with that road for float32 CPU inference: no tensor needing a gradient, not traced,
compiled or exported (those see the plain op), not under autocast, on x86 where PyTorch has oneDNN; anywhere
else, and with MAMBAZOO_ONEDNN_LINEAR=0 in the environment, it is ``F.linear``. The results agree to float32
rounding (a different order of the sums). ``use_onednn_linear`` makes a model's ``nn.Linear`` modules (timm's
Mlp and Attention inside ours included) call it: each module's class becomes ``Linear``, a subclass with the
same state, so parameters, state_dict keys, hooks and ``isinstance`` checks are unchanged.
"""
import functools
import os
import platform
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scan_reference import tracer_active

__all__ = ['linear', 'Linear', 'use_onednn_linear', 'onednn_linear_applies']


@functools.lru_cache(maxsize=None)
def _onednn_linear_op():
    """oneDNN's linear op, or None where PyTorch lacks it or the CPU is not x86 (ARM builds route oneDNN
    through other libraries; not measured there)."""
    if platform.machine().lower() not in ('x86_64', 'amd64') or not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, '_linear_pointwise', None)


def onednn_linear_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``linear(x, weight, bias)`` takes oneDNN (see the module docstring)."""
    # the tracer test first: under torch.compile nothing after it is traced (dynamo refuses torch.backends)
    return (not tracer_active() and _onednn_linear_op() is not None
            and os.environ.get('MAMBAZOO_ONEDNN_LINEAR', '1') != '0'
            and x.device.type == 'cpu' and x.dim() >= 2 and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and not torch.is_autocast_enabled('cpu'))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, by oneDNN for float32 inference on an x86 CPU; with ``gelu``,
    ``F.gelu(F.linear(x, weight, bias))`` (the exact, erf GELU), which oneDNN applies as the GEMM writes its
    output (one pass over a 4x wider tensor less, in an MLP)."""
    if onednn_linear_applies(x, weight, bias):
        return _onednn_linear_op()(x, weight, bias, 'gelu' if gelu else 'none', [], 'none' if gelu else '')
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` (nothing else differs)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linear(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` in ``module`` a ``Linear`` (in place; returns ``module``). Subclasses of
    nn.Linear with a forward of their own are left alone."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module
