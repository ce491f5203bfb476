"""MambaOut: equal to the official model and to timm's, both key layouts, and a complete timm model.

Golden fixtures (the official yuweihao/MambaOut code run on random weights; the official and timm 1.0.31 state_dict
key lists of every variant) are read from ``../shared/fixtures/mambaout``. timm's own implementation is the second
reference: the same weights must give the same outputs in timm's model and in ours. Full-size variants are only
built on the meta device; everything that runs does so on small configurations at small resolutions.
"""
import copy
import functools
import json
import warnings

import pytest
import timm
import timm.models.mambaout as timm_mambaout
import torch
from safetensors.torch import load_file, save_file

import mambazoo
from mambazoo import CheckpointMismatchError
from mambazoo.models import MambaOut
from mambazoo.models import mambaout as mo

ORIGINAL_VARIANTS = ['femto', 'kobe', 'tiny', 'small', 'base']
RW_VARIANTS = ['small_rw', 'base_short_rw', 'base_tall_rw', 'base_wide_rw', 'base_plus_rw']
TIMM_ONLY = [f'mambaout_{v}' for v in RW_VARIANTS] + ['test_mambaout']  # built in timm's key layout
ALL_NAMES = [f'mambaout_{v}' for v in ORIGINAL_VARIANTS] + TIMM_ONLY
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

F32_TOL = 1e-5  # relative L2 error, float32
F64_TOL = 1e-7  # relative L2 error, float64 vs the official float64 run


# ------------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope='module')
def fixtures(shared_fixtures):
    folder = shared_fixtures / 'mambaout'
    if not folder.is_dir():
        pytest.skip(f'MambaOut fixtures not found at {folder}')
    return folder


def read_json(folder, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        pytest.skip(f'fixture {path} is missing')
    with open(path) as f:
        return json.load(f)


def key_shapes(key_list: dict) -> dict:
    return {k: tuple(shape) for k, shape, _ in key_list['keys']}


def model_key_shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, f'shape {tuple(got.shape)} vs expected {tuple(want.shape)}'
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm()).item()


