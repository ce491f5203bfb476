"""Per-stage activation maps ("where does the network respond?") and their overlay on the input image.

A stage's map is the per-position strength of its feature map: the channel mean of |feature| (or the L2 norm over
channels), taken from the model's ``forward_intermediates`` (every stage of the hierarchical families, every
block of the isotropic ones), then scaled to [0, 1] per image. A plain module without ``forward_intermediates``
counts as a single stage whose output is the feature map.
"""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

__all__ = ['stage_features', 'activation_maps', 'normalise_per_image', 'overlay_heatmap', 'image_files',
           'load_images', 'save_activation_figure']

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
REDUCTIONS = ('mean_abs', 'l2')


def stage_features(model: nn.Module, images: Tensor, indices: Optional[Union[int, Sequence[int]]] = None
                   ) -> List[Tensor]:
    """The NCHW feature maps of the stages ``indices`` (None: all) for ``images``, with the graph kept.

    Models with ``forward_intermediates`` (ours and timm's) give one map per stage; any other module is one
    stage and must return a (B, C, h, w) map itself.
    """
    if hasattr(model, 'forward_intermediates'):
        if isinstance(indices, int):
            indices = [indices]
        if indices is not None:
            num_stages = len(getattr(model, 'feature_info', [])) or None
            if num_stages is not None:
                bad = [i for i in indices if not -num_stages <= i < num_stages]
                if bad:
                    raise ValueError(f'stage index {bad[0]} out of range: the model has {num_stages} stages '
                                     f'(0..{num_stages - 1}, or negative from the end)')
                indices = [i % num_stages for i in indices]
        feats = model.forward_intermediates(images, indices=indices, intermediates_only=True, stop_early=True,
                                            output_fmt='NCHW')
    else:
        if indices not in (None, 0, -1, [0], [-1]):
            raise ValueError(f'a module without forward_intermediates has a single stage; got stage {indices}')
        feats = [model(images)]
    for f in feats:
        if f.ndim != 4:
            raise ValueError(f'expected (B, C, h, w) feature maps, got shape {tuple(f.shape)}')
    return list(feats)


def normalise_per_image(maps: Tensor) -> Tensor:
    """(B, h, w) -> each map min-max scaled to [0, 1] (a constant map becomes all zeros)."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    return ((flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny)).view_as(maps)


@torch.no_grad()
def activation_maps(model: nn.Module, images: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                    reduction: str = 'mean_abs') -> List[Tensor]:
    """One (B, h_i, w_i) float map per stage, each scaled to [0, 1] per image.

    Args:
        model: a model with ``forward_intermediates`` (or a module returning a feature map); evaluated in eval
            mode, its mode restored afterwards.
        images: (B, C, H, W) normalised input batch.
        indices: stages to map (None: all).
        reduction: 'mean_abs' (channel mean of |feature|) or 'l2' (L2 norm over channels).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}')
    if images.ndim != 4:
        raise ValueError(f'images must be a (B, C, H, W) batch, got shape {tuple(images.shape)}')
    was_training = model.training
    model.eval()
    try:
        feats = stage_features(model, images, indices)
    finally:
        model.train(was_training)
    maps = []
    for f in feats:
        f = f.float()
        m = f.abs().mean(dim=1) if reduction == 'mean_abs' else f.norm(dim=1)
        maps.append(normalise_per_image(m).cpu())
    return maps


