"""The composed detection / segmentation set: annotations consistent with the pixels, deterministic, valid."""
import numpy as np
import pytest
import torch

from mambazoo.data.datasets import FASHION_MNIST_DIR
from mambazoo.downstream import ComposedObjectsDataset, build_composed_datasets, collate_detection

SOURCES = ['digits', pytest.param('fashion_mnist', marks=pytest.mark.skipif(
    not (FASHION_MNIST_DIR / 't10k-images-idx3-ubyte.gz').is_file(), reason='Fashion-MNIST not installed'))]


@pytest.fixture(scope='module', params=SOURCES)
def composed(request):
    train, val, classes = build_composed_datasets(request.param, train_size=12, val_size=12, canvas_size=96,
                                                  items=(1, 4), item_size=(16, 40), seed=3)
    return train, val, classes


def test_annotations_match_the_pixels(composed):
    train, val, classes = composed
    assert len(classes) == 10 and len(train) == len(val) == 12
    counts = []
    for dataset in (train, val):
        for i in range(len(dataset)):
            image, t = dataset[i]
            n = len(t['labels'])
            counts.append(n)
            assert image.shape == (3, 96, 96) and image.dtype == torch.float32
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert t['boxes'].shape == (n, 4) and t['masks'].shape == (n, 96, 96) and t['image_id'] == i
            assert ((t['labels'] >= 1) & (t['labels'] <= 10)).all()
            masks = t['masks'].bool()
            assert (masks.sum(0) <= 1).all(), 'objects never overlap'
            for box, mask in zip(t['boxes'], masks):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            expected = (t['labels'].view(-1, 1, 1) * masks).sum(0) if n else torch.zeros(96, 96, dtype=torch.int64)
            assert torch.equal(t['semantic'], expected)
            # Object pixels are exactly the pixels brighter than the mask threshold (the background is black).
            bright = (image[0] * 255).round() > dataset.mask_threshold
            assert torch.equal(bright, t['semantic'] > 0)
    assert 1 <= min(counts) and max(counts) <= 4 and len(set(counts)) > 1


def test_canvases_are_deterministic(composed):
    train, val, _ = composed
    a, b = train[5], train[5]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]['boxes'], b[1]['boxes'])
    assert not torch.equal(train[5][0], train[6][0])
    assert not torch.equal(train[0][0], val[0][0])  # other photos, other seed


def test_collate_and_grey_canvases():
    images = np.zeros((3, 8, 8), dtype=np.uint8)
    images[:, 2:6, 2:6] = 200
    ds = ComposedObjectsDataset(images, np.array([0, 1, 2]), ['a', 'b', 'c'], num_canvases=4, canvas_size=32,
                                items=(2, 2), item_size=(8, 8), channels=1)
    image, target = ds[0]
    assert image.shape == (1, 32, 32)
    # A bright 4x4 square of an 8x8 photo, enlarged to 8x8: its box is about 4x4 pixels wide.
    assert len(target['labels']) == 2
    sides = target['boxes'][:, 2:] - target['boxes'][:, :2]
    assert ((sides >= 4) & (sides <= 6)).all()
    imgs, targets = collate_detection([ds[0], ds[1]])
    assert len(imgs) == len(targets) == 2 and targets[1]['image_id'] == 1
    with pytest.raises(IndexError):
        ds[4]


@pytest.mark.parametrize('kwargs, message', [
    (dict(items=(0, 2), item_size=(8, 16)), 'items'),
    (dict(item_size=(8, 64)), 'item_size'),
    (dict(channels=2, item_size=(8, 16)), 'channels'),
])
def test_bad_arguments_are_reported(kwargs, message):
    images = np.zeros((2, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match=message):
        ComposedObjectsDataset(images, np.array([0, 1]), ['a', 'b'], 4, canvas_size=32, **kwargs)
    with pytest.raises(ValueError, match='source'):
        build_composed_datasets('cifar')