def images(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


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
                centre = 1.0 if scale_like else 0.0
                t.copy_(centre + 0.1 * torch.randn(t.shape, generator=gen))
    return model


def small_model(seed: int = 0, **overrides) -> MambaOut:
    torch.manual_seed(seed)
    return randomize(MambaOut(**dict(SMALL, **overrides)), seed)


@functools.lru_cache(maxsize=None)
def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """A full-size variant on the meta device (no memory, no init cost), cached across tests."""
    with torch.device('meta'):
        return mambazoo.create_model(name, **kwargs)


@pytest.fixture(scope='module', params=GOLDENS)
def golden(request, fixtures):
    """(name, tensors, official-layout state, float32 model with the golden weights loaded strictly, eval)."""
    name = request.param
    meta = read_json(fixtures, f'{name}.json')
    tensors = load_file(str(fixtures / f'{name}.safetensors'))
    state = {k[len('param.'):]: v for k, v in tensors.items() if k.startswith('param.')}
    torch.manual_seed(0)
    model = MambaOut(**meta['kwargs'])
    model.load_state_dict(state, strict=True)
    return name, meta, tensors, state, model.eval()


# ----------------------------------------------------------------------------- 1. official golden outputs

def test_golden_logits(golden):
    name, _, t, _, model = golden
    with torch.no_grad():
        err = rel_err(model(t['input']), t['logits'])
    assert err < F32_TOL, f'{name}: logits relative error {err:.2e}'


def test_golden_stages_and_features(golden):
    """stageI = output of stages[I] (forward hook, NHWC); features = output norm of the pooled last stage."""
    name, _, t, _, model = golden
    captured = {}
    hooks = [stage.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
             for i, stage in enumerate(model.stages)]
    try:
        with torch.no_grad():
            feats = model.forward_features(t['input'])
            pooled = model.norm(feats.mean((1, 2)))
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


def test_golden_in_timm_layout(golden):
    """The golden (official keys) loaded into a timm-layout model through load_checkpoint's automatic conversion."""
    name, meta, t, state, model = golden
    torch.manual_seed(1)
    timm_layout = MambaOut(**meta['kwargs'], key_layout='timm').eval()
    mambazoo.load_checkpoint(timm_layout, state)
    with torch.no_grad():
        got = timm_layout(t['input'])
        torch.testing.assert_close(got, model(t['input']), rtol=0, atol=0)
    assert rel_err(got, t['logits']) < F32_TOL


# ------------------------------------------------------------------------------- 2. equal to timm's model

def test_femto_equals_timm_on_timm_weights(tmp_path):
    """timm's mambaout_femto with random weights; its state dict saved as a file (timm layout, as on the hub) and
    loaded by name into our model, which converts it to the official layout."""
    with torch.device('meta'):  # skip timm's init of 7M parameters: randomize overwrites them all
        reference = timm.create_model('mambaout_femto')
    reference = randomize(reference.to_empty(device='cpu'), seed=5).eval()
    assert type(reference) is timm_mambaout.MambaOut
    path = tmp_path / 'model.safetensors'
    save_file(reference.state_dict(), str(path))
    torch.manual_seed(1)
    ours = mambazoo.create_model('mambaout_femto', checkpoint_path=path).eval()
    assert type(ours) is MambaOut and ours.key_layout == 'original'
    x = images(2, 3, 64, 64)
    with torch.no_grad():
        want, got = reference(x), ours(x)
        assert rel_err(got, want) < F32_TOL, f'logits relative error {rel_err(got, want):.2e}'
        # relative to each tensor's scale: our linear layers sum in another order (oneDNN, ops/linear.py)
        assert rel_err(ours.forward_features(x), reference.forward_features(x)) < F32_TOL
        for a, b in zip(ours.forward_intermediates(x, intermediates_only=True),
                        reference.forward_intermediates(x, intermediates_only=True)):
            assert rel_err(a, b) < F32_TOL
        assert rel_err(ours.forward_head(ours.forward_features(x), pre_logits=True),
                       reference.forward_head(reference.forward_features(x), pre_logits=True)) < F32_TOL


@pytest.mark.parametrize('key_layout', mo.KEY_LAYOUTS)
@pytest.mark.parametrize('config', sorted(TIMM_CONFIGS))
def test_small_configs_equal_timm(config, key_layout):
    kwargs = TIMM_CONFIGS[config]
    torch.manual_seed(0)
    reference = randomize(timm_mambaout.MambaOut(**kwargs), seed=3).eval()
    ours = MambaOut(**kwargs, key_layout=key_layout).eval()
    state = reference.state_dict()
    if key_layout == 'original':
        state = mo.convert_timm_to_original(state)
    ours.load_state_dict(state, strict=True)
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        err = rel_err(ours(x), reference(x))
    assert err < F32_TOL, f'{config}/{key_layout}: logits relative error vs timm {err:.2e}'


def test_test_mambaout_equals_timm():
    torch.manual_seed(0)
    reference = randomize(timm.create_model('test_mambaout'), seed=4).eval()
    ours = mambazoo.create_model('test_mambaout').eval()
    assert type(ours) is MambaOut and ours.key_layout == 'timm'
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = images(2, 3, 48, 80)
    with torch.no_grad():
        assert rel_err(ours(x), reference(x)) < F32_TOL


# ------------------------------------------------------------------------------- 3. key layouts and sizes

@pytest.mark.parametrize('variant', ORIGINAL_VARIANTS)
def test_converter_on_official_key_lists(variant, fixtures):
    official = key_shapes(read_json(fixtures, f'keys_official_mambaout_{variant}.json'))
    timm_keys = key_shapes(read_json(fixtures, f'keys_timm_mambaout_{variant}.json'))
    assert mo.convert_original_to_timm(official) == timm_keys
    assert mo.convert_timm_to_original(timm_keys) == official
    assert mo.detect_key_layout(official) == 'original' and mo.detect_key_layout(timm_keys) == 'timm'


@pytest.mark.parametrize('name', TIMM_ONLY)
def test_converter_round_trip_on_timm_only_key_lists(name, fixtures):
    timm_keys = key_shapes(read_json(fixtures, f'keys_timm_{name}.json'))
    original = mo.convert_timm_to_original(timm_keys)
    assert mo.detect_key_layout(original) == 'original'
    assert mo.convert_original_to_timm(original) == timm_keys
    # The official-layout build of the same configuration has exactly the converted keys.
    assert model_key_shapes(meta_model(name, key_layout='original')) == original


@pytest.mark.parametrize('variant', ORIGINAL_VARIANTS)
def test_official_variants_state_dict(variant, fixtures):
    official = read_json(fixtures, f'keys_official_mambaout_{variant}.json')
    model = meta_model(f'mambaout_{variant}')
    want, got = key_shapes(official), model_key_shapes(model)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f'{variant}: missing {missing[:10]}, unexpected {extra[:10]}'
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f'{variant}: shapes (ours, official) differ: {dict(list(wrong.items())[:10])}'
    assert sum(p.numel() for p in model.parameters()) == official['num_params']


@pytest.mark.parametrize('name', [f'mambaout_{v}' for v in ORIGINAL_VARIANTS] + TIMM_ONLY)
def test_timm_layout_state_dict(name, fixtures):
    """Every variant in timm's layout: the _rw ones by default, the official five with key_layout='timm'."""
    listed = read_json(fixtures, f'keys_timm_{name}.json')
    model = meta_model(name) if name in TIMM_ONLY else meta_model(name, key_layout='timm')
    assert model.key_layout == 'timm'
    assert model_key_shapes(model) == key_shapes(listed)
    assert sum(p.numel() for p in model.parameters()) == listed['num_params']


@pytest.mark.parametrize('variant', sorted(PUBLISHED_MPARAMS))
def test_published_param_counts(variant):
    n = sum(p.numel() for p in meta_model(f'mambaout_{variant}').parameters())
    assert round(n / 1e6, 1) == PUBLISHED_MPARAMS[variant], f'{variant}: {n / 1e6:.3f}M'


def test_every_key_fixture_is_covered(fixtures):
    found = {p.name for p in fixtures.glob('keys_*.json')}
    want = ({f'keys_official_mambaout_{v}.json' for v in ORIGINAL_VARIANTS}
            | {f'keys_timm_{n}.json' for n in ALL_NAMES})
    assert found == want


def test_converter_errors_and_passthrough():
    official = {'downsample_layers.0.conv1.weight': 1, 'stages.0.0.fc1.weight': 2, 'norm.weight': 3,
                'head.fc2.bias': 4, 'extra.thing': 5}
    with pytest.raises(ValueError, match="'extra.thing'"):
        mo.convert_original_to_timm(official)
    loose = mo.convert_original_to_timm(official, strict=False)
    assert loose == {'stem.conv1.weight': 1, 'stages.0.blocks.0.fc1.weight': 2, 'head.norm.weight': 3,
                     'head.fc.bias': 4, 'extra.thing': 5}
    with pytest.raises(ValueError, match='stages.0.0.fc1.weight'):
        mo.convert_timm_to_original({'stages.0.0.fc1.weight': 1})  # already official: not a timm key
    with pytest.raises(ValueError, match='two keys'):  # a mix of both layouts
        mo.convert_timm_to_original({'stages.0.blocks.0.fc1.weight': 1, 'stages.0.0.fc1.weight': 2}, strict=False)
    assert mo.detect_key_layout({'patch_embed.conv.weight': 1}) is None
    assert mo.detect_key_layout({'stem.conv1.weight': 1, 'downsample_layers.1.conv.weight': 2}) is None


def test_load_checkpoint_converts_timm_layout_and_rejects_another_variant():
    source = small_model(seed=2, key_layout='timm').eval()
    target = small_model(seed=3).eval()
    x = images(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(target(x), source(x)) > 1e-3
        mambazoo.load_checkpoint(target, source.state_dict())  # timm keys into the official layout
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    other = small_model(depths=[1, 1, 3, 1])
    with pytest.raises(CheckpointMismatchError, match='stages.2.2'):
        mambazoo.load_checkpoint(other, source.state_dict())


# ----------------------------------------------------------------------------------------------- 4. names

@pytest.mark.parametrize('name', ALL_NAMES)
def test_names_ours_in_mambazoo_timms_in_timm(name):
    """timm owns mambaout_*: mambazoo.create_model builds ours, timm.create_model still builds timm's."""
    assert mambazoo.is_model(name)
    assert type(meta_model(name)) is MambaOut
    assert meta_model(name).pretrained_cfg['architecture'] == name
    assert timm.models.is_model(name)
    assert timm.models.model_entrypoint(name).__module__ == 'timm.models.mambaout'  # not overwritten by ours


def test_timm_create_model_still_builds_timms_model():
    with torch.device('meta'):
        theirs = timm.create_model('mambaout_tiny')
        ours = mambazoo.create_model('mambaout_tiny')
    assert type(theirs) is timm_mambaout.MambaOut and type(ours) is MambaOut
    assert 'stem.conv1.weight' in theirs.state_dict() and 'downsample_layers.0.conv1.weight' in ours.state_dict()


def test_list_models_and_tags():
    assert mambazoo.list_models('mambaout*') == sorted(n for n in ALL_NAMES if n.startswith('mambaout'))
    assert 'test_mambaout' in mambazoo.list_models('test_mambaout')
    assert mambazoo.models.resolve_name('mambaout_femto.in1k') == 'mambaout_femto'  # timm's tagged names


@pytest.mark.parametrize('name', ALL_NAMES)
def test_pretrained_cfgs(name):
    model = meta_model(name)
    cfg = model.pretrained_cfg
    variant = name[len('mambaout_'):]
    if variant in ORIGINAL_VARIANTS:
        assert cfg['url'] == f'https://github.com/yuweihao/MambaOut/releases/download/model/{name}.pth'
        assert cfg['hf_hub_id'] == f'timm/{name}.in1k'
    elif name == 'test_mambaout':
        assert not cfg.get('hf_hub_id') and not cfg.get('url')
    else:
        assert cfg['hf_hub_id'] == f'timm/{name}.{timm.models.get_pretrained_cfg(name).tag}'
    if cfg.get('hf_hub_id'):
        assert cfg['hf_hub_filename'] == 'model.safetensors'
    assert isinstance(model.get_submodule(cfg['first_conv']), torch.nn.Conv2d)
    classifier = model.get_submodule(cfg['classifier'])
    assert classifier is model.get_classifier()
    assert isinstance(classifier, torch.nn.Linear) and classifier.out_features == cfg['num_classes'] == 1000


# ------------------------------------------------------------------------------------- 5. timm model surface

@pytest.mark.parametrize('key_layout', mo.KEY_LAYOUTS)
def test_forward_features_and_head(key_layout):
    model = small_model(key_layout=key_layout).eval()
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


def test_reset_classifier():
    model = small_model().eval()
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
        assert model(x).shape == (2, 2, 2, 32)
        torch.testing.assert_close(model(x), model.forward_features(x))
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, global_pool='max')


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


@pytest.mark.parametrize('key_layout', mo.KEY_LAYOUTS)
def test_features_only(key_layout):
    kwargs = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], key_layout=key_layout)
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


