"""Activation maps per stage, the overlay the demo draws, and the image loading of the analysis commands."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import mambazoo
from helpers import TINY_MAMBAVISION, skimage_photos
from mambazoo.analysis.activations import (activation_maps, load_images, normalise_per_image, overlay_heatmap,
                                           save_activation_figure)


@pytest.fixture(scope='module')
def photos():
    return skimage_photos('chelsea.png', 'camera.png')  # RGB and grayscale


def test_one_map_per_stage_scaled_per_image():
    torch.manual_seed(0)
    model = mambazoo.create_model('mambavision_tiny', **TINY_MAMBAVISION)
    maps = activation_maps(model, torch.randn(3, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(3, 16, 16), (3, 8, 8), (3, 4, 4), (3, 2, 2)]
    for m in maps:
        flat = m.flatten(1)
        assert torch.allclose(flat.min(1).values, torch.zeros(3)) and torch.allclose(flat.max(1).values, torch.ones(3))
    assert model.training
    assert len(activation_maps(model, torch.randn(1, 3, 64, 64), indices=-1)) == 1
    with pytest.raises(ValueError, match='reduction'):
        activation_maps(model, torch.randn(1, 3, 64, 64), reduction='max')


def test_maps_of_a_plain_module_are_its_normalised_channel_reduction():
    x = torch.randn(2, 5, 6, 7)
    (mean_abs,) = activation_maps(nn.Identity(), x)
    assert torch.allclose(mean_abs, normalise_per_image(x.abs().mean(1)))
    (l2,) = activation_maps(nn.Identity(), x, reduction='l2')
    expected = x.norm(dim=1)
    lo = expected.flatten(1).min(1).values[:, None, None]
    hi = expected.flatten(1).max(1).values[:, None, None]
    assert torch.allclose(l2, (expected - lo) / (hi - lo))
    assert torch.equal(normalise_per_image(torch.ones(1, 3, 3)), torch.zeros(1, 3, 3))  # constant: zeros


def test_overlay_heatmap():
    from matplotlib import colormaps
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    heat = torch.rand(5, 6)
    assert overlay_heatmap(image, heat, alpha=0.0).tobytes() == image.tobytes()
    full = np.asarray(overlay_heatmap(image, np.zeros((5, 6)), alpha=1.0, cmap='jet'))
    assert full.shape == (20, 30, 3)
    expected = np.round(np.array(colormaps['jet'](0.0)[:3]) * 255)
    assert np.all(full == expected)
    with pytest.raises(ValueError, match='2-D'):
        overlay_heatmap(image, np.zeros((2, 5, 6)))


def test_load_images_and_figure(photos, tmp_path):
    torch.manual_seed(0)
    model = mambazoo.create_model('mambavision_tiny', **TINY_MAMBAVISION)
    images, crops, files = load_images(photos, model, img_size=64)
    assert images.shape == (2, 3, 64, 64) and [c.size for c in crops] == [(64, 64)] * 2 and files == photos
    maps = activation_maps(model, images)
    path = save_activation_figure(crops, maps, tmp_path / 'act.png')
    pixels = np.asarray(Image.open(path).convert('RGB'))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    gray_model = mambazoo.create_model('mambavision_tiny', in_chans=1, **TINY_MAMBAVISION)
    gray, _, _ = load_images(photos[:1], gray_model, img_size=32)  # the model's own channels
    assert gray.shape == (1, 1, 32, 32)
    with pytest.raises(FileNotFoundError, match='no such image file or folder'):
        load_images(tmp_path / 'missing', model)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no image files'):
        load_images(tmp_path / 'empty', model)
