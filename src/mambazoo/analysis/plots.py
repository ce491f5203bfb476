"""Headless matplotlib figures (Agg canvas, no pyplot state, no display): grids of images, heatmaps, and
the labelled sample grid of a dataset (``mambazoo show-data``)."""
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ['new_figure', 'save_figure', 'save_heatmap', 'to_display_image', 'save_image_grid', 'dataset_samples']


def new_figure(rows: int, cols: int, cell: float = 2.0):
    """A figure of ``rows`` x ``cols`` axes (a 2-D list), ``cell`` inches each, axes hidden (image panels)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(cols * cell, rows * cell + 0.3), dpi=100)
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [[grid[r, c] for c in range(cols)] for r in range(rows)]
    for row in axes:
        for ax in row:
            ax.set_axis_off()
    return fig, axes


def save_figure(fig, path: Union[str, Path]) -> Path:
    """Write ``fig`` to ``path`` (PNG by suffix; parent folders made) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def save_heatmap(heatmap: Union[Tensor, np.ndarray], path: Union[str, Path], title: Optional[str] = None,
                 cmap: str = 'RdYlGn', colorbar: bool = True, size: float = 5.0) -> Path:
    """One (H, W) map as a PNG with a colour bar (RepLKNet's ERF figures use 'RdYlGn')."""
    data = heatmap.detach().cpu().float().numpy() if isinstance(heatmap, Tensor) else np.asarray(heatmap)
    if data.ndim != 2:
        raise ValueError(f'heatmap must be 2-D, got shape {data.shape}')
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size + (1.0 if colorbar else 0.0), size), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(data, cmap=cmap, interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path)


def to_display_image(image: Union[Tensor, np.ndarray, Image.Image], mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None) -> np.ndarray:
    """A displayable (H, W, 3) float array in [0, 1] from a PIL image or a (C, H, W) tensor (un-normalised with
    ``mean``/``std`` when given; one channel is repeated to grey)."""
    if isinstance(image, Tensor):
        x = image.detach().cpu().float()
        if x.ndim != 3:
            raise ValueError(f'expected a (C, H, W) image tensor, got shape {tuple(x.shape)}')
        if mean is not None and std is not None:
            x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        x = x.clamp(0, 1).permute(1, 2, 0).numpy()
    else:
        x = np.asarray(image.convert('RGB') if hasattr(image, 'convert') else image, dtype=np.float32)
        if x.max() > 1.0:
            x = x / 255.0
        if x.ndim == 2:
            x = x[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def save_image_grid(images: Sequence, labels: Sequence[str], path: Union[str, Path], cols: Optional[int] = None,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                    title: Optional[str] = None) -> Path:
    """A PNG grid of images, each titled with its label; tensors are un-normalised with ``mean``/``std``."""
    if not images:
        raise ValueError('no images to draw')
    if len(labels) != len(images):
        raise ValueError(f'{len(images)} images but {len(labels)} labels')
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    fig, axes = new_figure(rows, cols, cell=1.8)
    for i, (img, label) in enumerate(zip(images, labels)):
        ax = axes[i // cols][i % cols]
        ax.imshow(to_display_image(img, mean, std), interpolation='nearest')
        ax.set_title(str(label), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def dataset_samples(dataset, count: int, seed: int = 0) -> Tuple[List, List[int]]:
    """``count`` items of a (image, label) dataset, drawn without replacement by ``seed`` (skipping None items,
    i.e. unreadable files of a SafeImageFolder)."""
    if len(dataset) == 0:
        raise ValueError('the dataset is empty')
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    images, labels = [], []
    for index in order:
        item = dataset[index]
        if item is None:
            continue
        images.append(item[0])
        labels.append(int(item[1]))
        if len(images) == count:
            break
    return images, labels
