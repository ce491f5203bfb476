"""Vision Mamba (Vim): numerically equal to the official model, checkpoint-compatible, any resolution, timm surface.

Golden fixtures (outputs of the official hustvl/Vim code with random weights, and the official state_dict key lists
of every released variant) come from ``../shared/fixtures/vim``; tests that need them skip when it is missing (they
fail under CI=true: see tests/helpers.py).
Everything else runs on small configurations (width 32-48, depth 2-4) so the file stays fast on a CPU.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import mambazoo
from helpers import (assert_close_by_name, assert_every_parameter_has_a_gradient, assert_official_keys, fixture_names,
                     float64_logits, golden_fixture, images, meta_model, model_factory, output_and_grads, perturb,
                     read_fixture_json, record_outputs, rel_err, spy)
from mambazoo.models import VisionMamba
from mambazoo.models import vim as vim_module
from mambazoo.models._blocks import Mamba
from mambazoo.ops import mamba_inner as mamba_inner_module
from mambazoo.ops import scan_numba
from mambazoo.ops import get_scan_backend, selective_scan_ref, set_scan_backend

# Official entrypoint names (hustvl/Vim vim/models_mamba.py) -> ours.
OFFICIAL_NAMES = {
    'vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2': 'vim_tiny',
    'vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2': 'vim_tiny_stride8',
    'vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2': 'vim_small',
    'vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2': 'vim_small_stride8',
    'vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2': 'vim_base',
}
# Parameter counts in millions, to 0.1M, from the official key lists (the README rounds them to 7M / 26M / 98M).
MPARAMS = {'vim_tiny': 7.1, 'vim_tiny_stride8': 7.3, 'vim_small': 25.8, 'vim_small_stride8': 26.0, 'vim_base': 97.6}
GOLDENS = ('golden_tiny_like_224', 'golden_stride8_112')

# A released-style configuration, small enough for CPU tests.
SMALL = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_classes=10, rms_norm=True, residual_in_fp32=True,
             fused_add_norm=True, final_pool_type='mean', if_abs_pos_embed=True, bimamba_type='v2',
             if_cls_token=True, if_divide_out=True, use_middle_cls_token=True, drop_path_rate=0.)

F32_TOL = 1e-5  # relative L2 error, float32 vs the official float32 run
# The official float64 run is float64 except inside the scan: mamba_ssm's selective_scan_ref casts u, delta, A, B, C
# to float32, so logits_f64 carries float32 scan rounding (~1e-7). Our float64 model computes everything in float64.
F64_TOL = 3e-7


# ------------------------------------------------------------------------------------------------- helpers

small_model = model_factory(VisionMamba, SMALL)


golden = golden_fixture('vim', VisionMamba, GOLDENS)


# ----------------------------------------------------------------------------- 1. official golden outputs

def test_golden_logits(golden):
    name, _, t, model = golden
    with torch.no_grad():
        err = rel_err(model(t['input']), t['logits'])
    assert err < F32_TOL, f'{name}: logits relative error {err:.2e}'


def test_golden_layers(golden):
    """layerI = the mixer output of layers[I] (B, tokens, D), class token at num_patches // 2."""
    name, meta, t, model = golden
    with torch.no_grad():
        _, ran = record_outputs(model.layers, lambda: model(t['input']))
    outputs = [out[0] for _, out in ran]
    n_layers = meta['kwargs']['depth']
    assert len(outputs) == n_layers and all(f'layer{i}' in t for i in range(n_layers))
    errors = {f'layer{i}': rel_err(out, t[f'layer{i}']) for i, out in enumerate(outputs)}
    bad = {k: f'{v:.2e}' for k, v in errors.items() if not v < F32_TOL}
    assert not bad, f'{name}: layers off: {bad}'


