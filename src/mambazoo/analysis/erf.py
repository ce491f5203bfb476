"""Effective receptive fields (ERF), as RepLKNet (Ding et al., CVPR 2022) and VMamba draw them.

The ERF of a stage is how much each input pixel moves the centre of that stage's feature map: for every image,
the gradient of the sum over channels of the feature map's central position with respect to the input, in
absolute value, summed over the input channels; averaged over the images. For display the map is compressed with
log1p and scaled to [0, 1] (``erf_heatmap``). A model with a finite receptive field has an ERF that is exactly
zero outside it (the tests check a 3x3 conv gives exactly its 3x3 window).
"""
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .activations import stage_features

__all__ = ['compute_erf', 'erf_heatmap', 'high_contribution_area_ratio', 'save_erf_png']


def compute_erf(model: nn.Module, images: Tensor, stage: int = -1, batch_size: int = 4) -> Tensor:
    """The (H, W) ERF of ``model``'s stage ``stage`` over ``images`` (B, C, H, W), before any normalisation.

    Args:
        model: a model with ``forward_intermediates`` (ours or timm's), or any module returning a (B, C, h, w)
            feature map (then ``stage`` must be 0 or -1). Evaluated in eval mode; its mode is restored.
        images: normalised input batch.
        stage: which stage's feature map (negative: from the end).
        batch_size: images per backward pass (memory).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f'images must be a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}')
    was_training = model.training
    model.eval()
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    try:
        for chunk in images.split(batch_size):
            x = chunk.detach().clone().requires_grad_(True)
            feature = stage_features(model, x, stage)[-1]
            h, w = feature.shape[-2:]
            # Images do not interact in eval mode, so one backward of the batch's sum gives every image's gradient.
            centre = feature[:, :, h // 2, w // 2].sum()
            (grad,) = torch.autograd.grad(centre, x)
            total += grad.abs().sum(dim=(0, 1)).double().cpu()
    finally:
        model.train(was_training)
    return (total / images.shape[0]).float()


def erf_heatmap(erf: Tensor) -> Tensor:
    """log1p-compressed and scaled to [0, 1] by its maximum (the scores span orders of magnitude)."""
    compressed = torch.log1p(erf.clamp_min(0))
    peak = compressed.max()
    return compressed / peak if peak > 0 else compressed


def high_contribution_area_ratio(heatmap: Tensor, thresholds: Sequence[float] = (0.2, 0.3, 0.5, 0.99)
                                 ) -> Dict[float, Optional[float]]:
    """For each threshold t, the area (as a share of the image) of the smallest centred square holding at least
    t of the map's total: RepLKNet's "high-contribution area ratio" (small for a local ERF; None if no square
    short of the whole image holds it)."""
    h, w = heatmap.shape
    cy, cx = h // 2, w // 2
    total = float(heatmap.sum())
    ratios: Dict[float, Optional[float]] = {}
    for t in thresholds:
        ratios[t] = None
        if total <= 0:
            continue
        for r in range(0, max(h, w)):
            window = heatmap[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1]
            if float(window.sum()) >= t * total:
                ratios[t] = window.numel() / (h * w)
                break
    return ratios


def save_erf_png(erf: Tensor, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """The normalised ERF (``erf_heatmap``) as a PNG heatmap with a colour bar."""
    from .plots import save_heatmap
    return save_heatmap(erf_heatmap(erf), path, title=title)