def overlay_heatmap(image: Image.Image, heatmap: Union[Tensor, np.ndarray], alpha: float = 0.5,
                    cmap: str = 'jet') -> Image.Image:
    """``image`` (PIL) blended with ``heatmap`` ((h, w) in [0, 1], resized bilinearly to the image) coloured by
    the matplotlib colormap ``cmap``; ``alpha`` is the heatmap's weight. Returns an RGB image of the image's size."""
    from matplotlib import colormaps
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must be in [0, 1], got {alpha}')
    heat = heatmap.detach().cpu().float().numpy() if isinstance(heatmap, Tensor) else np.asarray(heatmap, np.float32)
    if heat.ndim != 2:
        raise ValueError(f'heatmap must be 2-D (h, w), got shape {heat.shape}')
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
    base = image.convert('RGB')
    resized = np.asarray(Image.fromarray(heat.astype(np.float32), mode='F').resize(base.size, Image.BILINEAR))
    coloured = colormaps[cmap](np.clip(resized, 0.0, 1.0))[..., :3]
    blend = (1.0 - alpha) * np.asarray(base, np.float32) / 255.0 + alpha * coloured
    return Image.fromarray((np.clip(blend, 0.0, 1.0) * 255.0).round().astype(np.uint8), mode='RGB')


def image_files(source: Union[str, Path, Sequence[Union[str, Path]]], limit: Optional[int] = None) -> List[Path]:
    """Image files: those given, or those under a folder (recursively, sorted), at most ``limit``."""
    if limit is not None and limit < 1:
        raise ValueError(f'the number of images must be at least 1, got {limit}')
    if isinstance(source, (str, Path)):
        root = Path(source)
        if root.is_dir():
            files = sorted(p for p in root.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise FileNotFoundError(f'no image files ({", ".join(IMAGE_SUFFIXES)}) under {root}')
        elif root.is_file():
            files = [root]
        else:
            raise FileNotFoundError(f'no such image file or folder: {root}')
    else:
        files = [Path(p) for p in source]
    return files[:limit] if limit is not None else files


def load_images(source: Union[str, Path, Sequence[Union[str, Path]]], model: nn.Module, img_size: Optional[int] = None,
                limit: Optional[int] = None) -> Tuple[Tensor, List[Image.Image], List[Path]]:
    """Images from files or a folder, preprocessed by the model's evaluation transform (``data.images``: its
    channels, mean/std; square ``img_size`` where given).

    Returns the normalised batch (B, C, H, W), the matching un-normalised crops as PIL images (for overlays), and
    the files used. Unreadable files raise ``mambazoo.data.images.ImageLoadError``.
    """
    from timm.data import create_transform
    from ..data.images import build_eval_transform, eval_data_config, load_image, with_mode
    files = image_files(source, limit)
    config = eval_data_config(model, img_size)
    in_chans = config['input_size'][0]
    transform = build_eval_transform(model, img_size)
    # The same resize + crop without the normalisation, for the picture under the overlay.
    crop = with_mode(create_transform(**{**config, 'mean': (0.0,) * in_chans, 'std': (1.0,) * in_chans},
                                      is_training=False), in_chans)
    tensors, crops = [], []
    for path in files:
        img = load_image(path)
        tensors.append(transform(img))
        raw = crop(img).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        crops.append(Image.fromarray(raw[..., 0] if in_chans == 1 else raw).convert('RGB'))
    return torch.stack(tensors), crops, files


def save_activation_figure(crops: Sequence[Image.Image], maps: Sequence[Tensor], path: Union[str, Path],
                           titles: Optional[Sequence[str]] = None, alpha: float = 0.5, cmap: str = 'jet') -> Path:
    """A grid PNG: one row per image (the image, then each stage's overlay), ``titles`` over the stage columns."""
    from .plots import new_figure, save_figure
    rows, cols = len(crops), len(maps) + 1
    fig, axes = new_figure(rows, cols, cell=2.2)
    for r, img in enumerate(crops):
        axes[r][0].imshow(img)
        axes[r][0].set_title('input' if r == 0 else '', fontsize=8)
        for c, stage_map in enumerate(maps, 1):
            axes[r][c].imshow(overlay_heatmap(img, stage_map[r], alpha=alpha, cmap=cmap))
            if r == 0:
                axes[r][c].set_title(titles[c - 1] if titles else f'stage {c - 1}', fontsize=8)
    return save_figure(fig, path)
