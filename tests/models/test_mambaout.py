"""MambaOut: timm's module layout, equal to the official model and to timm's, original checkpoints converted.

Golden fixtures (the official yuweihao/MambaOut code run on random weights, in the original release's key layout;
the original and timm 1.0.31 state_dict key lists of every variant) are read from ``../shared/fixtures/mambaout``;
original-layout checkpoints and key lists go through ``checkpoint_filter_fn`` as any release file does. timm's
own implementation is the second reference: same keys, and the same weights give the same outputs. Full-size
variants are only built on the meta device; everything that runs does so on small configurations at small
resolutions.
"""
import copy
import warnings

import pytest
import timm
import timm.models.mambaout as timm_mambaout
import torch
from safetensors.torch import load_file, save_file

import mambazoo
from helpers import (assert_every_parameter_has_a_gradient, fixture_names, fixture_path, images, meta_model,
                     read_fixture_json, rel_err, spy)
from mambazoo import CheckpointMismatchError
from mambazoo.models import MambaOut
from mambazoo.models import mambaout as mo

ORIGINAL_VARIANTS = ['femto', 'kobe', 'tiny', 'small', 'base']
ORIGINAL_NAMES = [f'mambaout_{v}' for v in ORIGINAL_VARIANTS]
RW_NAMES = [f'mambaout_{v}' for v in ['small_rw', 'base_short_rw', 'base_tall_rw', 'base_wide_rw', 'base_plus_rw']]
ALL_NAMES = ORIGINAL_NAMES + RW_NAMES + ['test_mambaout']  # every MambaOut name timm 1.0.31 has
PUBLISHED_MPARAMS = {'femto': 7.3, 'kobe': 9.1, 'tiny': 26.5, 'small': 48.5, 'base': 84.8}
GOLDENS = ('golden_small_224', 'golden_convratio_160')

SMALL = dict(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32], num_classes=10)
# Small configurations of timm's MambaOut (same argument names as ours): the official block, the _rw options
# (norm-first downsampling, layer scale, 'norm_mlp' head, SiLU, a conv wider than the block), a tall-style block.
TIMM_CONFIGS = {
    'official': dict(SMALL, kernel_size=5),
    'rw_wide': dict(SMALL, expansion_ratio=3.0, conv_ratio=1.5, stem_mid_norm=False, downsample='conv_nf',
                    ls_init_value=1e-6, act_layer='silu', head_fn='norm_mlp'),
    'rw_tall': dict(SMALL, expansion_ratio=2.5, conv_ratio=1.25, stem_mid_norm=False, downsample='conv_nf',
                    ls_init_value=1e-6, head_fn='norm_mlp'),
}
# The per-weight fields of a pretrained cfg that must be timm's.
CFG_FIELDS = ('hf_hub_id', 'num_classes', 'input_size', 'test_input_size', 'pool_size', 'crop_pct', 'test_crop_pct',
              'crop_mode', 'interpolation', 'mean', 'std', 'first_conv', 'classifier', 'license')

F32_TOL = 1e-5  # relative L2 error, float32
F64_TOL = 1e-7  # relative L2 error, float64 vs the official float64 run


# ------------------------------------------------------------------------------------------------- helpers

def key_shapes(key_list: dict) -> dict:
    return {k: tuple(shape) for k, shape, _ in key_list['keys']}