@pytest.mark.parametrize('key_layout', mo.KEY_LAYOUTS)
def test_prune_intermediate_layers(key_layout):
    model = small_model(key_layout=key_layout).eval()
    x = images(1, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.stages) == 2 and model.num_features == 16 and model.num_classes == 0
        if key_layout == 'original':
            assert len(model.downsample_layers) == 2
        got = model.forward_intermediates(x, intermediates_only=True)
        assert len(got) == 2
        for a, b in zip(got, want[:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert model(x).shape == (1, 8, 8, 16)  # head gone: the unpooled last kept map


@pytest.mark.parametrize('key_layout', mo.KEY_LAYOUTS)
def test_grad_checkpointing_same_output_and_grads(monkeypatch, key_layout):
    model = small_model(key_layout=key_layout, ls_init_value=0.5).train()
    x = images(2, 3, 32, 32)
    weights = images(2, 10, seed=7)

    def run():
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out * weights).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    out0, gx0, g0 = run()
    calls = []
    real = mo.checkpoint_seq
    monkeypatch.setattr(mo, 'checkpoint_seq', lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
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
    """Parameter groups (layer decay) as timm's model forms them, in both key layouts."""
    kwargs = dict(SMALL, depths=[2, 1, 3, 2])
    reference = timm_mambaout.MambaOut(**kwargs)
    want = timm.models.group_parameters(reference, reference.group_matcher(coarse))
    for key_layout in mo.KEY_LAYOUTS:
        model = MambaOut(**kwargs, key_layout=key_layout)
        got = timm.models.group_parameters(model, model.group_matcher(coarse))
        if key_layout == 'original':
            got = {g: sorted(mo.convert_original_to_timm(dict.fromkeys(names))) for g, names in got.items()}
        assert {g: sorted(n) for g, n in got.items()} == {g: sorted(n) for g, n in want.items()}, key_layout
    assert len(want) == (6 if coarse else 2 + sum(kwargs['depths']))


def test_no_weight_decay_patterns():
    import fnmatch
    model = small_model(ls_init_value=1e-6)
    patterns = model.no_weight_decay()
    skipped = {n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)}
    assert 'norm.weight' in skipped and 'stages.0.0.ls.gamma' in skipped and 'stages.0.0.norm.bias' in skipped
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
    with pytest.raises(ValueError, match='key_layout'):
        MambaOut(**SMALL, key_layout='hf')
    with pytest.raises(ValueError, match='conv_ratio'):
        MambaOut(**SMALL, conv_ratio=3.0)  # more conv channels than the hidden width
    with pytest.raises(ValueError, match='one entry per stage'):
        MambaOut(depths=[1, 1], dims=[8, 16, 24])
    with pytest.raises(ValueError, match="'conv' or 'conv_nf'"):
        MambaOut(**SMALL, downsample='pool')
    with pytest.raises(ValueError, match='custom head'):
        MambaOut(**SMALL, head_fn=torch.nn.Linear, key_layout='timm')
    with pytest.raises(ValueError, match='head_fn'):
        MambaOut(**SMALL, head_fn='linear')
    with pytest.warns(UserWarning, match='layer_scale_init'):
        MambaOut(**SMALL, layer_scale_init=1.0)


# ------------------------------------------------------------------------------------------- 7. gradients

@pytest.mark.parametrize('config', ['official', 'rw_wide'])
def test_gradients_reach_every_parameter(config):
    torch.manual_seed(0)
    model = randomize(MambaOut(**TIMM_CONFIGS[config])).train()
    x = images(2, 3, 32, 32)
    out = model(x)
    (out * images(*out.shape, seed=3)).sum().backward()
    params = dict(model.named_parameters())
    if config == 'rw_wide':
        assert any(n.endswith('ls.gamma') for n in params)
    none = [n for n, p in params.items() if p.grad is None]
    zero = [n for n, p in params.items() if p.grad is not None and not p.grad.abs().sum() > 0]
    nonfinite = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not none and not zero and not nonfinite, f'no grad {none}, zero {zero}, non-finite {nonfinite}'


# ------------------------------------------------------------------ 8. official constructor arguments

def test_official_constructor_arguments():
    """The official arguments: downsample_layers given as classes, a custom head_fn, int depths/dims."""
    torch.manual_seed(0)
    model = MambaOut(in_chans=1, num_classes=7, depths=[1, 1], dims=[8, 16],
                     downsample_layers=mo.DOWNSAMPLE_LAYERS_FOUR_STAGES, head_fn=torch.nn.Linear,
                     head_dropout=0.0).eval()
    assert set(model.state_dict()) >= {'downsample_layers.0.norm1.weight', 'downsample_layers.1.conv.weight',
                                       'stages.1.0.fc2.weight', 'norm.weight', 'head.weight'}
    with torch.no_grad():
        out = model(images(2, 1, 40, 24))
        pre = model.forward_head(model.forward_features(images(2, 1, 40, 24)), pre_logits=True)
    assert out.shape == (2, 7) and pre.shape == (2, 16)
    torch.testing.assert_close(out, model.head(pre))
    one_stage = MambaOut(depths=2, dims=8, num_classes=3)
    assert one_stage(images(1, 3, 16, 16)).shape == (1, 3) and len(one_stage.stages[0]) == 2


def test_one_channel_no_classifier_by_name():
    torch.manual_seed(0)
    model = mambazoo.create_model('mambaout_femto', in_chans=1, num_classes=0, depths=[1, 1, 1, 1],
                                  dims=[8, 16, 24, 32]).eval()
    assert model.downsample_layers[0].conv1.weight.shape == (4, 1, 3, 3)
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
