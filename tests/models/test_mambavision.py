"""MambaVision: numerically equal to the official model, checkpoint-compatible, and a complete timm model.

Golden fixtures (outputs of the official mambavision 1.2.0 code with random weights, and the official state_dict
key lists of every released variant) are read from ``../shared/fixtures/mambavision`` next to the project root;
tests that need them are skipped when that folder is missing (they fail under CI=true: see tests/helpers.py).
Everything else runs on a tiny configuration (stage widths 7/14/28/56) at small resolutions so the whole file stays
fast on a CPU.
"""
import pytest
import torch

import mambazoo
from helpers import (assert_alias_builds_same_architecture, assert_close_by_name, assert_every_parameter_has_a_gradient,
                     assert_official_keys, fixture_names, float64_logits, golden_fixture, images, meta_model,
                     model_factory, output_and_grads, read_fixture_json, record_outputs, rel_err, spy)
from mambazoo.models import mambavision as mv
from mambazoo.models.mambavision import MambaVision

# Official entrypoint names (mambavision 1.2.0) -> ours.
OFFICIAL_NAMES = {
    'mamba_vision_T': 'mambavision_tiny',
    'mamba_vision_T2': 'mambavision_tiny2',
    'mamba_vision_S': 'mambavision_small',
    'mamba_vision_B': 'mambavision_base',
    'mamba_vision_B_21k': 'mambavision_base_21k',
    'mamba_vision_L': 'mambavision_large',
    'mamba_vision_L_21k': 'mambavision_large_21k',
    'mamba_vision_L2': 'mambavision_large2',
    'mamba_vision_L2_512_21k': 'mambavision_large2_512_21k',
    'mamba_vision_L3_256_21k': 'mambavision_large3_256_21k',
    'mamba_vision_L3_512_21k': 'mambavision_large3_512_21k',
}
# Parameter counts (millions) as published in the paper / model cards.
PUBLISHED_MPARAMS = {
    'mamba_vision_T': 31.8, 'mamba_vision_T2': 35.1, 'mamba_vision_S': 50.1,
    'mamba_vision_B': 97.7, 'mamba_vision_L': 228.0, 'mamba_vision_L2': 241.6,
}
GOLDENS = ('golden_small_224', 'golden_layerscale_160')

# The configuration of golden_small_224 (T-style, odd widths), without stochastic depth: fast on CPU.
SMALL = dict(dim=7, in_dim=6, depths=[1, 1, 2, 2], num_heads=[1, 2, 4, 8], window_size=[8, 8, 14, 7],
             mlp_ratio=4, num_classes=10, drop_path_rate=0.)
# Overrides that shrink a registered variant (mambavision_tiny) to something fast.
TINY_OVERRIDES = dict(dim=8, in_dim=4, depths=[1, 1, 2, 2], num_heads=[1, 1, 2, 2], drop_path_rate=0.)

F32_TOL = 1e-5  # relative L2 error, float32 vs the official float32 run
F64_TOL = 1e-7  # relative L2 error, float64 vs the official float64 run


# ------------------------------------------------------------------------------------------------- helpers

small_model = model_factory(MambaVision, SMALL)
golden = golden_fixture('mambavision', MambaVision, GOLDENS)


# ----------------------------------------------------------------------------- 1. official golden outputs

def test_golden_logits(golden):
    name, _, t, model = golden
    with torch.no_grad():
        err = rel_err(model(t['input']), t['logits'])
    assert err < F32_TOL, f'{name}: logits relative error {err:.2e}'


def test_golden_stages(golden):
    """stageI of the official model is the output of levels[I] including its downsample."""
    name, _, t, model = golden
    errors = {}
    with torch.no_grad():
        x = model.patch_embed(t['input'])
        for i, level in enumerate(model.levels):
            x = level(x)
            errors[f'stage{i}'] = rel_err(x, t[f'stage{i}'])
    bad = {k: f'{v:.2e}' for k, v in errors.items() if not v < F32_TOL}
    assert not bad, f'{name}: stages off: {bad}'