def model_key_shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def randomize(model, seed: int = 0):
    """Overwrite every weight (as the goldens do): matrices N(0, 1/fan_in); norm weights and layer scales
    1 + 0.1 N(0, 1), biases 0.1 N(0, 1), so that a misplaced bias, norm or layer scale changes the output.
    Needs no initialised values: works on a model built on the meta device and moved with ``to_empty``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=gen) / (t[0].numel() ** 0.5))
            else:
                module, _, kind = key.rpartition('.')
                scale_like = kind == 'gamma' or (kind == 'weight' and 'norm' in module.rsplit('.', 1)[-1])
                t.copy_((1.0 if scale_like else 0.0) + 0.1 * torch.randn(t.shape, generator=gen))
    return model


def small_model(seed: int = 0, **overrides) -> MambaOut:
    torch.manual_seed(seed)
    return randomize(MambaOut(**dict(SMALL, **overrides)), seed)


def timm_meta_model(name: str) -> torch.nn.Module:
    with torch.device('meta'):
        return timm.create_model(name)


@pytest.fixture(scope='module', params=GOLDENS)
def golden(request):
    """(name, json, tensors, original-layout state, float32 model with that state loaded through the filter)."""
    name = request.param
    meta = read_fixture_json('mambaout', f'{name}.json')
    tensors = load_file(str(fixture_path('mambaout', f'{name}.safetensors')))
    state = {k[len('param.'):]: v for k, v in tensors.items() if k.startswith('param.')}
    assert mo.detect_key_layout(state) == 'original'
    torch.manual_seed(0)
    model = MambaOut(**meta['kwargs'])
    model.load_state_dict(mo.checkpoint_filter_fn(state, model), strict=True)
    return name, meta, tensors, state, model.eval()


# ----------------------------------------------------------------------------- 1. official golden outputs

def test_golden_logits(golden):
    name, _, t, _, model = golden
    with torch.no_grad():
        err = rel_err(model(t['input']), t['logits'])
    assert err < F32_TOL, f'{name}: logits relative error {err:.2e}'


def test_golden_stages_and_features(golden):
    """stageI = the official stages[I] after downsample_layers[I] = our stages[I] (its downsample, then its blocks;
    the stem before stage 0), NHWC; features = the output norm (our head.norm) of the pooled last stage."""
    name, _, t, _, model = golden
    captured = {}
    hooks = [stage.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
             for i, stage in enumerate(model.stages)]
    try:
        with torch.no_grad():
            feats = model.forward_features(t['input'])
            pooled = model.head.norm(feats.mean((1, 2)))
    finally:
        for h in hooks:
            h.remove()
    errors = {f'stage{i}': rel_err(captured[i], t[f'stage{i}']) for i in range(4)}
    errors['features'] = rel_err(pooled, t['features'])
    bad = {k: f'{v:.2e}' for k, v in errors.items() if not v < F32_TOL}
    assert not bad, f'{name}: off: {bad}'


def test_golden_float64(golden):
    name, _, t, _, model = golden
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model64(t['input'].double())
    assert logits.dtype == torch.float64
    err = rel_err(logits, t['logits_f64'])
    assert err < F64_TOL, f'{name}: float64 logits relative error {err:.2e}'


def test_golden_intermediates_are_the_stages(golden):
    name, _, t, _, model = golden
    with torch.no_grad():
        final, inter = model.forward_intermediates(t['input'])
    assert len(inter) == 4
    for i, feat in enumerate(inter):
        err = rel_err(feat.permute(0, 2, 3, 1), t[f'stage{i}'])  # NCHW by default
        assert err < F32_TOL, f'{name}: intermediate {i} vs official stage{i}: {err:.2e}'
    assert rel_err(final, t['stage3']) < F32_TOL


def test_golden_release_file_loads_by_name(golden, tmp_path):
    """An original-layout .pth (weights under 'model', as the release files) given to create_model by path."""
    name, meta, t, state, _ = golden
    path = tmp_path / 'release.pth'
    torch.save({'model': state}, path)
    torch.manual_seed(1)
    model = mambazoo.create_model('mambaout_femto', checkpoint_path=path, **meta['kwargs']).eval()
    assert 'stem.conv1.weight' in model.state_dict()
    with torch.no_grad():
        assert rel_err(model(t['input']), t['logits']) < F32_TOL


def test_golden_saved_back_in_the_original_layout(golden):
    """convert_timm_to_original gives back the golden's own state dict, keys and tensors."""
    name, _, _, state, model = golden
    back = mo.convert_timm_to_original(model.state_dict())
    assert set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------- 2. the same model as timm's

@pytest.mark.parametrize('name', ALL_NAMES)
def test_state_dict_is_timms(name):
    """The issue's point: in one process, mambazoo.create_model(name) and timm.create_model(name) (timm's own
    class) have the same state_dict keys and shapes, and those of timm's key list."""
    ours, theirs = meta_model(name), timm_meta_model(name)
    assert type(ours) is MambaOut and type(theirs) is timm_mambaout.MambaOut
    assert model_key_shapes(ours) == model_key_shapes(theirs)
    listed = read_fixture_json('mambaout', f'keys_timm_{name}.json')
    assert model_key_shapes(ours) == key_shapes(listed)
    assert sum(p.numel() for p in ours.parameters()) == listed['num_params']
    assert list(ours.state_dict()) == list(theirs.state_dict())  # timm's order too


