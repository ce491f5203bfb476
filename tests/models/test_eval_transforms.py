"""Our evaluation transform is each family's OFFICIAL one: the same tensors on images of several aspect ratios.

The official transforms are rebuilt here from their published parameters, by the rules of each official
validation code (read in the official repositories; no code copied):

- MambaVision (NVlabs/MambaVision ``validate.py``): timm's ``create_transform`` from the model's cfg, whose values
  are those of ``mambavision/models/mamba_vision.py``'s ``default_cfgs`` (``OFFICIAL_MAMBAVISION`` below),
  ``crop_mode`` included ('squash' for the 512 px models).
- Vim (hustvl/Vim ``main.py`` / ``datasets.py``, DeiT's ``build_transform``): resize the shorter side to
  ``int(224 / eval_crop_ratio)`` with ``eval_crop_ratio`` 0.875, bicubic; center crop 224; ImageNet mean/std.
- VMamba (MzeroMiko/VMamba ``classification/data/build.py``, ``TEST.CROP`` True by default, DATA.INTERPOLATION
  'bicubic'): resize the shorter side to ``int(256 / 224 * 224)``; center crop 224; ImageNet mean/std.
- MambaOut: timm's own cfg of the name and tag (timm ships MambaOut; its validation is timm's).

Ours is what every command uses (``mambazoo predict``, ``validate``, the demo, the analysis tools:
``data.images.build_eval_transform``): timm's ``resolve_data_config`` on the model's ``pretrained_cfg``, for
every pretrained tag of every name with official weights (``create_model('name.tag')``); our small variants
(``*_nano``) have no official counterpart.
"""
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import mambazoo
from mambazoo.models import _builder
from mambazoo.data.images import build_eval_transform

SIZES = [(500, 375), (375, 500), (224, 224), (640, 480)]  # (width, height)

# name -> (input_size, crop_pct, crop_mode) of the official cfgs (mean/std ImageNet's, bicubic, for all).
OFFICIAL_MAMBAVISION = {
    'mambavision_tiny': ((3, 224, 224), 1.0, 'center'),
    'mambavision_tiny2': ((3, 224, 224), 0.98, 'center'),
    'mambavision_small': ((3, 224, 224), 0.93, 'center'),
    'mambavision_base': ((3, 224, 224), 1.0, 'center'),
    'mambavision_base_21k': ((3, 224, 224), 1.0, 'center'),
    'mambavision_large': ((3, 224, 224), 1.0, 'center'),
    'mambavision_large_21k': ((3, 224, 224), 1.0, 'center'),
    'mambavision_large2': ((3, 224, 224), 1.0, 'center'),
    'mambavision_large2_512_21k': ((3, 512, 512), 0.93, 'squash'),
    'mambavision_large3_256_21k': ((3, 256, 256), 1.0, 'center'),
    'mambavision_large3_512_21k': ((3, 512, 512), 0.93, 'squash'),
}


def official_mambavision(name):
    input_size, crop_pct, crop_mode = OFFICIAL_MAMBAVISION[name.partition('.')[0]]
    return create_transform(input_size=input_size, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
                            std=IMAGENET_DEFAULT_STD, crop_pct=crop_pct, crop_mode=crop_mode, is_training=False)


def resize_crop_normalize(resize_to, crop):
    """The DeiT / Swin style evaluation both Vim and VMamba use: shorter side to ``resize_to`` (bicubic),
    center crop, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize(resize_to, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def official_vim(name):
    return resize_crop_normalize(int(224 / 0.875), 224)


def official_vmamba(name):
    return resize_crop_normalize(int((256 / 224) * 224), 224)


def official_mambaout(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()  # name.tag: that tag's cfg
    return create_transform(**resolve_data_config({}, pretrained_cfg=cfg), is_training=False)


OFFICIAL = {'mambavision': official_mambavision, 'vim': official_vim, 'vmamba': official_vmamba,
            'mambaout': official_mambaout}


def has_official_weights(name):
    """Our small variants (``*_nano``) have no official counterpart, hence no official transform: their cfg names
    no weights (tests/models/test_small_variants.py checks it)."""
    cfg = mambazoo.get_pretrained_cfg(name)
    return bool(cfg.get('hf_hub_id') or cfg.get('url'))


IN_OFFICIAL_FAMILIES = [n for n in mambazoo.list_models() if n.split('_')[0] in OFFICIAL]
NAMES = [n for n in IN_OFFICIAL_FAMILIES if has_official_weights(n)]


def tagged(name):
    """``name.tag`` for every pretrained tag of ``name`` (MambaOut's timm variants have several)."""
    tags = _builder._default_cfg(name, _builder._family_cfgs(name)).tags
    return [f'{name}.{tag}' if tag else name for tag in tags]


NAMES_TAGS = [t for n in NAMES for t in tagged(n)]


@pytest.fixture(scope='module')
def photos():
    """Smooth pictures with texture (bicubic resampling has something to get wrong), one per aspect ratio."""
    rng = np.random.default_rng(0)
    out = []
    for width, height in SIZES:
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
        noise = rng.integers(-40, 40, size=(height, width, 3))
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), 'RGB'))
    return out


def built(name):
    with torch.device('meta'):  # only the cfg matters: shapes, no weights
        return mambazoo.create_model(name)


def test_every_family_with_official_weights_is_covered():
    assert {n.split('_')[0] for n in NAMES} == set(OFFICIAL)
    assert set(OFFICIAL_MAMBAVISION) == set(mambazoo.list_models('mambavision*')) & set(NAMES)
    # the only names left out: our small variants, without weights (a released model losing its hub id would show)
    assert set(IN_OFFICIAL_FAMILIES) - set(NAMES) == {'mambavision_nano', 'vim_nano', 'vmamba_nano'}


@pytest.mark.parametrize('name', sorted(OFFICIAL_MAMBAVISION))
def test_mambavision_cfg_is_the_official_one(name):
    input_size, crop_pct, crop_mode = OFFICIAL_MAMBAVISION[name]
    cfg = mambazoo.get_pretrained_cfg(name)
    assert (cfg['input_size'], cfg['crop_pct'], cfg['crop_mode']) == (input_size, crop_pct, crop_mode)
    assert (cfg['interpolation'], cfg['mean'], cfg['std']) == ('bicubic', IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


@pytest.mark.parametrize('name', NAMES_TAGS)
def test_eval_transform_is_the_official_one(name, photos):
    model = built(name)
    official = OFFICIAL[name.split('_')[0]](name)
    assert model.pretrained_cfg.get('tag') == (name.partition('.')[2] or None)
    ours = {'every command': build_eval_transform(model)}
    size = model.pretrained_cfg['input_size'][1:]
    for photo in photos:
        want = official(photo)
        assert tuple(want.shape[1:]) == tuple(size), (photo.size, want.shape)
        for use, transform in ours.items():
            got = transform(photo)
            assert got.shape == want.shape and torch.equal(got, want), (use, photo.size)


def test_squash_differs_from_center_crop(photos):
    """The check above can tell the crop modes apart: on a non-square image they give other tensors."""
    squash = official_mambavision('mambavision_large2_512_21k')
    input_size, crop_pct, _ = OFFICIAL_MAMBAVISION['mambavision_large2_512_21k']
    center = create_transform(input_size=input_size, interpolation='bicubic', crop_pct=crop_pct, crop_mode='center',
                              is_training=False)
    assert math.floor(512 / crop_pct) > 512
    assert not torch.equal(squash(photos[0]), center(photos[0]))
