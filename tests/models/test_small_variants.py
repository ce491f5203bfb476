"""Our small variants (``*_nano``): registered like every other model, small enough to train on a laptop CPU at
32 px, with honest pretrained cfgs (no weights, the input size they train at). ``mambavision_nano`` is the README's
main job (configs/fashion_mnist_cpu.yaml)."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import mambazoo
from mambazoo.data.images import build_eval_transform

NANO = ['hybrid_nano', 'mambavision_nano', 'vim_nano', 'vmamba_nano']
MAX_PARAMS = 3_000_000


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_the_nano_names():
    assert mambazoo.list_models('*_nano') == NANO


@pytest.mark.parametrize('name', NANO)
def test_registered_here_and_in_timm(name):
    assert mambazoo.is_model(name) and name in mambazoo.list_models(name.split('_')[0] + '*')
    assert timm.is_model(name) and timm.list_models(name) == [name]
    with torch.device('meta'):
        ours, via_timm = mambazoo.create_model(name), timm.create_model(name)
    assert type(via_timm) is type(ours) and count(via_timm) == count(ours)
    assert via_timm.pretrained_cfg == ours.pretrained_cfg


@pytest.mark.parametrize('name', NANO)
def test_cfg_names_no_weights_and_the_training_size(name):
    cfg = mambazoo.get_pretrained_cfg(name)
    assert not any(cfg.get(key) for key in ('hf_hub_id', 'hf_hub_filename', 'url', 'file')), cfg
    assert cfg['input_size'] == (3, 32, 32)
    assert (cfg['crop_pct'], cfg['crop_mode'], cfg['interpolation']) == (1.0, 'center', 'bilinear')
    assert cfg.get('tag') is None and cfg['architecture'] == name
    with torch.device('meta'):
        model = mambazoo.create_model(name)
    assert model.pretrained_cfg == cfg and cfg['num_classes'] == model.num_classes
    assert count(model) < MAX_PARAMS
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    assert build_eval_transform(model)(photo).shape == (3, 32, 32)  # what every command feeds it


@pytest.mark.parametrize('name', NANO)
def test_pretrained_says_there_are_no_weights(name):
    with pytest.raises(mambazoo.CheckpointError, match=f'no official weights are known for {name}'):
        mambazoo.create_model(name, pretrained=True)
    with pytest.raises(mambazoo.CheckpointError, match='no official weights'):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize('in_chans', [3, 1])
@pytest.mark.parametrize('name', NANO)
def test_forward_and_one_training_step_at_32px(name, in_chans):
    torch.manual_seed(0)
    model = mambazoo.create_model(name, num_classes=10, in_chans=in_chans)
    print(f'{name}: {count(model):,} parameters with 10 classes')
    assert count(model) < MAX_PARAMS
    x = torch.randn(2, in_chans, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.eval()(x)
    assert logits.shape == (2, 10) and logits.isfinite().all()

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(x), torch.tensor([3, 7]))
    loss.backward()
    optimizer.step()
    assert loss.isfinite()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    cfg = model.pretrained_cfg
    assert {f"{cfg['first_conv']}.weight", f"{cfg['classifier']}.weight"} <= changed  # the gradient went all the way
    assert len(changed) > 0.9 * len(before), sorted(set(before) - changed)
