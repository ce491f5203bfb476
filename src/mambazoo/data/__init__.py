"""Datasets (image folders, synthetic, Fashion-MNIST, scikit-learn digits) and loaders built from a config."""
from .datasets import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, ArrayImageDataset, DatasetNotFoundError,
                       SafeImageFolder, load_digits, load_fashion_mnist, read_idx)
from .loader import DataBundle, ResumableSampler, SeededDataset, build_data, build_loader, derive_seed

__all__ = [
    'ArrayImageDataset', 'SafeImageFolder', 'DatasetNotFoundError', 'load_fashion_mnist', 'load_digits', 'read_idx',
    'FASHION_MNIST_CLASSES', 'FASHION_MNIST_DIR', 'DataBundle', 'build_data', 'build_loader', 'ResumableSampler',
    'SeededDataset', 'derive_seed',
]
