"""From a config to data loaders: datasets, timm's transforms, and a sampler that can resume mid-epoch.

Reproducibility (what makes ``--resume`` exact): the order of the samples is a function of (seed, epoch) alone,
and the random augmentation of each sample is a function of (seed, epoch, sample index) alone (each sample
reseeds Python's, NumPy's and torch's generators before its transform). So a run resumed at any optimizer step
sees the very batches, with the very augmentations, that the uninterrupted run saw, whatever the number of
loader workers.
"""
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, SafeImageFolder, collate_skipping_none, fake_dataset,
                       load_digits, load_fashion_mnist)

__all__ = ['DataBundle', 'build_data', 'with_mode', 'match_channels', 'build_loader', 'ResumableSampler', 'SeededDataset', 'derive_seed', 'build_transform']


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (stable across runs and processes, unlike hash())."""
    seed = 0x9E3779B9
    for p in parts:
        seed = (seed * 0x01000193 ^ (int(p) & 0xFFFFFFFF)) & 0xFFFFFFFF
    return seed


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededDataset(Dataset):
    """Wraps a dataset so that the transform randomness of sample i in epoch e depends on (seed, e, i) only."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed_all(derive_seed(self.seed, self.epoch, index))
        return self.dataset[index]


class ResumableSampler(Sampler[int]):
    """DistributedSampler's semantics (shuffle by (seed, epoch), pad to a multiple of the world size, take every
    world-th index from rank), plus ``set_start`` to skip the samples of steps already done in this epoch.
    With ``pad=False`` (evaluation) every sample is visited exactly once over all ranks."""

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        self.size, self.shuffle, self.seed, self.pad = size, shuffle, seed, pad
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.num_samples = -(-size // world_size) if pad else len(range(rank, size, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if not self.pad:
            return order[self.rank::self.world_size]
        total = self.num_samples * self.world_size
        order += order[:total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    classes: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def build_transform(config: Dict[str, Any], is_training: bool, in_chans: int, mean, std,
                    model_cfg: Optional[Dict[str, Any]] = None):
    """timm's transform pipeline for training (random resized crop, flips, colour jitter, RandAugment, random
    erasing) or evaluation (resize by crop_pct, center crop), at ``data.img_size``."""
    from timm.data import create_transform
    d = config['data']
    aug = d['aug']
    crop_pct = d['crop_pct'] or (model_cfg or {}).get('crop_pct', 0.875)
    kwargs: Dict[str, Any] = dict(input_size=(in_chans, d['img_size'], d['img_size']), is_training=is_training,
                                  mean=tuple(mean), std=tuple(std), crop_pct=crop_pct,
                                  interpolation=d['interpolation'])
    if is_training:
        kwargs.update(scale=tuple(aug['scale']), ratio=tuple(aug['ratio']), hflip=aug['hflip'], vflip=aug['vflip'],
                      color_jitter=aug['color_jitter'] or None, auto_augment=aug['auto_augment'],
                      re_prob=aug['re_prob'], re_mode=aug['re_mode'], interpolation=aug['train_interpolation'])
    return create_transform(**kwargs)


def build_data(config: Dict[str, Any], model_cfg: Optional[Dict[str, Any]] = None) -> DataBundle:
    """The train and validation datasets named by ``config['data']``, with their transforms."""
    d = config['data']
    name = d['name']
    grayscale = name in ('fashion_mnist', 'digits')
    in_chans = d['in_chans'] or (1 if grayscale else 3)
    if d['mean'] is not None:
        mean, std = tuple(d['mean']), tuple(d['std'])
    elif grayscale:
        mean, std = FASHION_MNIST_MEAN * in_chans, FASHION_MNIST_STD * in_chans
    else:
        mean = tuple((model_cfg or {}).get('mean', (0.485, 0.456, 0.406)))
        std = tuple((model_cfg or {}).get('std', (0.229, 0.224, 0.225)))
    mean, std = match_channels(mean, std, in_chans)
    t_train = with_mode(build_transform(config, True, in_chans, mean, std, model_cfg), in_chans)
    t_val = with_mode(build_transform(config, False, in_chans, mean, std, model_cfg), in_chans)

    if name == 'fashion_mnist':
        train, val = load_fashion_mnist(d['path'], 'train', t_train), load_fashion_mnist(d['path'], 'test', t_val)
    elif name == 'digits':
        train, val = load_digits('train', t_train), load_digits('val', t_val)
    elif name == 'imagefolder':
        if not d['path']:
            raise ValueError('data.path must point at the image folder root (holding train/ and val/)')
        from pathlib import Path
        root = Path(d['path'])
        train = SafeImageFolder(root / d['train_split'], t_train)
        val = SafeImageFolder(root / d['val_split'], t_val, substitute=False)
        if train.classes != val.classes:
            raise ValueError(f'train and val folders have different classes: {train.classes[:5]}... vs '
                             f'{val.classes[:5]}...')
    elif name == 'fake':
        n_train, n_val = d['fake_size']
        train = fake_dataset(n_train, d['img_size'], d['fake_classes'], in_chans, seed=1, transform=t_train)
        val = fake_dataset(n_val, d['img_size'], d['fake_classes'], in_chans, seed=2, transform=t_val)
    else:
        raise ValueError(f'unknown dataset {name!r}: choose fashion_mnist, digits, imagefolder or fake')
    classes = list(train.classes)
    num_classes = d['num_classes'] or len(classes)
    return DataBundle(train, val, num_classes, in_chans, classes, mean, std)


def match_channels(mean, std, in_chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Normalisation statistics for ``in_chans`` channels (RGB statistics averaged for grayscale, and back)."""
    mean, std = tuple(mean), tuple(std)
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return mean, std


class _ConvertMode:
    """PIL mode conversion as a picklable transform (loader workers pickle the dataset)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)


def with_mode(transform, in_chans: int):
    """Prefix ``transform`` with a conversion to grayscale (1 channel) or RGB (3), whatever the source images."""
    from torchvision import transforms
    return transforms.Compose([_ConvertMode('L' if in_chans == 1 else 'RGB'), transform])


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, pad: bool = True) -> Tuple[DataLoader, ResumableSampler]:
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, pad=pad)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        drop_last=drop_last, pin_memory=False, persistent_workers=False,
                        collate_fn=collate_skipping_none)
    return loader, sampler
