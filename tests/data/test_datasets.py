"""Datasets and loaders: IDX files, Fashion-MNIST (present or absent), digits, image folders with corrupt files,
the resumable sampler and the per-sample seeding that make ``--resume`` exact."""
import gzip
import logging
import random
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_image_folder
from mambazoo.data import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, DatasetNotFoundError, ResumableSampler,
                           SafeImageFolder, SeededDataset, build_data, build_loader, derive_seed, load_digits,
                           load_fashion_mnist, read_idx)
from mambazoo.train.config import load_config


# ---------------------------------------------------------------------------------------------------------
# IDX files

def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes()


@pytest.mark.parametrize('compressed', [False, True])
def test_read_idx_round_trip(tmp_path, compressed):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for name, array in (('images-idx3-ubyte', images), ('labels-idx1-ubyte', labels)):
        data = _idx_bytes(array)
        path = tmp_path / (name + ('.gz' if compressed else ''))
        path.write_bytes(gzip.compress(data) if compressed else data)
        out = read_idx(path)
        assert out.dtype == np.uint8 and out.shape == array.shape
        np.testing.assert_array_equal(out, array)


_GOOD = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize('data', [
    pytest.param(b'\x00\x00', id='shorter-than-magic'),
    pytest.param(b'\x01\x00\x08\x03' + _GOOD[4:], id='nonzero-magic'),
    pytest.param(b'\x00\x00\x0d\x03' + _GOOD[4:], id='float-dtype'),
    pytest.param(_GOOD[:-5], id='truncated-body'),
    pytest.param(_GOOD + b'\x00', id='trailing-bytes'),
    pytest.param(b'', id='empty'),
    pytest.param(_GOOD[:8], id='truncated-dims'),
])
def test_read_idx_rejects_invalid_files(tmp_path, data):
    path = tmp_path / 'bad-idx3-ubyte'
    path.write_bytes(data)
    with pytest.raises(ValueError):
        read_idx(path)


def test_read_idx_truncated_gzip_is_value_error(tmp_path):
    data = gzip.compress(_idx_bytes(np.random.default_rng(1).integers(0, 256, (40, 28, 28), dtype=np.uint8)))
    path = tmp_path / 'train-images-idx3-ubyte.gz'
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError):
        read_idx(path)


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST

def test_fashion_mnist_absent_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist(tmp_path, 'train')
    message = str(info.value)
    assert 'apt-get' in message and 'dataset-fashion-mnist' in message
    assert 'digits' in message
    assert str(tmp_path) in message
    assert isinstance(info.value, FileNotFoundError)


def test_build_data_with_missing_fashion_mnist_path_raises(tmp_path):
    config = load_config(None, ['data.name=fashion_mnist', f'data.path={tmp_path}', 'data.img_size=32'])
    with pytest.raises(DatasetNotFoundError, match='apt-get'):
        build_data(config)


def test_fashion_mnist_from_handmade_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (('train', 6), ('t10k', 4)):
        (tmp_path / f'{prefix}-images-idx3-ubyte').write_bytes(
            _idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        (tmp_path / f'{prefix}-labels-idx1-ubyte.gz').write_bytes(
            gzip.compress(_idx_bytes(np.arange(n, dtype=np.uint8) % 10)))
    train, test = load_fashion_mnist(tmp_path, 'train'), load_fashion_mnist(tmp_path, 'test')
    assert len(train) == 6 and len(test) == 4
    img, label = test[3]
    assert img.size == (28, 28) and img.mode == 'L' and label == 3
    assert train.classes == list(FASHION_MNIST_CLASSES)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / 't10k-labels-idx1-ubyte.gz').is_file(),
                    reason=f'Fashion-MNIST is not installed at {FASHION_MNIST_DIR}')
def test_real_fashion_mnist_shapes_and_labels():
    test = load_fashion_mnist(None, 'test')
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    train = load_fashion_mnist(None, 'train')
    assert train.images.shape == (60000, 28, 28)
    assert np.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    # Statistics match the constants the transforms normalise with.
    assert abs(train.images.mean() / 255 - 0.2860) < 1e-3
    assert abs(train.images.std() / 255 - 0.3530) < 1e-3
    img, label = test[0]
    assert img.size == (28, 28) and label == 9  # the first test image is an ankle boot
    assert 0 < np.asarray(img).std()