def test_golden_features_are_the_class_token(golden):
    """The official forward_features returns the class token's final state despite final_pool_type='mean'."""
    name, meta, t, model = golden
    assert meta['kwargs']['final_pool_type'] == 'mean' and model.global_pool == 'token'
    with torch.no_grad():
        tokens = model.forward_features(t['input'])
        feats = model.forward_head(tokens, pre_logits=True)
        official_style = model(t['input'], return_features=True)
    err = rel_err(feats, t['features'])
    assert err < F32_TOL, f'{name}: features relative error {err:.2e}'
    torch.testing.assert_close(official_style, feats, rtol=0, atol=0)
    middle = (tokens.shape[1] - 1) // 2
    torch.testing.assert_close(feats, tokens[:, middle], rtol=0, atol=0)
    # The mean over tokens (what the name suggests) is something else.
    assert rel_err(tokens.mean(dim=1), t['features']) > 1e-2


def test_golden_float64(golden):
    name, _, t, model = golden
    logits = float64_logits(model, t['input'])
    with torch.no_grad():
        err32 = rel_err(model(t['input']), t['logits_f64'])
    err = rel_err(logits, t['logits_f64'])
    assert err < F64_TOL, f'{name}: float64 logits relative error {err:.2e}'
    assert err < err32 / 4, f'{name}: float64 ({err:.2e}) is not closer to the float64 run than float32 ({err32:.2e})'


def test_golden_through_checkpoint_file(golden, tmp_path):
    """A release-style file (weights under 'model', plus training state) loads strictly through create_model."""
    name, meta, t, model = golden
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': model.state_dict(), 'epoch': 299, 'optimizer': {'state': {}}}, path)
    kwargs = dict(meta['kwargs'])
    kwargs.pop('if_devide_out', None)
    loaded = mambazoo.create_model('vim_tiny', checkpoint_path=path, **kwargs).eval()
    with torch.no_grad():
        err = rel_err(loaded(t['input']), t['logits'])
    assert err < F32_TOL, f'{name}: logits after loading from a file: {err:.2e}'


# ------------------------------------------------------------------------- 2. the bidirectional mixer

def _official_branch(xz, conv, x_proj, dt_proj, A_log, D, rank, n):
    """One direction as the official fused path computes it, step by step (conv1d with left padding, scan ref)."""
    L = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1, groups=x.shape[1])[..., :L])
    x_dbl = F.linear(x.transpose(1, 2), x_proj.weight)
    dt = F.linear(x_dbl[..., :rank], dt_proj.weight).transpose(1, 2)
    B, C = x_dbl[..., rank:rank + n].transpose(1, 2), x_dbl[..., rank + n:].transpose(1, 2)
    return selective_scan_ref(x, dt, -torch.exp(A_log.float()), B, C, D.float(), z=z,
                              delta_bias=dt_proj.bias.float(), delta_softplus=True)


@pytest.mark.parametrize('path', ['compiled', 'pytorch'])
@pytest.mark.parametrize('bimamba_type, divide', [('v2', True), ('v2', False), ('none', False)])
def test_mixer_matches_two_separate_scans(bimamba_type, divide, path, monkeypatch, set_policy):
    """Both directions in one scan == a forward and a flipped backward scan with their own parameters: the
    compiled CPU path (the backward branch read in place) and the PyTorch path (two stacked channel groups)."""
    if path == 'pytorch':
        set_policy(compiled_cpu=False)
    elif not scan_numba.numba_importable():
        pytest.skip('numba is not installed')
    torch.manual_seed(0)
    mixer = perturb(Mamba(24, d_state=8, bimamba_type=bimamba_type, if_divide_out=divide))
    h = images(3, 17, 24)
    kernel_calls = spy(monkeypatch, mamba_inner_module, 'run_mixer_scan')
    with torch.no_grad():
        got = mixer(h)
    assert len(kernel_calls) == (path == 'compiled')
    with torch.no_grad():
        xz = F.linear(h, mixer.in_proj.weight).transpose(1, 2)
        y = _official_branch(xz, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D, mixer.dt_rank, 8)
        if bimamba_type == 'v2':
            y_b = _official_branch(xz.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log,
                                   mixer.D_b, mixer.dt_rank, 8)
            y = y + y_b.flip(-1)
            if divide:
                y = y / 2
        want = F.linear(y.transpose(1, 2), mixer.out_proj.weight)
    assert rel_err(got, want) < 1e-6