def test_femto_equals_timm_on_timm_weights(tmp_path):
    """timm's mambaout_femto with random weights, saved as a file (as on the hub) and loaded by name into ours."""
    reference = randomize(timm_meta_model('mambaout_femto').to_empty(device='cpu'), seed=5).eval()
    path = tmp_path / 'model.safetensors'
    save_file(reference.state_dict(), str(path))
    torch.manual_seed(1)
    ours = mambazoo.create_model('mambaout_femto', checkpoint_path=path).eval()
    x = images(2, 3, 64, 64)
    with torch.no_grad():
        want, got = reference(x), ours(x)
        assert rel_err(got, want) < F32_TOL, f'logits relative error {rel_err(got, want):.2e}'
        assert rel_err(ours.forward_features(x), reference.forward_features(x)) < F32_TOL
        for a, b in zip(ours.forward_intermediates(x, intermediates_only=True),
                        reference.forward_intermediates(x, intermediates_only=True)):
            assert rel_err(a, b) < F32_TOL
        assert rel_err(ours.forward_head(ours.forward_features(x), pre_logits=True),
                       reference.forward_head(reference.forward_features(x), pre_logits=True)) < F32_TOL


@pytest.mark.parametrize('config', sorted(TIMM_CONFIGS))
def test_small_configs_equal_timm(config):
    kwargs = TIMM_CONFIGS[config]
    torch.manual_seed(0)
    reference = randomize(timm_mambaout.MambaOut(**kwargs), seed=3).eval()
    ours = MambaOut(**kwargs).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        err = rel_err(ours(x), reference(x))
        pre = rel_err(ours.forward_head(ours.forward_features(x), pre_logits=True),
                      reference.forward_head(reference.forward_features(x), pre_logits=True))
    assert err < F32_TOL and pre < F32_TOL, f'{config}: relative error vs timm: logits {err:.2e}, pre-logits {pre:.2e}'


def test_test_mambaout_equals_timm():
    torch.manual_seed(0)
    reference = randomize(timm.create_model('test_mambaout'), seed=4).eval()
    ours = mambazoo.create_model('test_mambaout').eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = images(2, 3, 48, 80)
    with torch.no_grad():
        assert rel_err(ours(x), reference(x)) < F32_TOL


# --------------------------------------------------------------- 3. the original layout: converted both ways

@pytest.mark.parametrize('variant', ORIGINAL_VARIANTS)
def test_original_key_lists_through_the_filter(variant):
    """The release's key list, converted by checkpoint_filter_fn, is exactly our model's; and back again."""
    original = key_shapes(read_fixture_json('mambaout', f'keys_official_mambaout_{variant}.json'))
    model = meta_model(f'mambaout_{variant}')
    assert mo.detect_key_layout(original) == 'original'
    assert mo.checkpoint_filter_fn(original, model) == model_key_shapes(model)
    assert mo.convert_timm_to_original(model_key_shapes(model)) == original


@pytest.mark.parametrize('name', ALL_NAMES)
def test_round_trip_on_every_key_list(name):
    """timm -> original -> timm is the identity on every variant's key list (the _rw layer scales included),
    and original -> timm -> original on the release's lists."""
    timm_keys = key_shapes(read_fixture_json('mambaout', f'keys_timm_{name}.json'))
    original = mo.convert_timm_to_original(timm_keys)
    assert mo.detect_key_layout(timm_keys) == 'timm' and mo.detect_key_layout(original) == 'original'
    assert mo.convert_original_to_timm(original) == timm_keys
    assert mo.checkpoint_filter_fn(original, None) == timm_keys
    if name in ORIGINAL_NAMES:
        listed = key_shapes(read_fixture_json('mambaout', f'keys_official_{name}.json'))
        assert original == listed
        assert mo.convert_timm_to_original(mo.convert_original_to_timm(listed)) == listed


@pytest.mark.parametrize('variant', ORIGINAL_VARIANTS)
def test_param_counts(variant):
    n = sum(p.numel() for p in meta_model(f'mambaout_{variant}').parameters())
    assert n == read_fixture_json('mambaout', f'keys_official_mambaout_{variant}.json')['num_params']
    assert round(n / 1e6, 1) == PUBLISHED_MPARAMS[variant], f'{variant}: {n / 1e6:.3f}M'


