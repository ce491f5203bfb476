"""A small annotated detection / segmentation set composed from real photos: Fashion-MNIST on canvases.

Each canvas (e.g. 128 x 128, black like Fashion-MNIST's own background) holds 1 to 4 real Fashion-MNIST photos
(or scikit-learn's bundled digit scans), each resized to a random size and pasted at a random place where it
overlaps no other. The annotations follow from the pasting, so they are exact:

* instance mask: the item's pixels brighter than ``mask_threshold``;
* box: the tight box of that mask (x1, y1, x2, y2 in pixel-edge coordinates, as COCO / torchvision);
* label: the item's class + 1 (0 is the background, as torchvision's detectors expect);
* semantic mask: each pixel's label (0 where no item is).

The pictures are real; their arrangement is synthetic. Canvas ``i`` depends only on (seed, i), so the set is
the same on every machine and in every loader worker, and needs no storage.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ['ComposedObjectsDataset', 'build_composed_datasets', 'collate_detection', 'SOURCES']

SOURCES = ('fashion_mnist', 'digits')


class ComposedObjectsDataset(Dataset):
    """Canvases with real object photos pasted on them, with boxes, instance masks and a semantic mask.

    Args:
        images: the object photos, uint8 (N, h, w), bright objects on a dark background.
        labels: their classes (N,), 0-based.
        classes: class names (index = label).
        num_canvases: length of the dataset.
        canvas_size: canvas side in pixels.
        items: (min, max) number of objects per canvas.
        item_size: (min, max) side of a pasted object in pixels.
        seed: canvas ``i`` is a function of (seed, i).
        mask_threshold: pixel value (0-255) above which an object pixel belongs to its mask.
        channels: 1 (grey) or 3 (grey repeated, for RGB backbones).

    Items are (image (channels, S, S) float in [0, 1], target) with target keys 'boxes' (n, 4) float32,
    'labels' (n,) int64 (1-based), 'masks' (n, S, S) uint8, 'semantic' (S, S) int64, 'image_id' int.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], num_canvases: int,
                 canvas_size: int = 128, items: Tuple[int, int] = (1, 4), item_size: Tuple[int, int] = (24, 64),
                 seed: int = 0, mask_threshold: int = 32, channels: int = 3):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f'images must be uint8 (N, h, w), got {images.dtype} {images.shape}')
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f'need as many labels as images (and at least one): {len(images)} vs {len(labels)}')
        lo, hi = items
        if not 1 <= lo <= hi:
            raise ValueError(f'items must be (min, max) with 1 <= min <= max, got {items}')
        smin, smax = item_size
        if not 4 <= smin <= smax <= canvas_size:
            raise ValueError(f'item_size must be (min, max) with 4 <= min <= max <= canvas_size ({canvas_size}), '
                             f'got {item_size}')
        if channels not in (1, 3):
            raise ValueError(f'channels must be 1 or 3, got {channels}')
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.num_canvases, self.canvas_size = int(num_canvases), int(canvas_size)
        self.items, self.item_size = (int(lo), int(hi)), (int(smin), int(smax))
        self.seed, self.mask_threshold, self.channels = int(seed), int(mask_threshold), channels

    def __len__(self) -> int:
        return self.num_canvases

    def _place(self, rng: np.random.Generator, size: int, taken: List[Tuple[int, int, int, int]],
               tries: int = 50) -> Optional[Tuple[int, int]]:
        """A top-left corner for a ``size`` square that overlaps no rectangle in ``taken``, or None."""
        for _ in range(tries):
            x, y = (int(v) for v in rng.integers(0, self.canvas_size - size + 1, size=2))
            if all(x + size <= tx0 or tx1 <= x or y + size <= ty0 or ty1 <= y for tx0, ty0, tx1, ty1 in taken):
                return x, y
        return None

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Any]]:
        if not 0 <= index < self.num_canvases:
            raise IndexError(f'canvas {index} out of range (0 to {self.num_canvases - 1})')
        rng = np.random.default_rng([self.seed, index])
        S = self.canvas_size
        canvas = np.zeros((S, S), dtype=np.uint8)
        semantic = np.zeros((S, S), dtype=np.int64)
        taken: List[Tuple[int, int, int, int]] = []
        boxes, labels, masks = [], [], []
        wanted = int(rng.integers(self.items[0], self.items[1] + 1))
        attempts = 0
        while len(labels) < wanted and attempts < 4 * wanted:
            attempts += 1
            source = int(rng.integers(len(self.images)))
            size = int(rng.integers(self.item_size[0], self.item_size[1] + 1))
            corner = self._place(rng, size, taken)
            if corner is None:  # the canvas is too full for this size: try another object
                continue
            patch = np.asarray(Image.fromarray(self.images[source]).resize((size, size), Image.BILINEAR))
            on = patch > self.mask_threshold
            if on.sum() < 4:  # an (almost) empty photo would give a degenerate box
                continue
            x, y = corner
            canvas[y:y + size, x:x + size] = patch
            mask = np.zeros((S, S), dtype=bool)
            mask[y:y + size, x:x + size] = on
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(int(self.labels[source]) + 1)
            masks.append(mask)
            semantic[mask] = labels[-1]
            taken.append((x, y, x + size, y + size))
        image = torch.from_numpy(canvas).float().div_(255).unsqueeze(0)
        if self.channels == 3:
            image = image.expand(3, S, S).contiguous()
        target = {
            'boxes': torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            'labels': torch.tensor(labels, dtype=torch.int64),
            'masks': torch.from_numpy(np.stack(masks)).to(torch.uint8) if masks
            else torch.zeros((0, S, S), dtype=torch.uint8),
            'semantic': torch.from_numpy(semantic),
            'image_id': int(index),
        }
        return image, target