def test_mixer_backward_branch_matters():
    """The official non-fused path ignores the *_b parameters; ours must not."""
    torch.manual_seed(0)
    mixer = perturb(Mamba(16, d_state=4, bimamba_type='v2', if_divide_out=True))
    h = images(2, 9, 16)
    with torch.no_grad():
        before = mixer(h)
        mixer.x_proj_b.weight.mul_(1.1)
        after = mixer(h)
    assert rel_err(after, before) > 1e-4


def test_mixer_one_scan_call_per_layer(monkeypatch, set_policy):
    """The PyTorch path (autograd, other devices, compiled_cpu off): one selective_scan call on both directions'
    stacked channels per layer."""
    set_policy(compiled_cpu=False)
    calls = spy(monkeypatch, mamba_inner_module, 'selective_scan', lambda *a, **k: a[0].shape)
    model = small_model().eval()
    with torch.no_grad():
        model(images(1, 3, 64, 64))
    assert len(calls) == SMALL['depth'], f'{len(calls)} scan calls for {SMALL["depth"]} layers'
    assert all(shape[1] == 2 * 2 * SMALL['embed_dim'] for shape in calls)  # both directions, expand 2


@pytest.mark.skipif(not scan_numba.numba_importable(), reason='numba is not installed')
def test_mixer_compiled_path_on_cpu_inference(monkeypatch):
    """Float32 CPU inference: one compiled conv and one compiled two-direction scan per layer, no selective_scan;
    with gradients the compiled training kernels (``scan_numba_grad``: neither the inference kernel nor
    selective_scan), to the same result."""
    calls = {name: spy(monkeypatch, mamba_inner_module, name)
             for name in ('run_mixer_conv_silu', 'run_mixer_scan', 'selective_scan')}
    model = small_model().eval()
    x = images(2, 3, 64, 64)
    with torch.no_grad():
        inference = model(x)
    assert {k: len(v) for k, v in calls.items()} == {'run_mixer_conv_silu': SMALL['depth'],
                                                     'run_mixer_scan': SMALL['depth'], 'selective_scan': 0}
    training = model(x)
    assert len(calls['selective_scan']) == 0 and len(calls['run_mixer_scan']) == SMALL['depth']
    assert rel_err(inference, training.detach()) < 1e-5
    previous = get_scan_backend()
    set_scan_backend('ref')  # another backend chosen: obeyed
    try:
        with torch.no_grad():
            reference = model(x)
    finally:
        set_scan_backend(previous)
    assert len(calls['selective_scan']) == SMALL['depth'] and len(calls['run_mixer_scan']) == SMALL['depth']
    assert rel_err(inference, reference) < 1e-5
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):  # bfloat16 GEMMs: converted for the kernels
        assert model(x).isfinite().all()
    assert len(calls['run_mixer_scan']) == 2 * SMALL['depth']


# ------------------------------------------------------------------ 3. official keys, shapes and sizes

@pytest.mark.parametrize('alias', sorted(OFFICIAL_NAMES))
def test_official_state_dict_keys_and_shapes(alias):
    official = read_fixture_json('vim', f'keys_{alias}.json')
    assert_official_keys(meta_model(alias), official, alias, ordered=True)
    assert all(dtype == 'float32' for _, _, dtype in official['keys'])
    assert all(v.dtype == torch.float32 for v in meta_model(alias).state_dict().values())


@pytest.mark.parametrize('alias', sorted(OFFICIAL_NAMES))
def test_official_num_params(alias):
    official = read_fixture_json('vim', f'keys_{alias}.json')
    n = sum(p.numel() for p in meta_model(alias).parameters())
    assert n == official['num_params'], f'{alias}: {n} parameters, official {official["num_params"]}'
    name = OFFICIAL_NAMES[alias]
    assert round(official['num_params'] / 1e6, 1) == MPARAMS[name]
    assert round(n / 1e6, 1) == MPARAMS[name]