def test_every_key_fixture_is_covered():
    assert fixture_names('mambaout', 'keys_official_mambaout_') == set(ORIGINAL_VARIANTS)
    assert fixture_names('mambaout', 'keys_timm_') == set(ALL_NAMES)


def test_filter_keeps_timm_checkpoints_and_unwraps_release_files():
    timm_state = {'stem.conv1.weight': 1, 'stages.1.downsample.conv.weight': 2, 'head.fc.bias': 3}
    assert mo.checkpoint_filter_fn(timm_state, None) == timm_state
    release = {'model': {'downsample_layers.0.conv1.weight': 1, 'stages.0.0.fc1.weight': 2, 'norm.weight': 3,
                         'head.fc1.weight': 4, 'head.norm.bias': 5, 'head.fc2.bias': 6}}
    assert mo.checkpoint_filter_fn(release, None) == {
        'stem.conv1.weight': 1, 'stages.0.blocks.0.fc1.weight': 2, 'head.norm.weight': 3,
        'head.pre_logits.fc.weight': 4, 'head.pre_logits.norm.bias': 5, 'head.fc.bias': 6}


def test_converter_errors_and_passthrough():
    official = {'downsample_layers.0.conv1.weight': 1, 'stages.0.0.fc1.weight': 2, 'norm.weight': 3,
                'head.fc2.bias': 4, 'extra.thing': 5}
    with pytest.raises(ValueError, match="'extra.thing'"):
        mo.convert_original_to_timm(official)
    loose = mo.convert_original_to_timm(official, strict=False)
    assert loose == {'stem.conv1.weight': 1, 'stages.0.blocks.0.fc1.weight': 2, 'head.norm.weight': 3,
                     'head.fc.bias': 4, 'extra.thing': 5}
    with pytest.raises(ValueError, match='stages.0.0.fc1.weight'):
        mo.convert_timm_to_original({'stages.0.0.fc1.weight': 1})  # already original: not a timm key
    with pytest.raises(ValueError, match='two keys'):  # a mix of both layouts
        mo.convert_timm_to_original({'stages.0.blocks.0.fc1.weight': 1, 'stages.0.0.fc1.weight': 2}, strict=False)
    assert mo.detect_key_layout({'patch_embed.conv.weight': 1}) is None
    assert mo.detect_key_layout({'stem.conv1.weight': 1, 'downsample_layers.1.conv.weight': 2}) is None


def test_load_checkpoint_converts_the_original_layout_and_rejects_another_variant():
    source = small_model(seed=2).eval()
    target = small_model(seed=3).eval()
    x = images(1, 3, 64, 64)
    original = mo.convert_timm_to_original(source.state_dict())
    with torch.no_grad():
        assert rel_err(target(x), source(x)) > 1e-3
        mambazoo.load_checkpoint(target, original)
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    other = small_model(depths=[1, 1, 3, 1])
    with pytest.raises(CheckpointMismatchError, match='stages.2.blocks.2'):
        mambazoo.load_checkpoint(other, original)


# ----------------------------------------------------------------------------------- 4. names and configs

@pytest.mark.parametrize('name', ALL_NAMES)
def test_names_ours_in_mambazoo_timms_in_timm(name):
    """timm owns mambaout_*: mambazoo.create_model builds ours, timm.create_model still builds timm's."""
    assert mambazoo.is_model(name)
    assert meta_model(name).pretrained_cfg['architecture'] == name
    assert timm.models.model_entrypoint(name).__module__ == 'timm.models.mambaout'  # not overwritten by ours


def test_list_models():
    assert mambazoo.list_models('mambaout*') == sorted(n for n in ALL_NAMES if n.startswith('mambaout'))
    assert mambazoo.list_models('test_mambaout') == ['test_mambaout']


def _timm_tags():
    tagged = timm.list_pretrained('mambaout*')
    assert len(tagged) == 12
    return tagged + ['test_mambaout']


@pytest.mark.parametrize('name_tag', _timm_tags())
def test_pretrained_cfg_per_tag_is_timms(name_tag):
    ours = mambazoo.get_pretrained_cfg(name_tag)
    theirs = timm.models.get_pretrained_cfg(name_tag).to_dict()
    diff = {f: (ours.get(f), theirs.get(f)) for f in CFG_FIELDS if ours.get(f) != theirs.get(f)}
    assert not diff, f'{name_tag}: (ours, timm) differ: {diff}'
    assert ours['architecture'] == name_tag.split('.')[0]


