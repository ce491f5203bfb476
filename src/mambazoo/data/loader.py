"""From a config to data loaders: datasets, timm's transforms, and a sampler that can resume mid-epoch.

Reproducibility (what makes ``--resume`` exact): the order of the samples is a function of (seed, epoch) alone,
and the random augmentation of each sample is a function of (seed, epoch, sample index) alone (each sample
reseeds Python's, NumPy's and torch's generators before its transform). So a run resumed at any optimizer step
sees the very batches, with the very augmentations, that the uninterrupted run saw, whatever the number of
loader workers.
"""
import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .datasets import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, ArrayToTensor, DatasetNotFoundError, SafeImageFolder,
                       collate_skipping_none, fake_dataset, load_digits, load_fashion_mnist)
from .images import eval_transform_of, match_channels, with_mode

__all__ = ['DataBundle', 'build_data', 'with_mode', 'match_channels', 'build_loader', 'ResumableSampler', 'SeededDataset', 'derive_seed', 'build_train_transform',
           'BatchAugment', 'eval_config_of', 'holdout_split']


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (stable across runs and processes, unlike hash())."""
    seed = 0x9E3779B9
    for p in parts:
        seed = (seed * 0x01000193 ^ (int(p) & 0xFFFFFFFF)) & 0xFFFFFFFF
    return seed


def seed_all(seed: int, devices: bool = True) -> None:
    """Seed Python's, NumPy's and torch's generators; ``devices=False`` seeds torch's CPU generator only.

    Why the CPU-only form for per-sample seeding: ``torch.manual_seed`` also seeds every accelerator backend, and
    where one is not initialised it queues that call with a formatted stack trace (for its error message), three
    backends per call: about 0.4 ms, which per training image cost the Fashion-MNIST recipe a fifth of its
    throughput. The CPU generator ends in the same state either way (the transforms run on the CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    if devices:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


class SeededDataset(Dataset):
    """Wraps a dataset so that the transform randomness of sample i in epoch e depends on (seed, e, i) only."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed_all(derive_seed(self.seed, self.epoch, index), devices=False)
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
    """What ``build_data`` gives the trainer: ``val`` picks the best checkpoint; ``test``, where the data set has
    one apart from it, is evaluated once at the end (None otherwise: then ``val`` is the reported figure).
    ``eval_config`` is the evaluation transform as timm's data config (input_size, interpolation, mean, std,
    crop_pct, crop_mode): what the checkpoints record, so every command preprocesses as validation did."""
    train: Dataset
    val: Dataset
    test: Optional[Dataset]
    num_classes: int
    in_chans: int
    classes: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    eval_config: Dict[str, Any]
    val_source: str  # where the validation images come from, in words
    # Where set (BatchAugment), the training set yields uint8 images and the trainer augments each batch with it.
    train_augment: Optional[Callable] = None


def build_train_transform(config: Dict[str, Any], in_chans: int, mean, std):
    """timm's training pipeline (random resized crop, flips, colour jitter, RandAugment, random erasing) at
    ``data.img_size``."""
    from timm.data import create_transform
    d, aug = config['data'], config['data']['aug']
    return create_transform(
        input_size=(in_chans, d['img_size'], d['img_size']), is_training=True, mean=tuple(mean), std=tuple(std),
        scale=tuple(aug['scale']), ratio=tuple(aug['ratio']), hflip=aug['hflip'], vflip=aug['vflip'],
        color_jitter=aug['color_jitter'] or None, auto_augment=aug['auto_augment'], re_prob=aug['re_prob'],
        re_mode=aug['re_mode'], interpolation=aug['train_interpolation'])


class BatchAugment:
    """The training augmentation of in-memory images, a whole batch at once: random resized crop (torchvision's
    sampling of area and aspect ratio, ten tries, then the centre), horizontal and vertical flips, resize to
    ``img_size`` by one ``grid_sample`` (bilinear or bicubic), normalisation.

    Why: per image, timm's pipeline (PIL crop and resize, flip, to tensor, normalise) cost 0.24 ms, a quarter of
    the Fashion-MNIST recipe's training step on 2 cores; the batch takes about a millisecond. Randomness comes from
    the ``generator`` of each call, which the trainer seeds by (seed, epoch, step), so a resumed run sees the same
    augmentations. Takes uint8 images (B, C, H, W), grayscale or of ``in_chans`` channels (``ArrayToTensor``'s,
    batched); returns float32 (B, in_chans, img_size, img_size)."""

    def __init__(self, img_size: int, in_chans: int, mean, std, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, vflip: float = 0.0, interpolation: str = 'bilinear'):
        if interpolation not in ('bilinear', 'bicubic'):
            raise ValueError(f'BatchAugment resizes bilinear or bicubic, not {interpolation!r}')
        self.img_size, self.in_chans, self.interpolation = img_size, in_chans, interpolation
        self.scale, self.log_ratio = tuple(scale), (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio, self.hflip, self.vflip = tuple(ratio), hflip, vflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def crop_boxes(self, batch: int, height: int, width: int, generator: torch.Generator) -> Tensor:
        """(top, left, height, width) of each image's crop, (batch, 4) float: torchvision's
        ``RandomResizedCrop.get_params``, its ten tries drawn at once."""
        tries = 10
        area = height * width * torch.empty(batch, tries).uniform_(*self.scale, generator=generator)
        aspect = torch.exp(torch.empty(batch, tries).uniform_(*self.log_ratio, generator=generator))
        w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 where none does)
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        # Where no try fits: the whole image, cut to the nearest allowed aspect ratio, centred.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = float(width), float(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw, fh = float(round(height * self.ratio[1])), float(height)
        else:
            fw, fh = float(width), float(height)
        any_fits = fits.any(1)
        w, h = torch.where(any_fits, w, fw), torch.where(any_fits, h, fh)
        offsets = torch.rand(batch, 2, generator=generator)
        top = torch.where(any_fits, (offsets[:, 0] * (height - h + 1)).floor(), ((height - h) / 2).floor())
        left = torch.where(any_fits, (offsets[:, 1] * (width - w + 1)).floor(), ((width - w) / 2).floor())
        return torch.stack([top, left, h, w], 1)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        batch, _, height, width = images.shape
        top, left, h, w = self.crop_boxes(batch, height, width, generator).unbind(1)
        flips = torch.rand(batch, 2, generator=generator) < torch.tensor([self.hflip, self.vflip])
        sign = 1.0 - 2.0 * flips.float()
        # Where each output pixel samples the input, in grid_sample's [-1, 1] pixel-edge coordinates (what
        # affine_grid makes, without its batched matrix product): the output's edges land on the crop's edges,
        # a flip mirrors within the crop.
        centres = (torch.arange(self.img_size, dtype=torch.float32) * 2 + 1) / self.img_size - 1
        gx = (sign[:, :1] * w[:, None] / width) * centres + ((2 * left + w) / width - 1)[:, None]
        gy = (sign[:, 1:] * h[:, None] / height) * centres + ((2 * top + h) / height - 1)[:, None]
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1).to(images.device)
        out = F.grid_sample(images.float(), grid, mode=self.interpolation, padding_mode='border',
                            align_corners=False)
        if out.shape[1] != self.in_chans:  # grayscale images for a model with more input channels
            out = out.expand(-1, self.in_chans, -1, -1)
        return (out - self.mean.to(out.device)) / self.std.to(out.device)

    @staticmethod
    def takes(config: Dict[str, Any]) -> bool:
        """Whether ``data.aug`` is within what a batch can do (crop, flips; bilinear or bicubic)."""
        aug = config['data']['aug']
        return (bool(aug['batched']) and not aug['color_jitter'] and not aug['auto_augment'] and not aug['re_prob']
                and aug['train_interpolation'] in ('bilinear', 'bicubic'))


def eval_config_of(config: Dict[str, Any], in_chans: int, mean, std,
                   model_cfg: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The evaluation transform of a training config, as timm's data config (resize by crop_pct, center crop)."""
    d = config['data']
    return {'input_size': (in_chans, d['img_size'], d['img_size']), 'interpolation': d['interpolation'],
            'mean': tuple(mean), 'std': tuple(std), 'crop_pct': d['crop_pct'] or (model_cfg or {}).get('crop_pct', 0.875),
            'crop_mode': 'center'}


