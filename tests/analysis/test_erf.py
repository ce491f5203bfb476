"""Effective receptive fields: exact fields of convs, and growth with depth in a real model."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import mambazoo
from mambazoo.analysis.erf import compute_erf, erf_heatmap, high_contribution_area_ratio, save_erf_png

SMALL_MAMBAOUT = dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1])


def _window(size, centre, half):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[centre - half:centre + half + 1, centre - half:centre + half + 1] = True
    return mask


@pytest.mark.parametrize('module, size, centre, half', [
    (nn.Conv2d(3, 4, 3, padding=1), 9, 4, 1),  # a 3x3 conv sees exactly the 3x3 window
    (nn.Conv2d(3, 4, 3, padding=1), 10, 5, 1),  # even size: the centre is (h // 2, w // 2)
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)), 11, 5, 2),  # two: 5x5
    (nn.Conv2d(3, 4, 3, stride=2, padding=1), 9, 4, 1),  # output centre (2, 2) reads input rows 3..5
])
def test_erf_of_a_known_field_is_exactly_that_field(module, size, centre, half):
    torch.manual_seed(0)
    erf = compute_erf(module, torch.randn(3, 3, size, size))
    assert erf.shape == (size, size)
    assert torch.equal(erf > 0, _window(size, centre, half))


def test_erf_grows_with_depth_and_restores_mode():
    torch.manual_seed(0)
    model = mambazoo.create_model('mambaout_femto', **SMALL_MAMBAOUT)
    images = torch.randn(2, 3, 64, 64)
    first, last = compute_erf(model, images, stage=0), compute_erf(model, images, stage=-1)
    assert model.training, 'compute_erf must restore the training mode'
    assert (first > 0).sum() < (last > 0).sum()
    heat = erf_heatmap(last)
    assert heat.max() == 1.0 and heat.min() >= 0 and heat.std() > 0
    with pytest.raises(ValueError, match='out of range'):
        compute_erf(model, images, stage=4)
    with pytest.raises(ValueError, match='single stage'):
        compute_erf(nn.Conv2d(3, 3, 3), images, stage=2)


def test_high_contribution_area_ratio():
    delta = torch.zeros(9, 9)
    delta[4, 4] = 1.0
    assert high_contribution_area_ratio(delta, (0.5, 0.99)) == {0.5: 1 / 81, 0.99: 1 / 81}
    uniform = torch.ones(9, 9)
    # 3x3 holds 9/81 < 0.2 of the total, 5x5 holds 25/81 >= 0.2; all of it for 0.99
    assert high_contribution_area_ratio(uniform, (0.2, 0.99)) == {0.2: 25 / 81, 0.99: 1.0}


def test_erf_png_is_written_and_not_constant(tmp_path):
    torch.manual_seed(0)
    erf = compute_erf(nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.Conv2d(4, 4, 5, padding=2)),
                      torch.randn(2, 3, 33, 33))
    path = save_erf_png(erf, tmp_path / 'sub' / 'erf.png', title='two 5x5 convs')
    pixels = np.asarray(Image.open(path).convert('RGB'))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
