"""The model contract of the registry and the builder: explicit None reaches the model, the official names work in
both registries (with the official package's ``model_path``), pretrained tags resolve as timm's, ``features_only``
goes through timm's own wrapper for every family, and ``create_any_model`` lives with the models.

Models are small configurations of each family (built in well under a second). The network is never used: the
offline fixture sets HF_HUB_OFFLINE and replaces both download functions by guards that refuse.
"""
import subprocess
import sys

import pytest
import timm
import torch
from timm.models._features import FeatureGetterNet

import mambazoo
from mambazoo import CheckpointError
from mambazoo.models import _builder
from mambazoo.models._builder import create_any_model, resolve_pretrained_cfg

SMALL = {
    'mambavision_tiny': dict(dim=8, in_dim=4, depths=[1, 1, 2, 2], num_heads=[1, 1, 2, 2]),
    'vmamba_tiny': dict(dims=8, depths=[1, 1, 1, 1]),
    'vim_tiny': dict(embed_dim=32, depth=4, img_size=64),
    'hybrid_tiny': dict(embed_dim=32, num_heads=2, img_size=64),
    'mambaout_femto': dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
}
SMALL_MV = dict(SMALL['mambavision_tiny'], num_classes=10)


def images(batch=2, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturbed_state(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def offline(no_downloads):
    """No test of this file may reach the network or the user's caches (tests/conftest.py)."""
    return no_downloads


# ------------------------------------------------------------------------------------------ 1. explicit None

@pytest.mark.parametrize('name', ['mambavision_tiny', 'mambavision_base'])
def test_explicit_none_reaches_the_model(name):
    """layer_scale=None switches MambaVision's layer scale off, also where the variant's default is 1e-5."""
    def gammas(model):
        return [k for k in model.state_dict() if 'gamma' in k]
    assert gammas(mambazoo.create_model(name, layer_scale=1e-5, **SMALL_MV))
    assert not gammas(mambazoo.create_model(name, layer_scale=None, **SMALL_MV))
    assert bool(gammas(mambazoo.create_model(name, **SMALL_MV))) == (name == 'mambavision_base')


def test_none_is_passed_on_as_given(monkeypatch):
    seen = {}

    def entrypoint(pretrained=False, **kwargs):
        seen.update(kwargs)
        return torch.nn.Identity()
    monkeypatch.setitem(_builder._entrypoints, 'mambavision_tiny', entrypoint)
    mambazoo.create_model('mambavision_tiny', layer_scale=None, drop_path_rate=None)
    assert seen['layer_scale'] is None and seen['drop_path_rate'] is None


# ------------------------------------------------------------------------------------------ 2. official names

def test_official_one_liner_loads_model_path(tmp_path):
    """The official package's ``create_model('mamba_vision_T', pretrained=True, model_path=...)``: the file is
    loaded (nothing is looked up or downloaded), through our create_model and through timm's."""
    torch.manual_seed(0)
    source = mambazoo.create_model('mamba_vision_T', **SMALL_MV)
    state = perturbed_state(source)
    path = tmp_path / 'mambavision_tiny_1k.pth.tar'
    torch.save({'state_dict': state}, path)
    for create in (mambazoo.create_model, timm.create_model):
        model = create('mamba_vision_T', pretrained=True, model_path=str(path), **SMALL_MV)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), (create.__module__, k)
        assert model.pretrained_cfg['architecture'] == 'mambavision_tiny'
    # Without pretrained=True the official entrypoints ignore model_path.
    torch.manual_seed(0)
    fresh = mambazoo.create_model('mamba_vision_T', model_path=str(path), **SMALL_MV)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_official_model_path_missing_offline_names_where_to_put_the_weights(tmp_path, offline):
    with pytest.raises(CheckpointError, match='nvidia/MambaVision-T-1K'):
        mambazoo.create_model('mamba_vision_T', pretrained=True, model_path=str(tmp_path / 'absent.pth.tar'),
                              **SMALL_MV)


def test_official_names_are_registered_in_timm():
    model = timm.create_model('mamba_vision_T', **SMALL_MV)
    assert isinstance(model, mambazoo.models.MambaVision)
    assert model.pretrained_cfg['architecture'] == 'mambavision_tiny'
    assert 'mamba_vision_T' in timm.list_models('mamba_vision*')
    aliases = set(mambazoo.list_models(include_aliases=True)) - set(mambazoo.list_models())
    assert {'vmamba_tiny_s1l8', 'vssm1_tiny_0230s',
            'vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2'} <= aliases
    for alias in aliases:
        assert timm.is_model(alias), alias
        module = timm.models.model_entrypoint(alias).__module__
        assert module.startswith('mambazoo.models.'), (alias, module)
        assert getattr(sys.modules[module], alias) is timm.models.model_entrypoint(alias)  # `import *` still works


def test_timms_own_names_are_never_overwritten():
    for name in timm.list_models('mambaout*'):
        assert timm.models.model_entrypoint(name).__module__ == 'timm.models.mambaout', name
    assert mambazoo.create_model('mambaout_femto', **SMALL['mambaout_femto']).__module__.startswith('mambazoo')


# ------------------------------------------------------------------------------------------ 3. pretrained tags

def test_tag_resolves_to_its_cfg():
    model = mambazoo.create_model('mambavision_base_21k.in21k_ft_in1k', **SMALL_MV)
    assert model.pretrained_cfg['tag'] == 'in21k_ft_in1k'
    assert model.pretrained_cfg['hf_hub_id'] == 'nvidia/MambaVision-B-21K'
    untagged = mambazoo.create_model('mambavision_base_21k', **SMALL_MV)
    assert untagged.pretrained_cfg == model.pretrained_cfg  # the default tag: the first with weights
    alias = mambazoo.create_model('mamba_vision_T.in1k', **SMALL_MV)
    assert (alias.pretrained_cfg['architecture'], alias.pretrained_cfg['tag']) == ('mambavision_tiny', 'in1k')
    via_timm = timm.create_model('mambavision_tiny.in1k', **SMALL_MV)
    assert via_timm.pretrained_cfg == alias.pretrained_cfg


@pytest.mark.parametrize('create', [mambazoo.create_model, timm.create_model])
def test_unknown_tag_is_an_error_naming_the_known_ones(create):
    with pytest.raises(ValueError, match=r"'in22k'.*mambavision_tiny.*in1k"):
        create('mambavision_tiny.in22k', **SMALL_MV)


def test_get_pretrained_cfg_honours_tags():
    cfg = mambazoo.get_pretrained_cfg('vmamba_tiny_s2l5.in1k')
    assert cfg['tag'] == 'in1k' and cfg['url'].endswith('/vssm_tiny_0230_ckpt_epoch_262.pth')
    assert mambazoo.get_pretrained_cfg('vmamba_tiny_s2l5') == cfg
    assert mambazoo.get_pretrained_cfg('vssm1_tiny_0230s.in1k')['architecture'] == 'vmamba_tiny'
    assert mambazoo.get_pretrained_cfg('hybrid_tiny')['num_classes'] == 10  # untagged cfg (no weights)
    with pytest.raises(ValueError, match='in1k'):
        mambazoo.get_pretrained_cfg('vim_tiny.in21k')
    with pytest.raises(ValueError, match='no pretrained tags'):
        mambazoo.get_pretrained_cfg('hybrid_tiny.in1k')
    # timm's registry has our tags as well (for the names it got from us)
    assert timm.models.get_pretrained_cfg('vim_small_stride8.in1k').hf_hub_filename == 'vim_s_midclstok_ft_81p6acc.pth'


def test_tag_mechanism_on_any_family_dict():
    """Plain ``{name.tag: cfg}`` dicts, the input of timm's generate_default_cfgs, as any family may write them."""
    cfgs = {
        'fam_a.untrained': dict(crop_pct=0.5),
        'fam_a.second': dict(url='https://example.org/a2.pth', crop_pct=0.9),
        'fam_a.third': dict(hf_hub_id='timm/', crop_pct=0.95),
        'fam_b': dict(hf_hub_id='org/b', hf_hub_filename='b.pth', tag='in1k'),  # the tag named inside the cfg
    }
    default = resolve_pretrained_cfg('fam_a', cfgs)
    assert (default['tag'], default['crop_pct']) == ('second', 0.9)  # the first tag with weights
    assert resolve_pretrained_cfg('fam_a', cfgs, 'untrained')['crop_pct'] == 0.5
    assert resolve_pretrained_cfg('fam_a', cfgs, 'third')['hf_hub_id'] == 'timm/fam_a.third'  # timm's shorthand
    assert resolve_pretrained_cfg('fam_b', cfgs)['tag'] == 'in1k'
    assert resolve_pretrained_cfg('fam_b', cfgs, 'in1k')['hf_hub_id'] == 'org/b'
    with pytest.raises(ValueError, match="'fourth' for fam_a") as info:
        resolve_pretrained_cfg('fam_a', cfgs, 'fourth')
    assert all(tag in str(info.value) for tag in ('untrained', 'second', 'third'))
    overlay = resolve_pretrained_cfg('fam_a', cfgs, 'second', {'file': '/tmp/x.pth'})
    assert overlay['file'] == '/tmp/x.pth' and overlay['crop_pct'] == 0.9
    explicit = resolve_pretrained_cfg('fam_a', cfgs, dict(crop_pct=0.7))
    assert explicit['crop_pct'] == 0.7 and explicit['architecture'] == 'fam_a'


def test_mambavision_512_models_squash():
    """The official cfgs of the 512 px models: crop_pct 0.93 with a 'squash' crop."""
    for name in ('mambavision_large2_512_21k', 'mambavision_large3_512_21k'):
        cfg = mambazoo.get_pretrained_cfg(name)
        assert (cfg['input_size'], cfg['crop_pct'], cfg['crop_mode']) == ((3, 512, 512), 0.93, 'squash'), name


# ------------------------------------------------------------------------------------------ 7. features_only

@pytest.mark.parametrize('name', sorted(SMALL))
def test_features_only_is_timms_wrapper_with_the_same_maps(name):
    torch.manual_seed(0)
    model = mambazoo.create_model(name, **SMALL[name]).eval()
    torch.manual_seed(0)
    ours = mambazoo.create_model(name, features_only=True, **SMALL[name]).eval()
    assert isinstance(ours, FeatureGetterNet)
    assert ours.pretrained_cfg is ours.default_cfg and ours.pretrained_cfg['architecture'] == name
    assert 'num_classes' not in ours.pretrained_cfg  # timm's pretrained_cfg_for_features
    x = images()
    with torch.no_grad():
        maps = ours(x)
        wanted = model.forward_intermediates(x, indices=ours.feature_info.out_indices, intermediates_only=True)
    assert [m.shape[1] for m in maps] == ours.feature_info.channels()
    assert [x.shape[-1] // m.shape[-1] for m in maps] == ours.feature_info.reduction()
    for got, want in zip(maps, wanted):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if name != 'mambaout_femto':  # timm owns that name
        torch.manual_seed(0)
        theirs = timm.create_model(name, features_only=True, **SMALL[name]).eval()
        assert isinstance(theirs, FeatureGetterNet) and theirs.default_cfg == ours.default_cfg
        assert theirs.feature_info.channels() == ours.feature_info.channels()
        assert theirs.feature_info.reduction() == ours.feature_info.reduction()
        with torch.no_grad():
            for a, b in zip(theirs(x), maps):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('name', ['hybrid_tiny', 'vim_tiny', 'mambavision_tiny', 'vmamba_tiny'])
def test_features_only_takes_timms_feature_arguments(name):
    """feature_cls, out_indices, feature_cfg and output_fmt as timm's build_model_with_cfg takes them."""
    feats = mambazoo.create_model(name, features_only=True, feature_cls='getter', out_indices=(1, 2),
                                  feature_cfg=dict(output_fmt='NHWC'), **SMALL[name]).eval()
    assert list(feats.feature_info.out_indices) == [1, 2]
    with torch.no_grad():
        maps = feats(images())
    assert [m.shape[-1] for m in maps] == feats.feature_info.channels()  # NHWC: channels last
    with pytest.raises(AssertionError, match='Unknown feature class'):
        mambazoo.create_model(name, features_only=True, feature_cls='no_such_class', **SMALL[name])


def test_isotropic_default_is_the_last_three_blocks():
    feats = timm.create_model('vim_tiny', features_only=True, **SMALL['vim_tiny'])
    assert list(feats.feature_info.out_indices) == [1, 2, 3]


def test_features_only_loads_weights_before_wrapping(tmp_path):
    torch.manual_seed(0)
    state = perturbed_state(mambazoo.create_model('hybrid_tiny', **SMALL['hybrid_tiny']))
    path = tmp_path / 'hybrid.pth'
    torch.save({'model': state}, path)
    feats = mambazoo.create_model('hybrid_tiny', features_only=True, checkpoint_path=path, **SMALL['hybrid_tiny'])
    for k, v in feats.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_vmamba_feature_norm_is_the_official_detection_backbone(tmp_path):
    """feature_cfg=dict(norm=True): each map through its own outnorm{i} (the official Backbone_VSSM layout),
    into which the backbone part of a detection checkpoint loads."""
    from mambazoo.models.vmamba import VSSMBackbone
    some = mambazoo.create_model('vmamba_tiny', features_only=True, feature_cfg=dict(norm=True), out_indices=(1, 2),
                                 **SMALL['vmamba_tiny'])
    assert isinstance(some.model, VSSMBackbone)
    assert {k.split('.')[0] for k in some.model.state_dict() if k.startswith('outnorm')} == {'outnorm1', 'outnorm2'}

    torch.manual_seed(0)
    plain = mambazoo.create_model('vmamba_tiny', **SMALL['vmamba_tiny']).eval()
    trunk = {k: v for k, v in perturbed_state(plain).items() if not k.startswith('classifier.')}
    outnorms = {f'outnorm{i}.{p}': torch.rand(8 * 2 ** i) + 0.5 for i in range(4) for p in ('weight', 'bias')}
    path = tmp_path / 'mask_rcnn_vssm_fpn_coco_tiny_epoch_12.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in {**trunk, **outnorms}.items()},
                'meta': {'epoch': 12}}, path)
    loaded = mambazoo.create_model('vmamba_tiny', features_only=True, feature_norm=True, checkpoint_path=path,
                                   **SMALL['vmamba_tiny']).eval()
    plain.load_state_dict({**plain.state_dict(), **trunk})
    x = images()
    with torch.no_grad():
        maps = loaded(x)
        raw = plain.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == 4
    for i, (got, r) in enumerate(zip(maps, raw)):
        ln = torch.nn.functional.layer_norm(r.permute(0, 2, 3, 1), r.shape[1:2], outnorms[f'outnorm{i}.weight'],
                                            outnorms[f'outnorm{i}.bias'], 1e-5).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, ln)


# ------------------------------------------------------------------------------------------ 8. create_any_model

def test_create_any_model_builds_ours_or_timms():
    assert isinstance(create_any_model('mambavision_tiny', **SMALL_MV), mambazoo.models.MambaVision)
    vit = create_any_model('test_vit', img_size=64)
    assert vit.patch_embed.img_size == (64, 64)
    assert create_any_model('hybrid_tiny', img_size=32, embed_dim=32, num_heads=2).patch_embed.img_size == (32, 32)
    with pytest.raises(ValueError, match='neither'):
        create_any_model('no_such_model')
    meta = create_any_model('mambavision_tiny', device='meta', **SMALL_MV)
    assert next(meta.parameters()).is_meta


def test_models_do_not_import_analysis():
    code = ('import sys, mambazoo.models; from mambazoo.models import create_any_model; '
            'assert not [m for m in sys.modules if m.startswith("mambazoo.analysis")], "analysis imported"; '
            'import mambazoo.analysis.benchmark as b; assert b.create_any_model is create_any_model')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=300)
