"""Datasets for training and validation: image folders, synthetic images, and two real sets that install offline.

* Fashion-MNIST (the real default): Zalando's 70,000 28x28 grayscale clothing images, 10 classes, 60k train /
  10k test, MIT licence. Debian's ``dataset-fashion-mnist`` package installs the original IDX files under
  /usr/share/datasets/fashion-mnist/ (``scripts/setup.sh --data`` installs it); ``path`` points elsewhere.
* scikit-learn's bundled digits (the fallback when Fashion-MNIST is absent): 1,797 8x8 grayscale digits.
* ImageFolder trees (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``, as ImageNet is laid out): a corrupt
  or unreadable image is reported and replaced by the next readable one, never a crash in the middle of an epoch.
* Synthetic images (torchvision's FakeData) for smoke tests.

Every dataset yields (PIL image, label); the transforms (timm's) turn images into tensors.
"""
import gzip
import logging
import struct
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

__all__ = [
    'DatasetNotFoundError', 'ArrayImageDataset', 'ArrayToTensor', 'SafeImageFolder', 'collate_skipping_none', 'read_idx', 'load_fashion_mnist', 'load_digits',
    'save_examples',
    'FASHION_MNIST_DIR', 'FASHION_MNIST_CLASSES', 'FASHION_MNIST_MEAN', 'FASHION_MNIST_STD',
]

FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
# Pixel statistics of the Fashion-MNIST training set (values in [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset whose files are not where they were looked for; the message says how to get them."""


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise ValueError(f'{path}: cannot read the file ({e}; truncated or corrupt?)') from None
    if len(data) < 4:
        raise ValueError(f'{path}: not an IDX file (too short)')
    zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f'{path}: not an unsigned-byte IDX file (header {data[:4].hex()})')
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f'{path}: the header is cut short ({len(data)} bytes for {ndim} dimensions)')
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f'{path}: expected {int(np.prod(shape))} values for shape {shape}, found {body.size} '
                         f'(truncated file?)')
    return body.reshape(shape)


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, C), with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 transform: Optional[Callable] = None):
        if len(images) != len(labels):
            raise ValueError(f'{len(images)} images but {len(labels)} labels')
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        if isinstance(self.transform, ArrayToTensor):  # no PIL image on the way (a third of a batch's loading)
            return self.transform(self.images[index]), int(self.labels[index])
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform else img), int(self.labels[index])


class ArrayToTensor:
    """An in-memory image (H, W) or (H, W, C) uint8 array as a uint8 tensor (C, H, W), as ``PILToTensor`` gives
    it: the training transform where the trainer augments whole batches (``loader.BatchAugment``)."""

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        # a copy: the arrays read from IDX files are read-only buffers
        return torch.from_numpy(np.array(image[None] if image.ndim == 2 else image.transpose(2, 0, 1)))


def save_examples(dataset: ArrayImageDataset, folder: Union[str, Path], count: int) -> List[Path]:
    """The first ``count`` images of ``dataset`` as PNG files ``<index>_<class>.png`` in ``folder``: real files to
    try ``mambazoo predict`` on (the README's main job classifies a few test images this way)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(min(count, len(dataset))):
        label = dataset.classes[int(dataset.labels[index])]
        path = folder / f'{index:05d}_{"".join(c if c.isalnum() else "-" for c in label)}.png'
        Image.fromarray(dataset.images[index]).save(path)
        paths.append(path)
    return paths


def load_fashion_mnist(root: Optional[Union[str, Path]] = None, split: str = 'train',
                       transform: Optional[Callable] = None) -> ArrayImageDataset:
    """Fashion-MNIST from its IDX files: split 'train' (60,000) or 'test'/'val' (10,000)."""
    root = Path(root) if root else FASHION_MNIST_DIR
    prefix = 'train' if split == 'train' else 't10k'
    files = []
    for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte'):
        candidates = [root / f'{prefix}-{kind}.gz', root / f'{prefix}-{kind}']
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DatasetNotFoundError(
                f'Fashion-MNIST not found: no {candidates[0].name} in {root}. Install it with '
                f'`apt-get install dataset-fashion-mnist` (Debian; `bash scripts/setup.sh --data` does this), '
                f'or point data.path at a folder with the IDX files, or use data.name=digits '
                f"(scikit-learn's bundled 8x8 digits) instead.")
        files.append(found)
    images, labels = read_idx(files[0]), read_idx(files[1])
    return ArrayImageDataset(images, labels, FASHION_MNIST_CLASSES, transform)


def load_digits(split: str = 'train', transform: Optional[Callable] = None, val_fraction: float = 0.2,
                seed: int = 0) -> ArrayImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), split deterministically per class."""
    from sklearn.datasets import load_digits as sk_load_digits
    bunch = sk_load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    val_idx: List[int] = []
    for c in range(10):
        idx = np.flatnonzero(bunch.target == c)
        val_idx.extend(rng.permutation(idx)[:int(round(len(idx) * val_fraction))].tolist())
    is_val = np.zeros(len(images), dtype=bool)
    is_val[val_idx] = True
    keep = is_val if split != 'train' else ~is_val
    return ArrayImageDataset(images[keep], bunch.target[keep], [str(c) for c in range(10)], transform)


class SafeImageFolder(Dataset):
    """torchvision's ImageFolder that reports and skips unreadable images instead of failing mid-epoch.

    A file that cannot be decoded is logged once (with the reason) and remembered in ``bad_files``. For training
    (``substitute=True``) the next readable image takes its place, so batches keep their size; for evaluation
    (``substitute=False``) the item is None and ``collate_skipping_none`` leaves it out, so every readable image
    is counted exactly once.
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Callable] = None, substitute: bool = True):
        from torchvision.datasets import ImageFolder
        root = Path(root)
        if not root.is_dir():
            raise DatasetNotFoundError(f'image folder not found: {root} (expected {root}/<class name>/<images>)')
        self._folder = ImageFolder(str(root))
        self.classes = self._folder.classes
        self.samples = self._folder.samples
        self.transform = transform
        self.substitute = substitute
        self.bad_files: Set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load_or_report(self, path: str) -> Optional[Image.Image]:
        """The image, or None for an unreadable file (logged once, remembered in ``bad_files``)."""
        from .images import ImageLoadError, load_image
        if path in self.bad_files:
            return None
        try:
            return load_image(path)
        except ImageLoadError as e:
            self.bad_files.add(path)
            _logger.warning('skipping unreadable image %s', e)
            return None

    def __getitem__(self, index: int) -> Optional[Tuple[object, int]]:
        # Training substitutes the following readable images; evaluation drops the item (None).
        tries = len(self.samples) if self.substitute else 1
        for offset in range(tries):
            path, label = self.samples[(index + offset) % len(self.samples)]
            img = self._load_or_report(path)
            if img is not None:
                return (self.transform(img) if self.transform else img), label
        if not self.substitute:
            return None
        raise RuntimeError(f'no readable image in {len(self.samples)} files of the folder')


def collate_skipping_none(batch):
    """Default collation of the items that are not None (unreadable images dropped by SafeImageFolder)."""
    from torch.utils.data import default_collate
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


def fake_dataset(size: int, img_size: int, num_classes: int, in_chans: int = 3, seed: int = 0,
                 transform: Optional[Callable] = None) -> Dataset:
    """torchvision FakeData: random images whose content is fixed by (seed, index)."""
    from torchvision.datasets import FakeData
    ds = FakeData(size=size, image_size=(in_chans, img_size, img_size), num_classes=num_classes,
                  transform=transform, random_offset=seed * 1_000_003)
    ds.classes = [str(i) for i in range(num_classes)]
    return ds
