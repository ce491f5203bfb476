"""The batched training augmentation (``data.loader.BatchAugment``) against independent paths: torch's resize of
the crops it reports, torchvision's crop sampling where that is deterministic, and the trainer's exact resume."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from mambazoo.data import build_data, load_digits
from mambazoo.data.loader import BatchAugment
from mambazoo.train.config import load_config

MEAN, STD = (0.25,), (0.5,)


def _images(batch=16, size=28, seed=0):
    return torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _normalised(x):
    return (x / 255 - MEAN[0]) / STD[0]


def _augment(**kwargs):
    args = dict(img_size=32, in_chans=1, mean=MEAN, std=STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                vflip=0.0)
    return BatchAugment(**{**args, **kwargs})


def test_whole_image_is_a_plain_resize():
    x = _images()
    out = _augment()(x, torch.Generator().manual_seed(1))
    ref = F.interpolate(x.float(), size=32, mode='bilinear', align_corners=False)
    assert out.dtype == torch.float32 and out.shape == (16, 1, 32, 32)
    torch.testing.assert_close(out, _normalised(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize('axis', ['hflip', 'vflip'])
def test_flips_mirror_the_resized_image(axis):
    x = _images()
    plain = _augment()(x, torch.Generator().manual_seed(1))
    flipped = _augment(**{axis: 1.0})(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(flipped, plain.flip(-1 if axis == 'hflip' else -2), rtol=0, atol=1e-5)


def _inside(size, out, before, after):
    """The output rows whose resampling taps (``before`` and ``after`` the sample position) all lie in the crop."""
    position = (torch.arange(out) + 0.5) * size / out - 0.5
    return ((position.floor() - before >= 0) & (position.floor() + after <= size - 1)).nonzero()[:, 0]


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
def test_crops_are_the_reported_boxes_resized(interpolation):
    """Each output is its reported crop (cut out by slicing) resized by torch: equal wherever the resampling
    taps lie in the crop (near its edges the batch reads the image beyond the crop, a resize of the cut-out
    clamps to its edge)."""
    x = _images(32)
    augment = _augment(scale=(0.3, 0.9), ratio=(0.6, 1.6), interpolation=interpolation)
    out = augment(x, torch.Generator().manual_seed(5))
    boxes = augment.crop_boxes(32, 28, 28, torch.Generator().manual_seed(5))
    # bicubic: taps 1 before and 2 after, weights computed in another order (1e-3 here is 0.13 grey levels)
    (before, after), atol = ((1, 2), 1e-3) if interpolation == 'bicubic' else ((0, 1), 2e-4)
    for image, result, (top, left, h, w) in zip(x, out, boxes.long().tolist()):
        assert 0 <= top and top + h <= 28 and 0 <= left and left + w <= 28
        crop = image[None, :, top:top + h, left:left + w].float()
        ref = _normalised(F.interpolate(crop, size=32, mode=interpolation, align_corners=False))[0]
        rows, cols = _inside(h, 32, before, after), _inside(w, 32, before, after)
        assert len(rows) > 16 and len(cols) > 16
        torch.testing.assert_close(result[:, rows][:, :, cols], ref[:, rows][:, :, cols], rtol=0, atol=atol)


def test_crop_boxes_follow_scale_and_ratio():
    augment = _augment(scale=(0.2, 0.6), ratio=(0.5, 2.0))
    top, left, h, w = augment.crop_boxes(4000, 64, 48, torch.Generator().manual_seed(2)).unbind(1)
    area = h * w / (64 * 48)
    # Rounding of each side to whole pixels moves the area and the ratio a little past the bounds.
    assert area.min() > 0.2 * 0.9 and area.max() < 0.6 * 1.1
    assert (w / h).min() > 0.5 * 0.85 and (w / h).max() < 2.0 * 1.15
    assert (top >= 0).all() and (top + h <= 64).all() and (left >= 0).all() and (left + w <= 48).all()
    assert top.unique().numel() > 20 and left.unique().numel() > 20  # offsets spread over the image
    assert math.log(0.5) < torch.log(w / h).mean() < math.log(2.0)


@pytest.mark.parametrize('size, ratio', [((28, 28), (2.0, 3.0)), ((40, 20), (0.75, 1.33)), ((20, 40), (0.75, 1.33))])
def test_crop_that_never_fits_falls_back_as_torchvision_does(size, ratio):
    """No try can fit (the area is the whole image, the ratio another than the image's): torchvision's centred
    fallback, which is deterministic, so its own get_params is the reference."""
    height, width = size
    augment = _augment(scale=(1.0, 1.0), ratio=ratio)
    boxes = augment.crop_boxes(3, height, width, torch.Generator().manual_seed(0))
    expected = RandomResizedCrop.get_params(torch.zeros(1, height, width), scale=[1.0, 1.0], ratio=list(ratio))
    if ratio[0] <= width / height <= ratio[1]:  # the whole image fits, then tries succeed: same box either way
        expected = (0, 0, height, width)
    assert boxes.long().tolist() == [list(expected)] * 3


def test_same_generator_state_same_batch_and_grayscale_to_three_channels():
    x = _images()
    augment = _augment(scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=0.5, in_chans=3, mean=MEAN * 3, std=STD * 3)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 0], a[:, 2])


def test_build_data_batches_only_the_recipes_it_can():
    sets = ['data.name=digits', 'data.img_size=16', 'data.aug.color_jitter=0', 'data.aug.train_interpolation=bilinear']
    bundle = build_data(load_config(None, sets))
    assert isinstance(bundle.train_augment, BatchAugment)
    image, label = bundle.train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8)  # the trainer augments the batch
    full = load_digits('train')
    assert torch.equal(image[0], torch.from_numpy(full.images[bundle.train.indices[0]]))
    assert label == full.labels[bundle.train.indices[0]]
    assert bundle.val[0][0].dtype == torch.float32  # evaluation keeps the per-image transform
    for other in ('data.aug.color_jitter=0.4', 'data.aug.train_interpolation=random', 'data.aug.re_prob=0.25',
                  'data.aug.auto_augment=rand-m9-mstd0.5-inc1', 'data.aug.batched=false'):
        bundle = build_data(load_config(None, [*sets, other]))
        assert bundle.train_augment is None, other
        assert bundle.train[0][0].dtype == torch.float32, other