def holdout_split(size: int, holdout: Union[int, str, None], seed: int) -> Tuple[List[int], List[int]]:
    """(train indices, held-out indices) of a training set of ``size``: ``holdout`` images ('auto': min(5000, a
    tenth)) chosen by ``seed`` alone, both lists sorted."""
    count = min(5000, size // 10) if holdout in (None, 'auto') else int(holdout)
    if not 0 < count < size:
        raise ValueError(f'data.holdout must leave images on both sides: {count} of {size} training images')
    order = torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed(seed, 0x5E1))).tolist()
    return sorted(order[count:]), sorted(order[:count])


def _evaluation_view(dataset: Dataset, transform) -> Dataset:
    """The same images under the evaluation transform: a shallow copy (nothing read or listed again); an image
    folder's view leaves unreadable images out instead of substituting them, as evaluation does."""
    view = copy.copy(dataset)
    view.transform = transform
    if isinstance(view, SafeImageFolder):
        view.substitute = False
    return view


def build_data(config: Dict[str, Any], model_cfg: Optional[Dict[str, Any]] = None) -> DataBundle:
    """The training, validation and (where there is one) test sets named by ``config['data']``, with transforms.

    Fashion-MNIST and digits have a training and a test split only: ``data.holdout`` training images (seeded by
    ``train.seed``) become the validation set and the test split is the test set; ``data.holdout: 0`` validates
    on the test split instead (no test set then). An ImageFolder validates on ``val_split``, and tests on
    ``test_split`` where that folder exists; without ``val_split`` it holds out training images as above."""
    from pathlib import Path
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
    eval_config = eval_config_of(config, in_chans, mean, std, model_cfg)
    train_augment = None
    if name in ('fashion_mnist', 'digits') and BatchAugment.takes(config):  # images in memory: batches augment
        aug = d['aug']
        train_augment = BatchAugment(d['img_size'], in_chans, mean, std, aug['scale'], aug['ratio'], aug['hflip'],
                                     aug['vflip'], aug['train_interpolation'])
        t_train = ArrayToTensor()
    else:
        t_train = with_mode(build_train_transform(config, in_chans, mean, std), in_chans)
    t_val = eval_transform_of(eval_config)  # what the checkpoints record and every command rebuilds

    val = test = None  # val stays None where the training set must give the validation images
    if name == 'fashion_mnist':
        train_full = load_fashion_mnist(d['path'], 'train', t_train)
        test = load_fashion_mnist(d['path'], 'test', t_val)
    elif name == 'digits':
        train_full, test = load_digits('train', t_train), load_digits('val', t_val)
    elif name == 'imagefolder':
        if not d['path']:
            raise ValueError('data.path must point at the image folder root (holding train/ and val/)')
        root = Path(d['path'])
        train_full = SafeImageFolder(root / d['train_split'], t_train)
        if (root / d['test_split']).is_dir() and d['test_split'] != d['val_split']:
            test = SafeImageFolder(root / d['test_split'], t_val, substitute=False)
        if (root / d['val_split']).is_dir():
            val = SafeImageFolder(root / d['val_split'], t_val, substitute=False)
        elif test is None:
            raise DatasetNotFoundError(f'{root} has neither a {d["val_split"]}/ nor a {d["test_split"]}/ folder '
                                       f'beside {d["train_split"]}/')
        for split, folder in ((val, d['val_split']), (test, d['test_split'])):
            if split is not None and list(split.classes) != list(train_full.classes):
                raise ValueError(f'{d["train_split"]}/ and {folder}/ in {root} have different classes: '
                                 f'{train_full.classes[:5]}... vs {split.classes[:5]}...')
    elif name == 'fake':
        n_train, n_val = d['fake_size']
        train_full = fake_dataset(n_train, d['img_size'], d['fake_classes'], in_chans, seed=1, transform=t_train)
        val = fake_dataset(n_val, d['img_size'], d['fake_classes'], in_chans, seed=2, transform=t_val)
    else:
        raise ValueError(f'unknown dataset {name!r}: choose fashion_mnist, digits, imagefolder or fake')

    train = train_full
    if val is not None:
        val_source = f'the {name} validation split'
    elif d['holdout'] == 0:  # validate on the test split, as before the split existed: then nothing is held out
        val, test = test, None
        val_source = f'the {name} test split (data.holdout 0: the selection set is the reported one)'
    else:
        train_idx, val_idx = holdout_split(len(train_full), d['holdout'], int(config['train']['seed']))
        train, val = Subset(train_full, train_idx), Subset(_evaluation_view(train_full, t_val), val_idx)
        val_source = f'{len(val_idx)} training images held out (seed {config["train"]["seed"]})'
    classes = list(train_full.classes)
    num_classes = d['num_classes'] or len(classes)
    return DataBundle(train, val, test, num_classes, in_chans, classes, mean, std, eval_config, val_source,
                      train_augment)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, pad: bool = True) -> Tuple[DataLoader, ResumableSampler]:
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, pad=pad)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        drop_last=drop_last, pin_memory=False, persistent_workers=False,
                        collate_fn=collate_skipping_none)
    return loader, sampler