def test_default_tags_and_release_files():
    for name in ALL_NAMES:
        assert mambazoo.get_pretrained_cfg(name) == mambazoo.get_pretrained_cfg(
            f'{name}.{timm.models.get_pretrained_cfg(name).tag}' if name != 'test_mambaout' else name), name
    for name in ORIGINAL_NAMES:  # the release's file besides timm's hub copy
        cfg = mambazoo.get_pretrained_cfg(name)
        assert cfg['url'] == f'https://github.com/yuweihao/MambaOut/releases/download/model/{name}.pth'
        assert cfg['tag'] == 'in1k' and cfg['hf_hub_id'] == f'timm/{name}.in1k'
    assert not mambazoo.get_pretrained_cfg('test_mambaout').get('url')
    with pytest.raises(ValueError, match='sw_e150_in12k_ft_in1k'):
        mambazoo.get_pretrained_cfg('mambaout_base_plus_rw.in1k')


def test_tag_builds_with_its_cfg():
    with torch.device('meta'):
        in12k = mambazoo.create_model('mambaout_base_plus_rw.sw_e150_in12k')
        r384 = mambazoo.create_model('mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k')
    assert in12k.num_classes == 11821 and in12k.get_classifier().out_features == 11821
    assert r384.pretrained_cfg['input_size'] == (3, 384, 384) and r384.pretrained_cfg['crop_mode'] == 'squash'
    assert r384.pretrained_cfg['tag'] == 'sw_e150_r384_in12k_ft_in1k' and r384.num_classes == 1000


@pytest.mark.parametrize('name', ALL_NAMES)
def test_cfg_names_modules_of_the_model(name):
    model = meta_model(name)
    cfg = model.pretrained_cfg
    assert isinstance(model.get_submodule(cfg['first_conv']), torch.nn.Conv2d)
    classifier = model.get_submodule(cfg['classifier'])
    assert classifier is model.get_classifier()
    assert isinstance(classifier, torch.nn.Linear) and classifier.out_features == cfg['num_classes'] == 1000


# ------------------------------------------------------------------------------------- 5. timm model surface

@pytest.mark.parametrize('config', ['official', 'rw_wide'])
def test_forward_features_and_head(config):
    model = small_model(**TIMM_CONFIGS[config]).eval()
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2, 3, 32)  # channels-last, as timm
        assert model.output_fmt == 'NHWC' and model.num_features == 32 and model.head_hidden_size == 128
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 128)
        logits = model(x)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(logits, model.get_classifier()(pre))


@pytest.mark.parametrize('config', ['official', 'rw_wide'])
def test_reset_classifier(config):
    model = small_model(**TIMM_CONFIGS[config]).eval()
    x = images(2, 3, 64, 64)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        assert model(x).shape == (2, model.head_hidden_size) == (2, 128)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        model.reset_classifier(0, global_pool='', reset_other=True)
        assert model.global_pool == '' and model(x).shape == (2, 2, 2, 32) and model.head_hidden_size == 32
        torch.testing.assert_close(model(x), model.forward_features(x))
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, global_pool='max')


def test_reset_classifier_keeps_device_dtype_and_mode():
    model = small_model().double().eval()
    model.reset_classifier(4)
    fc = model.get_classifier()
    assert fc.weight.dtype == torch.float64 and not fc.training


def test_forward_intermediates():
    model = small_model().eval()
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 4
        for i, feat in enumerate(inter):
            stride = 4 * 2 ** i
            assert feat.shape == (2, SMALL['dims'][i], 64 // stride, 96 // stride), f'stage {i}'
            assert feat.is_contiguous()
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        _, some = model.forward_intermediates(x, indices=[1, 3])
        torch.testing.assert_close(some[0], inter[1], rtol=0, atol=0)
        torch.testing.assert_close(some[1], inter[3], rtol=0, atol=0)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last2] == [24, 32]
        nhwc = model.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        for a, b in zip(nhwc, inter):
            torch.testing.assert_close(a, b.permute(0, 2, 3, 1), rtol=0, atol=0)
        calls = []
        hooks = [model.stages[i].register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i in range(4)]
        try:
            early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        finally:
            for h in hooks:
                h.remove()
        assert calls == [0, 1], f'stop_early ran stages {calls}'
        torch.testing.assert_close(early[0], inter[1], rtol=0, atol=0)
        with pytest.raises(ValueError, match='output_fmt'):
            model.forward_intermediates(x, output_fmt='NLC')


