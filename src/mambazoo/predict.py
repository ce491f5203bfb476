"""Classify image files with any registered model: top-k with the model's class names (images are read and
preprocessed by ``data.images``, the one place for that).

The CLI's ``mambazoo predict`` is a thin layer over ``classify_files``.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .data.images import ImageLoadError, build_eval_transform, load_image

__all__ = ['ImageLoadError', 'load_image', 'build_eval_transform', 'class_names', 'classify_files', 'Prediction']


def class_names(model: Union[nn.Module, int]) -> List[str]:
    """The class names of ``model`` (or of a classifier of that many classes): those it records (a model loaded
    from a training checkpoint: Fashion-MNIST's, an ImageFolder's), ImageNet-1k's (shipped with timm) for 1000
    classes, else 'class N'."""
    num_classes = model if isinstance(model, int) else getattr(model, 'num_classes', 0)
    recorded = None if isinstance(model, int) else (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    if recorded and len(recorded) == num_classes:
        return list(recorded)
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
    if topk < 1:
        raise ValueError(f'topk must be at least 1, got {topk}')
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
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
    labels = labels or class_names(model)
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