def test_every_key_fixture_is_covered():
    assert fixture_names('vim', 'keys_') == set(OFFICIAL_NAMES)


# ----------------------------------------------------------------------------------------------- 4. names

@pytest.mark.parametrize('alias', sorted(OFFICIAL_NAMES))
def test_official_alias_builds_same_architecture(alias):
    name = OFFICIAL_NAMES[alias]
    a, b = meta_model(alias), meta_model(name)
    assert type(a) is VisionMamba and type(b) is VisionMamba
    assert a.pretrained_cfg['architecture'] == b.pretrained_cfg['architecture'] == name
    assert repr(a) == repr(b)


def test_variant_settings():
    tiny, s8, base = meta_model('vim_tiny'), meta_model('vim_tiny_stride8'), meta_model('vim_base')
    assert tiny.patch_embed.grid_size == (14, 14) and s8.patch_embed.grid_size == (27, 27)
    assert tiny.embed_dim == 192 and meta_model('vim_small').embed_dim == 384 and base.embed_dim == 768
    for model in (tiny, s8, base):
        assert len(model.layers) == 24 and model.class_token_layout == 'middle' and model.global_pool == 'token'
        mixer = model.layers[0].mixer
        assert mixer.bidirectional and mixer.if_divide_out and mixer.d_state == 16
        assert mixer.d_inner == 2 * model.embed_dim
    assert base.pretrained_cfg['hf_hub_id'] == 'hustvl/Vim-base-midclstok'
    assert s8.pretrained_cfg['hf_hub_filename'] == 'vim_t_midclstok_ft_78p3acc.pth'


def test_list_models_and_timm():
    import timm
    # the official models, and our small one without weights (tests/models/test_small_variants.py)
    assert mambazoo.list_models('vim*') == sorted([*OFFICIAL_NAMES.values(), 'vim_nano'])
    assert set(OFFICIAL_NAMES) <= set(mambazoo.list_models('vim*', include_aliases=True))
    assert mambazoo.models.VisionMamba is VisionMamba
    for name in OFFICIAL_NAMES.values():
        assert timm.is_model(name), name
    with torch.device('meta'):
        model = timm.create_model('vim_tiny')
    assert type(model) is VisionMamba


@pytest.mark.parametrize('name', ['vim_huge', 'vim_tiny_patch16_224'])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match='Unknown model'):
        mambazoo.create_model(name)


# ------------------------------------------------------------------------ 5. the official constructor

def test_misspelt_divide_out_is_swallowed_silently():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model = small_model(if_devide_out=False)  # ignored, as in the official class: if_divide_out stays True
    assert all(layer.mixer.if_divide_out for layer in model.layers)


def test_unknown_kwargs_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match='some_new_flag'):
        model = small_model(some_new_flag=3)
    reference = small_model()
    assert repr(model) == repr(reference)
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


def test_ssm_cfg_is_passed_to_the_mixer_and_checked():
    model = small_model(ssm_cfg=dict(d_conv=3, expand=1))
    mixer = model.layers[0].mixer
    assert mixer.conv1d.weight.shape == (32, 1, 3) and mixer.in_proj.weight.shape == (64, 32)
    with pytest.raises(TypeError):  # the official Mamba has no such argument either
        small_model(ssm_cfg=dict(not_an_argument=1))


@pytest.mark.parametrize('kwargs', [dict(if_rope=True), dict(if_bidirectional=True), dict(if_bimamba=True),
                                    dict(bimamba_type='v1'), dict(flip_img_sequences_ratio=0.5)],
                         ids=lambda k: next(iter(k)))
def test_unreleased_options_say_not_implemented(kwargs):
    with pytest.raises(NotImplementedError):
        small_model(**kwargs)


