"""Classify image files with any registered model: loading images safely, preprocessing, top-k.

The CLI's ``mambazoo predict`` is a thin layer over ``classify_files``.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

__all__ = ['ImageLoadError', 'load_image', 'build_eval_transform', 'class_names', 'classify_files', 'Prediction']


class ImageLoadError(ValueError):
    """A file that is not a usable image (not an image, truncated, unsupported mode)."""


def load_image(path: Union[str, Path]) -> Image.Image:
    """An RGB PIL image from ``path``; raises ImageLoadError with the reason for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f'{path}: no such file')
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in the transform
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageLoadError(f'{path}: not an image file (PIL cannot identify it)') from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f'{path}: cannot decode the image ({e})') from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
        # 16-bit / float images: stretch to 8 bits first (PIL's RGB conversion would clip them).
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        img = Image.fromarray(a.round().astype(np.uint8), mode='L')
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))  # transparent pixels -> white
        return Image.alpha_composite(background, rgba).convert('RGB')
    if img.mode not in ('RGB', 'L', 'P', 'CMYK', 'YCbCr', '1', 'LAB', 'HSV'):
        raise ImageLoadError(f'unsupported image mode {img.mode!r}')
    return img.convert('RGB')


def build_eval_transform(model: nn.Module):
    """The model's evaluation preprocessing (resize, center crop, normalise) from its pretrained config."""
    from timm.data import create_transform, resolve_data_config
    config = resolve_data_config({}, model=model)
    return create_transform(**config, is_training=False)


def class_names(num_classes: int) -> List[str]:
    """ImageNet-1k descriptions (shipped with timm) for 1000 classes; 'class N' otherwise."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [f'class {i}' for i in range(num_classes)]


@dataclass
class Prediction:
    path: str
    top: List[Tuple[str, int, float]] = field(default_factory=list)  # (label, index, probability)
    error: Optional[str] = None


@torch.no_grad()
def classify_files(
        model: nn.Module,
        paths: Sequence[Union[str, Path]],
        topk: int = 5,
        labels: Optional[List[str]] = None,
        batch_size: int = 8,
) -> Tuple[List[Prediction], Dict[str, float]]:
    """Top-k predictions per file (bad files get an error and do not stop the others), plus timing.

    Returns the predictions in input order and ``{'images': n, 'seconds': t, 'images_per_s': n / t}`` for the
    model forward passes alone.
    """
    model.eval()
    transform = build_eval_transform(model)
    device = next(model.parameters()).device
    results = [Prediction(path=str(p)) for p in paths]
    good: List[Tuple[int, torch.Tensor]] = []
    for i, p in enumerate(paths):
        try:
            good.append((i, transform(load_image(p))))
        except ImageLoadError as e:
            results[i].error = str(e)
    num_classes = getattr(model, 'num_classes', 0)
    labels = labels or class_names(num_classes)
    k = min(topk, num_classes)
    seconds = 0.0
    for start in range(0, len(good), batch_size):
        batch = good[start:start + batch_size]
        x = torch.stack([t for _, t in batch]).to(device)
        t0 = time.perf_counter()
        logits = model(x)
        seconds += time.perf_counter() - t0
        if not torch.isfinite(logits).all():
            for i, _ in batch:
                results[i].error = f'{results[i].path}: the model produced non-finite logits (NaN/inf)'
            continue
        probs = logits.float().softmax(dim=-1)
        values, indices = probs.topk(k, dim=-1)
        for row, (i, _) in enumerate(batch):
            results[i].top = [(labels[j], int(j), float(v)) for v, j in zip(values[row], indices[row])]
    n = len(good)
    return results, {'images': n, 'seconds': seconds, 'images_per_s': n / seconds if seconds > 0 else 0.0}