def test_features_only():
    kwargs = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32])
    torch.manual_seed(0)
    feat_model = mambazoo.create_model('mambaout_femto', features_only=True, out_indices=(1, 2), **kwargs).eval()
    torch.manual_seed(0)
    full = mambazoo.create_model('mambaout_femto', **kwargs).eval()
    assert feat_model.feature_info.channels() == [16, 24]
    assert feat_model.feature_info.reduction() == [8, 16]
    assert len(feat_model.model.stages) == 3  # pruned after the last requested stage
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        feats = feat_model(x)
        want = full.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
    assert isinstance(feats, list) and len(feats) == 2
    for f, w, red, ch in zip(feats, want, (8, 16), (16, 24)):
        assert f.shape == (2, ch, 64 // red, 96 // red)  # NCHW
        torch.testing.assert_close(f, w)


@pytest.mark.parametrize('config', ['official', 'rw_wide'])
def test_prune_intermediate_layers(config):
    model = small_model(**TIMM_CONFIGS[config]).eval()
    x = images(1, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.stages) == 2 and model.num_features == 16 and model.num_classes == 0
        got = model.forward_intermediates(x, intermediates_only=True)
        assert len(got) == 2
        for a, b in zip(got, want[:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert model(x).shape == (1, 8, 8, 16)  # head gone: the unpooled last kept map


def test_grad_checkpointing_same_output_and_grads(monkeypatch):
    model = small_model(ls_init_value=0.5).train()
    x = images(2, 3, 32, 32)
    weights = images(2, 10, seed=7)

    def run():
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out * weights).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    out0, gx0, g0 = run()
    calls = spy(monkeypatch, mo, 'checkpoint_seq')
    model.set_grad_checkpointing(True)
    out1, gx1, g1 = run()
    assert len(calls) == 4, 'set_grad_checkpointing(True) did not checkpoint every stage'
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(gx1, gx0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=lambda m, n=n: f'{n}: {m}')
    model.set_grad_checkpointing(False)
    calls.clear()
    with torch.no_grad():
        model(x)
    assert not calls


@pytest.mark.parametrize('coarse', [False, True], ids=['fine', 'coarse'])
def test_group_matcher_matches_timm(coarse):
    """Parameter groups (layer decay) as timm's model forms them."""
    kwargs = dict(SMALL, depths=[2, 1, 3, 2])
    reference = timm_mambaout.MambaOut(**kwargs)
    model = MambaOut(**kwargs)
    want = timm.models.group_parameters(reference, reference.group_matcher(coarse))
    got = timm.models.group_parameters(model, model.group_matcher(coarse))
    assert {g: sorted(n) for g, n in got.items()} == {g: sorted(n) for g, n in want.items()}
    assert len(want) == (6 if coarse else 2 + sum(kwargs['depths']))


def test_no_weight_decay_patterns():
    import fnmatch
    model = small_model(ls_init_value=1e-6)
    patterns = model.no_weight_decay()
    skipped = {n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)}
    assert {'head.norm.weight', 'stages.0.blocks.0.ls.gamma', 'stages.0.blocks.0.norm.bias'} <= skipped
    assert not any(n.endswith(('fc1.weight', 'fc2.weight', 'conv.weight', 'conv1.weight')) for n in skipped)


# ------------------------------------------------------------------------------------------ 6. input sizes

@pytest.mark.parametrize('hw', [(64, 96), (50, 70), (33, 17), (224, 160)], ids=lambda hw: f'{hw[0]}x{hw[1]}')
def test_any_resolution(hw):
    model = small_model().eval()
    with torch.no_grad():
        out = model(images(2, 3, *hw))
        inter = model.forward_intermediates(images(1, 3, *hw), intermediates_only=True)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    size = list(hw)
    for i, feat in enumerate(inter):
        for _ in range(2 if i == 0 else 1):  # the stem halves twice, each later stage once (ceil: padding 1)
            size = [(s + 1) // 2 for s in size]
        assert list(feat.shape[-2:]) == size, f'stage {i}'


def test_batch_items_independent():
    model = small_model().eval()
    x = images(3, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 1, 64, 64), (2, 4, 64, 64), (3, 64, 64), (1, 2, 3, 64, 64)],
                         ids=['1ch', '4ch', '3d', '5d'])