def test_golden_features(golden):
    """The official pooled forward_features = our forward_head(forward_features(x), pre_logits=True)."""
    name, _, t, model = golden
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(t['input']), pre_logits=True)
    err = rel_err(feats, t['features'])
    assert err < F32_TOL, f'{name}: features relative error {err:.2e}'


def test_golden_float64(golden):
    name, _, t, model = golden
    err = rel_err(float64_logits(model, t['input']), t['logits_f64'])
    assert err < F64_TOL, f'{name}: float64 logits relative error {err:.2e}'


def test_golden_intermediates_are_stages_before_downsample(golden):
    """forward_intermediates gives each stage's map before its downsample: downsampling it gives the official stage."""
    name, _, t, model = golden
    with torch.no_grad():
        final, inter = model.forward_intermediates(t['input'])
        for i in range(3):
            err = rel_err(model.levels[i].downsample(inter[i]), t[f'stage{i}'])
            assert err < F32_TOL, f'{name}: downsample(intermediate {i}) vs official stage{i}: {err:.2e}'
        err = rel_err(inter[3], t['stage3'])
        assert err < F32_TOL, f'{name}: intermediate 3 vs official stage3: {err:.2e}'
        err = rel_err(model.forward_head(final, pre_logits=True), t['features'])
        assert err < F32_TOL, f'{name}: pooled final output of forward_intermediates vs features: {err:.2e}'


# ------------------------------------------------------------------ 2. official keys, shapes and sizes

@pytest.mark.parametrize('variant', sorted(OFFICIAL_NAMES))
def test_official_state_dict_keys_and_shapes(variant):
    official = read_fixture_json('mambavision', f'keys_{variant}.json')
    assert official['variant'] == variant
    assert_official_keys(meta_model(variant), official, variant)


@pytest.mark.parametrize('variant', sorted(OFFICIAL_NAMES))
def test_official_num_params(variant):
    official = read_fixture_json('mambavision', f'keys_{variant}.json')
    n = sum(p.numel() for p in meta_model(variant).parameters())
    assert n == official['num_params'], f'{variant}: {n} parameters, official {official["num_params"]}'


@pytest.mark.parametrize('variant', sorted(PUBLISHED_MPARAMS))
def test_published_param_counts(variant):
    n = read_fixture_json('mambavision', f'keys_{variant}.json')['num_params']
    assert abs(n / 1e6 - PUBLISHED_MPARAMS[variant]) <= 0.05 + 1e-9, \
        f'{variant}: {n / 1e6:.3f}M parameters, published {PUBLISHED_MPARAMS[variant]}M'
    ours = sum(p.numel() for p in meta_model(variant).parameters())
    assert round(ours / 1e6, 1) == PUBLISHED_MPARAMS[variant]


def test_every_key_fixture_is_covered():
    assert fixture_names('mambavision', 'keys_') == set(OFFICIAL_NAMES)


# ----------------------------------------------------------------------------------------------- 3. names

@pytest.mark.parametrize('alias', sorted(OFFICIAL_NAMES))
def test_official_alias_builds_same_architecture(alias):
    assert_alias_builds_same_architecture(alias, OFFICIAL_NAMES[alias], MambaVision)


def test_list_models():
    # the official models, and our small one without weights (tests/models/test_small_variants.py)
    assert mambazoo.list_models('mambavision*') == sorted([*OFFICIAL_NAMES.values(), 'mambavision_nano'])
    with_aliases = mambazoo.list_models('mamba*vision*', include_aliases=True)
    assert set(OFFICIAL_NAMES) | set(OFFICIAL_NAMES.values()) <= set(with_aliases)


def test_timm_create_model_returns_our_class():
    import timm
    for name in OFFICIAL_NAMES.values():
        assert timm.is_model(name), name
    with torch.device('meta'):
        model = timm.create_model('mambavision_tiny')
    assert type(model) is MambaVision
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in meta_model('mamba_vision_T').parameters())