def test_channels_and_in_chans():
    model = small_model(channels=1)
    assert model.patch_embed.proj.weight.shape[1] == 1 and model.in_chans == 1
    assert small_model(in_chans=1).patch_embed.proj.weight.shape[1] == 1
    with pytest.raises(ValueError, match='disagree'):
        small_model(channels=1, in_chans=4)
    torch.manual_seed(0)
    built = mambazoo.create_model('vim_tiny', channels=1, embed_dim=32, depth=2)
    assert built.patch_embed.proj.weight.shape == (32, 1, 16, 16)
    with torch.no_grad():
        assert built(images(1, 1, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize('overrides, pool', [
    (dict(if_cls_token=False, final_pool_type='mean'), 'avg'),
    (dict(if_cls_token=False, final_pool_type='none'), 'last'),
    (dict(use_middle_cls_token=False), 'token'),
    (dict(use_double_cls_token=True), 'token'),
], ids=['no_cls_mean', 'no_cls_last', 'first_cls', 'double_cls'])
def test_other_official_token_layouts(overrides, pool):
    model = small_model(**overrides).eval()
    x = images(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        feats = model.forward_head(tokens, pre_logits=True)
    assert model.global_pool == pool
    assert tokens.shape == (2, 16 + model.num_prefix_tokens, 32)
    assert model.pos_embed.shape[1] == tokens.shape[1]
    want = {'avg': lambda: tokens.mean(1), 'last': lambda: tokens[:, -1]}.get(pool)
    if overrides.get('use_middle_cls_token') is False:
        want = lambda: tokens[:, 0]  # noqa: E731
    if overrides.get('use_double_cls_token'):
        want = lambda: (tokens[:, 0] + tokens[:, -1]) / 2  # noqa: E731
    torch.testing.assert_close(feats, want())


# ------------------------------------------------------------------------------------------ 6. resolution

def test_resolution_change_224_to_384(tmp_path):
    """A 224 model run at 384 == a model built at 384 with the resampled position embedding loaded; the class
    token stays in the middle of the 24x24 = 576 patch sequence (index 288), with its own embedding entry."""
    torch.manual_seed(0)
    model224 = perturb(VisionMamba(img_size=224, embed_dim=32, depth=2, num_classes=10, drop_path_rate=0.)).eval()
    path = tmp_path / 'vim224.pth'
    torch.save({'model': model224.state_dict()}, path)
    torch.manual_seed(1)
    model384 = VisionMamba(img_size=384, embed_dim=32, depth=2, num_classes=10, drop_path_rate=0.)
    mambazoo.load_checkpoint(model384, path)
    model384.eval()
    assert model224.pos_embed.shape[1] == 197 and model384.pos_embed.shape[1] == 577

    old, new = model224.pos_embed.detach(), model384.pos_embed.detach()
    torch.testing.assert_close(new[:, 288], old[:, 98], rtol=0, atol=0)  # the class-token entry, moved to the middle
    grid = torch.cat((old[:, :98], old[:, 99:]), dim=1).reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(24, 24), mode='bicubic', antialias=True).permute(0, 2, 3, 1).reshape(1, 576, 32)
    torch.testing.assert_close(torch.cat((new[:, :288], new[:, 289:]), dim=1), want)

    x = images(2, 3, 384, 384)
    with torch.no_grad():
        tokens, grid_size = model224._embed(x)
        on_the_fly = model224(x)
        built = model384(x)
    assert grid_size == (24, 24)
    torch.testing.assert_close(tokens[:, 288], (model224.cls_token + new[:, 288:289])[:, 0].expand(2, -1))
    assert torch.isfinite(on_the_fly).all() and on_the_fly.shape == (2, 10)
    torch.testing.assert_close(on_the_fly, built, rtol=1e-5, atol=1e-6)


def test_resolution_change_at_load_through_create_model(tmp_path):
    torch.manual_seed(0)
    src = perturb(mambazoo.create_model('vim_tiny', embed_dim=32, depth=2)).eval()
    path = tmp_path / 'vim.pth'
    torch.save({'model': src.state_dict()}, path)
    dst = mambazoo.create_model('vim_tiny', embed_dim=32, depth=2, img_size=160, checkpoint_path=path).eval()
    assert dst.pos_embed.shape == (1, 101, 32)
    x = images(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('hw', [(96, 160), (224, 224), (16, 16), (48, 32)], ids=lambda hw: f'{hw[0]}x{hw[1]}')
def test_any_resolution(hw):
    model = small_model().eval()
    x = images(2, 3, *hw)
    with torch.no_grad():
        out = model(x)
        maps = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert maps[0].shape == (2, 32, hw[0] // 16, hw[1] // 16)


def test_stride8_any_resolution():
    model = small_model(stride=8, img_size=112).eval()
    assert model.patch_embed.grid_size == (13, 13) and model.pos_embed.shape[1] == 170
    x = images(1, 3, 80, 160)
    with torch.no_grad():
        out = model(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert torch.isfinite(out).all()
    assert maps[-1].shape == (1, 32, 9, 19)  # (80 - 16) / 8 + 1, (160 - 16) / 8 + 1


def test_batch_items_do_not_mix():
    model = small_model().eval()
    x = images(3, 3, 64, 96)
    with torch.no_grad():
        both = model(x)
        one = model(x[1:2])
    torch.testing.assert_close(both[1:2], one, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- 7. timm model surface

def test_forward_features_head_and_dense_map():
    model = small_model().eval()
    x = images(2, 3, 64, 96)  # 4 x 6 patches
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 25, 32)
        pre = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pre, tokens[:, 12])
        torch.testing.assert_close(model(x), model.head(pre))
        final, maps = model.forward_intermediates(x, norm=True)
    torch.testing.assert_close(final, tokens)
    assert len(maps) == 2 and maps[-1].shape == (2, 32, 4, 6)
    patches = torch.cat((tokens[:, :12], tokens[:, 13:]), dim=1)
    torch.testing.assert_close(maps[-1], patches.reshape(2, 4, 6, 32).permute(0, 3, 1, 2))


def test_forward_intermediates_options():
    model = small_model(depth=3).eval()
    x = images(2, 3, 64, 64)
    with torch.no_grad():
        _, full = model.forward_intermediates(x)
        assert len(full) == 3
        some = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        torch.testing.assert_close(some[0], full[0], rtol=0, atol=0)
        torch.testing.assert_close(some[1], full[2], rtol=0, atol=0)
        nhwc = model.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        torch.testing.assert_close(nhwc[1], full[1].permute(0, 2, 3, 1))
        nlc = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
        assert nlc[0].shape == (2, 16, 32)
        pairs = model.forward_intermediates(x, return_prefix_tokens=True, intermediates_only=True)
        assert pairs[0][1].shape == (2, 1, 32)
        torch.testing.assert_close(pairs[0][0], full[0])
        early, ran = record_outputs(model.layers, lambda: model.forward_intermediates(
            x, indices=[1], stop_early=True, intermediates_only=True))
        assert [i for i, _ in ran] == [0, 1]
        torch.testing.assert_close(early[0], full[1], rtol=0, atol=0)
        with pytest.raises(ValueError, match='output_fmt'):
            model.forward_intermediates(x, output_fmt='NCL')


def test_features_only():
    torch.manual_seed(0)
    feat_model = mambazoo.create_model('vim_tiny', embed_dim=32, depth=4, features_only=True,
                                       out_indices=(1, 3)).eval()
    assert feat_model.feature_info.channels() == [32, 32]
    assert feat_model.feature_info.reduction() == [16, 16]
    with torch.no_grad():
        feats = feat_model(images(2, 3, 64, 96))
    assert [f.shape for f in feats] == [(2, 32, 4, 6)] * 2
    default = mambazoo.create_model('vim_tiny', embed_dim=32, depth=4, features_only=True)
    assert len(default.feature_info.channels()) == 3  # the last 3 blocks


def test_reset_classifier():
    model = small_model().eval()
    x = images(2, 3, 64, 64)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        assert model(x).shape == (2, 32)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(7, global_pool='avg')
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True),
                                   torch.cat((tokens[:, :8], tokens[:, 9:]), 1).mean(1))
    model.reset_classifier(0, global_pool='')
    with torch.no_grad():
        assert model(x).shape == (2, 17, 32)
    with pytest.raises(ValueError):
        model.reset_classifier(3, global_pool='cls')


def test_no_weight_decay_reaches_timm_optimizer():
    from timm.optim import create_optimizer_v2
    model = small_model()
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    for name in ('pos_embed', 'cls_token', 'layers.0.mixer.A_log', 'layers.0.mixer.A_b_log', 'layers.1.mixer.D_b'):
        assert name in names, name
    assert 'layers.0.mixer.in_proj.weight' not in names


def test_grad_checkpointing_same_output_and_grads(monkeypatch):
    model = small_model().eval()
    x = images(2, 3, 64, 64)

    out0, g0 = output_and_grads(model, x)
    calls = spy(monkeypatch, vim_module, 'grad_checkpoint')
    model.set_grad_checkpointing(True)
    out1, g1 = output_and_grads(model, x)
    assert len(calls) == SMALL['depth']
    torch.testing.assert_close(out1, out0)
    assert_close_by_name(g1, g0)


def test_residual_stream_stays_float32_in_bfloat16():
    model = small_model().eval().to(torch.bfloat16)
    with torch.no_grad():
        out, ran = record_outputs(model.layers, lambda: model(images(1, 3, 64, 64).to(torch.bfloat16)))
    seen = [(layer_out[0].dtype, layer_out[1].dtype) for _, layer_out in ran]
    assert seen == [(torch.bfloat16, torch.float32)] * SMALL['depth']
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------------------------- 8. gradients

def test_gradients_reach_every_parameter():
    model = perturb(small_model(init_layer_scale=0.5)).train()
    out = model(images(2, 3, 64, 64))
    (out * images(*out.shape, seed=3)).sum().backward()
    params = dict(model.named_parameters())
    assert 'layers.0.mixer.gamma' in params
    assert_every_parameter_has_a_gradient(model)


def test_drop_path_only_in_training():
    model = small_model(drop_path_rate=0.5, depth=4)
    x = images(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------------------ 9. bad inputs

@pytest.mark.parametrize('shape, needle', [
    ((2, 3, 100, 64), 'divisible by the patch size 16'),
    ((2, 3, 8, 64), 'divisible by the patch size 16'),
    ((2, 1, 64, 64), '(B, 3, H, W)'),
    ((3, 64, 64), '(B, 3, H, W)'),
], ids=['100x64', '8x64', '1ch', '3d'])
def test_bad_inputs_raise(shape, needle):
    model = small_model().eval()
    x = torch.zeros(shape)
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError) as info:
            call(x)
        msg = str(info.value)
        assert needle in msg, msg
        got = str(tuple(shape[-2:])) if 'divisible' in needle else str(tuple(shape))
        assert got in msg, f'message does not show the offending shape {got}: {msg}'


def test_bad_stride8_input_raises():
    model = small_model(stride=8, img_size=112)
    with pytest.raises(ValueError, match=r'divisible by 8; got \(100, 112\)'):
        model(torch.zeros(1, 3, 100, 112))


def test_checkpoint_of_another_variant_is_rejected(tmp_path):
    torch.manual_seed(0)
    other = VisionMamba(embed_dim=48, depth=2, num_classes=10)
    path = tmp_path / 'other.pth'
    torch.save({'model': other.state_dict()}, path)
    with pytest.raises(mambazoo.CheckpointMismatchError, match='shape'):
        mambazoo.create_model('vim_tiny', embed_dim=32, depth=2, num_classes=10, checkpoint_path=path)