def test_bad_inputs_raise(shape):
    model = small_model().eval()
    x = torch.zeros(shape)
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError) as info:
            call(x)
        msg = str(info.value)
        assert '(B, 3, H, W)' in msg and str(tuple(shape)) in msg, msg


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='conv_ratio'):
        MambaOut(**SMALL, conv_ratio=3.0)  # more conv channels than the hidden width
    with pytest.raises(ValueError, match='one entry per stage'):
        MambaOut(depths=[1, 1], dims=[8, 16, 24])
    with pytest.raises(ValueError, match="'conv' or 'conv_nf'"):
        MambaOut(**SMALL, downsample='pool')
    with pytest.raises(ValueError, match='head_fn'):
        MambaOut(**SMALL, head_fn='linear')
    with pytest.raises(ValueError, match='head_fn'):
        MambaOut(**SMALL, head_fn=torch.nn.Linear)  # a custom head has no place in timm's layout
    with pytest.raises(ValueError, match='global_pool'):
        MambaOut(**SMALL, global_pool='max')
    with pytest.warns(UserWarning, match='layer_scale_init'):
        MambaOut(**SMALL, layer_scale_init=1.0)


# ------------------------------------------------------------------------------------------- 7. gradients

@pytest.mark.parametrize('config', ['official', 'rw_wide'])
def test_gradients_reach_every_parameter(config):
    torch.manual_seed(0)
    model = randomize(MambaOut(**TIMM_CONFIGS[config])).train()
    out = model(images(2, 3, 32, 32))
    (out * images(*out.shape, seed=3)).sum().backward()
    if config == 'rw_wide':
        assert any(n.endswith('ls.gamma') for n, _ in model.named_parameters())
    assert_every_parameter_has_a_gradient(model)


# ------------------------------------------------------------------ 8. official constructor arguments

def test_official_constructor_arguments():
    """The official arguments: downsample_layers given as classes (the first one becomes the stem), the official
    head class as head_fn, int depths/dims."""
    torch.manual_seed(0)
    model = MambaOut(in_chans=1, num_classes=7, depths=[1, 1], dims=[8, 16],
                     downsample_layers=mo.DOWNSAMPLE_LAYERS_FOUR_STAGES, head_fn=mo.MlpHead, head_dropout=0.0).eval()
    assert set(model.state_dict()) >= {'stem.norm1.weight', 'stages.1.downsample.conv.weight',
                                       'stages.1.blocks.0.fc2.weight', 'head.norm.weight', 'head.fc.weight'}
    with torch.no_grad():
        out = model(images(2, 1, 40, 24))
        pre = model.forward_head(model.forward_features(images(2, 1, 40, 24)), pre_logits=True)
    assert out.shape == (2, 7) and pre.shape == (2, 64)
    torch.testing.assert_close(out, model.head.fc(pre))
    one_stage = MambaOut(depths=2, dims=8, num_classes=3)
    assert one_stage(images(1, 3, 16, 16)).shape == (1, 3) and len(one_stage.stages[0].blocks) == 2


def test_one_channel_no_classifier_by_name():
    torch.manual_seed(0)
    model = mambazoo.create_model('mambaout_femto', in_chans=1, num_classes=0, depths=[1, 1, 1, 1],
                                  dims=[8, 16, 24, 32]).eval()
    assert model.stem.conv1.weight.shape == (4, 1, 3, 3)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    with torch.no_grad():
        out = model(images(2, 1, 64, 64))
    assert out.shape == (2, model.head_hidden_size) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r'\(B, 1, H, W\)'):
        model(images(2, 3, 64, 64))


def test_drop_rate_is_head_dropout():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model = MambaOut(**SMALL, drop_rate=0.3)
    assert model.head.head_dropout.p == 0.3 and model.drop_rate == 0.3
    with pytest.raises(ValueError, match='drop_rate'):
        MambaOut(**SMALL, drop_rate=0.3, head_dropout=0.1)