@pytest.mark.parametrize('name', ['mambavision_huge', 'mamba_vision_X', 'vision_mamba'])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match='Unknown model'):
        mambazoo.create_model(name)


# ------------------------------------------------------------------------------------- 4. timm model surface

def test_forward_features_and_head():
    model = small_model().eval()
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 3)
        assert model.num_features == 56
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        torch.testing.assert_close(pre, feats.mean(dim=(2, 3)))
        logits = model(x)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(logits, model.head(pre))


def test_reset_classifier():
    model = small_model().eval()
    x = images(2, 3, 64, 64)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    model.reset_classifier(5)
    assert model.num_classes == 5
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0, global_pool='')
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features, 2, 2)


def test_forward_intermediates_all_stages():
    model = small_model().eval()
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 4
        for i, feat in enumerate(inter):
            stride = 4 * 2 ** i
            assert feat.shape == (2, 7 * 2 ** i, 64 // stride, 96 // stride), f'stage {i}: {tuple(feat.shape)}'
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        # Each map is taken before the stage's downsample.
        h = model.patch_embed(x)
        for i, level in enumerate(model.levels):
            h = level.forward_blocks(h)
            torch.testing.assert_close(inter[i], h, rtol=0, atol=0)
            if level.downsample is not None:
                h = level.downsample(h)
        only = model.forward_intermediates(x, intermediates_only=True)
    assert isinstance(only, list) and len(only) == 4
    for a, b in zip(only, inter):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_intermediates_indices_nhwc_stop_early():
    model = small_model().eval()
    x = images(2, 3, 64, 64)
    with torch.no_grad():
        _, full = model.forward_intermediates(x)
        _, some = model.forward_intermediates(x, indices=[1, 3])
        assert len(some) == 2
        torch.testing.assert_close(some[0], full[1], rtol=0, atol=0)
        torch.testing.assert_close(some[1], full[3], rtol=0, atol=0)
        _, last2 = model.forward_intermediates(x, indices=2)
        assert [t.shape[1] for t in last2] == [28, 56]

        _, nhwc = model.forward_intermediates(x, output_fmt='NHWC')
        for a, b in zip(nhwc, full):
            assert a.shape == (b.shape[0], b.shape[2], b.shape[3], b.shape[1])
            torch.testing.assert_close(a, b.permute(0, 2, 3, 1), rtol=0, atol=0)

        early, ran = record_outputs([level.blocks[0] for level in model.levels], lambda: model.forward_intermediates(
            x, indices=[1], stop_early=True, intermediates_only=True))
        calls = [i for i, _ in ran]
        assert calls == [0, 1], f'stop_early ran stages {calls}'
        assert len(early) == 1
        torch.testing.assert_close(early[0], full[1], rtol=0, atol=0)

        with pytest.raises(ValueError):
            model.forward_intermediates(x, output_fmt='NLC')


def test_features_only():
    kwargs = dict(TINY_OVERRIDES, features_only=True, out_indices=(1, 2, 3))
    torch.manual_seed(0)
    feat_model = mambazoo.create_model('mambavision_tiny', **kwargs).eval()
    torch.manual_seed(0)
    full = mambazoo.create_model('mambavision_tiny', **TINY_OVERRIDES).eval()
    assert feat_model.feature_info.channels() == [16, 32, 64]
    assert feat_model.feature_info.reduction() == [8, 16, 32]
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        feats = feat_model(x)
        want = full.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    assert isinstance(feats, list) and len(feats) == 3
    for f, ch, red, w in zip(feats, feat_model.feature_info.channels(), feat_model.feature_info.reduction(), want):
        assert f.shape == (2, ch, 64 // red, 96 // red)
        torch.testing.assert_close(f, w)


def test_grad_checkpointing_same_output_and_grads(monkeypatch):
    model = small_model().eval()  # eval: no BatchNorm statistics updates between the two runs
    x = images(2, 3, 64, 64)

    def run():
        xi = x.clone().requires_grad_(True)
        out, grads = output_and_grads(model, xi)
        return out, xi.grad, grads

    out0, gx0, g0 = run()
    calls = spy(monkeypatch, mv, 'grad_checkpoint')
    model.set_grad_checkpointing(True)
    out1, gx1, g1 = run()
    assert len(calls) == sum(SMALL['depths']), 'set_grad_checkpointing(True) did not checkpoint every block'
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(gx1, gx0)
    assert_close_by_name(g1, g0)
    model.set_grad_checkpointing(False)
    calls.clear()
    with torch.no_grad():
        model(x)
    assert not calls


# ------------------------------------------------------------------------------------------ 5. input sizes

@pytest.mark.parametrize('hw', [(96, 160), (256, 256), (32, 32)], ids=lambda hw: f'{hw[0]}x{hw[1]}')
def test_any_resolution_divisible_by_32(hw):
    """256x256 gives 16x16 and 8x8 maps in stages 2-3: windows of 14 and 7 need padding."""
    model = small_model().eval()
    with torch.no_grad():
        out = model(images(2, 3, *hw))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_padded_windows_do_not_mix_batch_items():
    model = small_model().eval()
    x = images(2, 3, 256, 256)
    with torch.no_grad():
        both = model(x)
        first = model(x[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape, needle', [
    ((2, 3, 100, 100), 'divisible by 32'),
    ((2, 3, 96, 100), 'divisible by 32'),
    ((2, 3, 48, 64), 'divisible by 32'),
    ((2, 1, 64, 64), '(B, 3, H, W)'),
    ((2, 4, 64, 64), '(B, 3, H, W)'),
    ((3, 64, 64), '(B, 3, H, W)'),
], ids=['100x100', '96x100', '48x64', '1ch', '4ch', '3d'])
def test_bad_inputs_raise(shape, needle):
    model = small_model().eval()
    x = torch.zeros(shape)
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError) as info:
            call(x)
        msg = str(info.value)
        assert needle in msg, msg
        got = str(tuple(shape[-2:])) if needle.startswith('divisible') else str(tuple(shape))
        assert got in msg, f'message does not show the offending shape {got}: {msg}'


# ------------------------------------------------------------------------------------------- 6. gradients

@pytest.mark.parametrize('layer_scale', [None, 0.3], ids=['no_layer_scale', 'layer_scale'])
def test_gradients_reach_every_parameter(layer_scale):
    model = small_model(layer_scale=layer_scale, layer_scale_conv=layer_scale).train()
    x = images(2, 3, 64, 64)
    out = model(x)
    # A random projection of the logits: sum(logits) would not depend on anything before the final
    # BatchNorm in train mode (its per-channel batch mean is its bias), hiding missing gradients.
    (out * images(*out.shape, seed=3)).sum().backward()
    params = dict(model.named_parameters())
    if layer_scale is not None:
        assert any('gamma' in n for n in params)
    assert_every_parameter_has_a_gradient(model)


# ------------------------------------------------------------------------------ 7. in_chans=1, num_classes=0

def test_one_channel_no_classifier():
    torch.manual_seed(0)
    model = mambazoo.create_model('mambavision_tiny', in_chans=1, num_classes=0, **TINY_OVERRIDES).eval()
    assert model.patch_embed.conv_down[0].weight.shape == (4, 1, 3, 3)
    assert isinstance(model.head, torch.nn.Identity)
    with torch.no_grad():
        out = model(images(2, 1, 64, 64))
    assert out.shape == (2, model.num_features) == (2, 64)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r'\(B, 1, H, W\)'):
        model(images(2, 3, 64, 64))

    direct = small_model(in_chans=1, num_classes=0).eval()
    with torch.no_grad():
        out = direct(images(1, 1, 96, 64))
    assert out.shape == (1, 56) and torch.isfinite(out).all()