def collate_detection(batch: Sequence[Tuple[Tensor, Dict[str, Any]]]) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
    """Lists of images and targets (torchvision's detectors take lists: images may differ in size)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _source_arrays(source: str, root: Optional[Union[str, Path]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             np.ndarray, List[str]]:
    """(train images, train labels, val images, val labels, class names) of a photo source."""
    from ..data.datasets import load_digits, load_fashion_mnist
    if source == 'fashion_mnist':
        train, val = load_fashion_mnist(root, 'train'), load_fashion_mnist(root, 'test')
    elif source == 'digits':
        train, val = load_digits('train'), load_digits('val')
    else:
        raise ValueError(f'unknown photo source {source!r}: choose one of {", ".join(SOURCES)}')
    return train.images, train.labels, val.images, val.labels, list(train.classes)


def build_composed_datasets(source: str = 'fashion_mnist', root: Optional[Union[str, Path]] = None,
                            train_size: int = 4000, val_size: int = 200, seed: int = 0,
                            **kwargs: Any) -> Tuple[ComposedObjectsDataset, ComposedObjectsDataset, List[str]]:
    """Training canvases from the source's training photos, validation canvases from its held-out photos.

    Args:
        source: 'fashion_mnist' (Zalando's photos, /usr/share/datasets/fashion-mnist or ``root``) or 'digits'
            (scikit-learn's bundled 8x8 digit scans: always available, much blurrier once enlarged).
        root: Fashion-MNIST folder (default: the Debian package's).
        train_size, val_size: numbers of canvases.
        seed: the training canvases use ``seed``, the validation ones ``seed + 1``.
        **kwargs: ``ComposedObjectsDataset`` arguments (canvas_size, items, item_size, mask_threshold, channels).
    Returns:
        (train set, validation set, class names without the background).
    """
    train_images, train_labels, val_images, val_labels, classes = _source_arrays(source, root)
    train = ComposedObjectsDataset(train_images, train_labels, classes, train_size, seed=seed, **kwargs)
    val = ComposedObjectsDataset(val_images, val_labels, classes, val_size, seed=seed + 1, **kwargs)
    return train, val, classes