# ---------------------------------------------------------------------------------------------------------
# Digits

def test_digits_split_sizes_determinism_and_partition():
    from sklearn.datasets import load_digits as sk_load_digits
    full = sk_load_digits()
    train, val = load_digits('train'), load_digits('val')
    assert len(train) + len(val) == len(full.target) == 1797
    per_class = np.bincount(full.target, minlength=10)
    np.testing.assert_array_equal(np.bincount(val.labels, minlength=10), np.round(per_class * 0.2).astype(int))
    assert train.images.shape[1:] == (8, 8) and train.images.dtype == np.uint8 and train.images.max() == 255
    # Together the two splits are the whole set (as a multiset of (image, label) rows).
    rows = lambda imgs, labels: sorted(i.tobytes() + bytes([l]) for i, l in zip(imgs, labels))
    full_imgs = (full.images * (255.0 / 16.0)).round().astype(np.uint8)
    assert rows(np.concatenate([train.images, val.images]), np.concatenate([train.labels, val.labels])) == \
        rows(full_imgs, full.target)
    again = load_digits('val')
    np.testing.assert_array_equal(again.images, val.images)
    np.testing.assert_array_equal(again.labels, val.labels)
    other = load_digits('val', seed=1)
    assert not np.array_equal(other.images, val.images)


# ---------------------------------------------------------------------------------------------------------
# Image folders with corrupt files

def test_safe_image_folder_skips_and_reports_bad_files(tmp_path, caplog):
    bad = make_image_folder(tmp_path)
    ds = SafeImageFolder(tmp_path / 'train')
    assert len(ds) == 12 + 3 and ds.classes == ['dark', 'light']
    with caplog.at_level(logging.WARNING, logger='mambazoo.data.datasets'):
        items = [ds[i] for i in range(len(ds))]
    assert sorted(ds.bad_files) == bad['train']
    for path in bad['train']:
        assert sum(path in r.getMessage() for r in caplog.records) == 1, f'{path} not reported exactly once'
    for img, label in items:
        assert isinstance(img, Image.Image) and img.size == (32, 32) and label in (0, 1)
    # Good files come back as themselves (with their own label).
    good = [i for i, (p, _) in enumerate(ds.samples) if p not in ds.bad_files]
    for i in good:
        path, label = ds.samples[i]
        assert items[i][1] == label
        assert np.array_equal(np.asarray(items[i][0]), np.asarray(Image.open(path).convert('RGB')))
    # A second pass reports nothing new.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='mambazoo.data.datasets'):
        [ds[i] for i in range(len(ds))]
    assert not caplog.records


def test_safe_image_folder_through_a_loader(tmp_path):
    make_image_folder(tmp_path)
    config = load_config(None, ['data.name=imagefolder', f'data.path={tmp_path}', 'data.img_size=32'])
    data = build_data(config)
    loader, _ = build_loader(data.train, 4, True, 0, 0, drop_last=False)
    seen = 0
    for x, y in loader:
        assert x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all()
        seen += len(y)
    assert seen == len(data.train)
    assert len(data.train.bad_files) == 3


def test_safe_image_folder_all_unreadable_and_missing_root(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'x.png').write_bytes(b'')
    ds = SafeImageFolder(tmp_path)
    with pytest.raises(RuntimeError, match='no readable image'):
        ds[0]
    with pytest.raises(DatasetNotFoundError):
        SafeImageFolder(tmp_path / 'nope')


# ---------------------------------------------------------------------------------------------------------
# Sampler and seeding

def test_derive_seed_is_stable_and_sensitive():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, e, i) for e in range(5) for i in range(50)}) == 250
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed(-1, 2 ** 40) < 2 ** 32


def test_sampler_order_depends_on_seed_and_epoch_only():
    s = ResumableSampler(50, shuffle=True, seed=3)
    first = list(s)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(ResumableSampler(50, shuffle=True, seed=3)) == first
    s.set_epoch(1)
    assert list(s) != first
    assert list(ResumableSampler(50, shuffle=True, seed=4)) != first
    assert list(ResumableSampler(50, shuffle=False)) == list(range(50))


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_sampler_set_start_skips_exactly(world_size):
    for rank in range(world_size):
        s = ResumableSampler(23, shuffle=True, seed=0, rank=rank, world_size=world_size)
        s.set_epoch(2)
        full = list(s)
        for start in (0, 1, 5, len(full) - 1, len(full)):
            s.set_start(start)
            assert list(s) == full[start:]
            assert len(s) == len(full) - start


@pytest.mark.parametrize('size,world_size', [(20, 2), (23, 2), (23, 3), (5, 4)])
def test_sampler_ranks_cover_the_dataset(size, world_size):
    per_rank = [list(ResumableSampler(size, True, seed=1, rank=r, world_size=world_size))
                for r in range(world_size)]
    assert len({len(p) for p in per_rank}) == 1  # equal lengths: no rank waits for the others
    assert set().union(*map(set, per_rank)) == set(range(size))
    assert sum(map(len, per_rank)) - size < world_size  # padding: fewer than world_size repeats
    # pad=False (evaluation): every sample exactly once over all ranks.
    unpadded = [list(ResumableSampler(size, False, rank=r, world_size=world_size, pad=False))
                for r in range(world_size)]
    assert sorted(i for p in unpadded for i in p) == list(range(size))
    assert sum(len(ResumableSampler(size, False, rank=r, world_size=world_size, pad=False))
               for r in range(world_size)) == size


def test_sampler_two_ranks_split_each_global_batch():
    """What makes 2 processes x batch b equivalent to 1 process x batch 2b: at every step, the union of the
    ranks' batches is the 1-process batch."""
    size, b = 64, 4
    single = list(ResumableSampler(size, True, seed=0))
    ranks = [list(ResumableSampler(size, True, seed=0, rank=r, world_size=2)) for r in range(2)]
    for step in range(size // (2 * b)):
        union = sorted(ranks[0][step * b:(step + 1) * b] + ranks[1][step * b:(step + 1) * b])
        assert union == sorted(single[step * 2 * b:(step + 1) * 2 * b])


class _RandomDataset(torch.utils.data.Dataset):
    """Each item draws from Python's, NumPy's and torch's global generators."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))]), index


def test_seeded_dataset_is_independent_of_access_order():
    ds = SeededDataset(_RandomDataset(), seed=0)
    forward = {i: ds[i][0] for i in range(10)}
    torch.manual_seed(123)
    random.seed(5)
    backward = {i: ds[i][0] for i in reversed(range(10))}
    for i in range(10):
        assert torch.equal(forward[i], backward[i])
    assert len({tuple(v.tolist()) for v in forward.values()}) == 10
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], forward[0])
    assert not torch.equal(SeededDataset(_RandomDataset(), seed=1)[0][0], forward[0])


def _augmented_fake(n: int = 12):
    config = load_config(None, ['data.name=fake', 'data.img_size=32', f'data.fake_size=[{n},4]',
                                'data.aug.auto_augment=rand-m9-mstd0.5-inc1', 'data.aug.re_prob=0.5',
                                'data.aug.color_jitter=0.4'])
    return SeededDataset(build_data(config).train, seed=7)


def test_seeded_dataset_real_augmentations_repeat():
    ds = _augmented_fake()
    ds.set_epoch(3)
    a = [ds[i][0] for i in (5, 1, 5, 0)]
    b = [ds[i][0] for i in (0, 1, 5)]
    assert torch.equal(a[0], a[2]) and torch.equal(a[0], b[2])
    assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[0])
    ds.set_epoch(4)
    assert not torch.equal(ds[5][0], a[0])  # a new epoch draws new augmentations


def test_loader_batches_do_not_depend_on_workers():
    ds = _augmented_fake(8)
    batches = {}
    for workers in (0, 2):
        loader, sampler = build_loader(ds, 4, True, 0, workers, drop_last=True)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        batches[workers] = [x for x, _ in loader]
    assert len(batches[0]) == 2
    for x0, x2 in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2)
