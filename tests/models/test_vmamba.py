"""VMamba (v2): numerically equal to the official model, checkpoint-compatible, published sizes, a complete timm model.

Golden fixtures (outputs of the official MzeroMiko/VMamba code with random weights, and the official state_dict key
lists of the v2 configurations) are read from ``../shared/fixtures/vmamba`` next to the project root; tests that
need them are skipped when that folder is missing (they fail under CI=true: see tests/helpers.py). Every
``golden_*.json`` found there is tested, so further fixtures dropped into the folder are picked up. Everything else
runs on a small configuration (widths 8/16/32/64, d_state 2) at small resolutions so the whole file stays fast on a
CPU.
"""
import copy
import importlib

import pytest
import torch

import mambazoo
from helpers import (SHARED_FIXTURES, assert_alias_builds_same_architecture, assert_close_by_name,
                     assert_every_parameter_has_a_gradient, assert_official_keys, fixture_names, float64_logits,
                     images, load_golden, meta_model, model_factory, output_and_grads, perturb, read_fixture_json,
                     record_outputs, rel_err, spy)
from mambazoo.analysis import count_flops
from mambazoo.models import VSSM
from mambazoo.models import vmamba as vm
from mambazoo.models.vmamba import VSSMBackbone, checkpoint_filter_fn
from mambazoo.ops import cross_scan_index, selective_scan_ref
cross_scan_ops = importlib.import_module("mambazoo.ops.cross_scan")  # the module (the package exports a function of that name)

# Key-list fixture -> our name, and the official names that must build the same architecture.
KEY_FIXTURES = {
    'tiny_s1l8': 'vmamba_tiny', 'small_s2l15': 'vmamba_small', 'base_s2l15': 'vmamba_base',
    'tiny_s2l5': 'vmamba_tiny_s2l5', 'small_s1l20': 'vmamba_small_s1l20', 'base_s1l20': 'vmamba_base_s1l20',
}
OFFICIAL_NAMES = {
    'vssm1_tiny_0230s': 'vmamba_tiny', 'vmambav2v_tiny_224': 'vmamba_tiny', 'vmamba_tiny_s1l8': 'vmamba_tiny',
    'vssm1_small_0229': 'vmamba_small', 'vmambav2_small_224': 'vmamba_small', 'vmamba_small_s2l15': 'vmamba_small',
    'vssm1_base_0229': 'vmamba_base', 'vmambav2_base_224': 'vmamba_base', 'vmamba_base_s2l15': 'vmamba_base',
    'vmambav2_tiny_224': 'vmamba_tiny_s2l5', 'vmambav2v_small_224': 'vmamba_small_s1l20',
    'vmambav2v_base_224': 'vmamba_base_s1l20',
}
# The official README's table: parameters (M, rounded) and GFLOPs at 224 (fvcore: one multiply-add = 1 flop).
PUBLISHED = {'vmamba_tiny': (30, 4.9), 'vmamba_small': (50, 8.7), 'vmamba_base': (89, 15.4)}

# A released-style (v05_noz, ln2d, patch embed v2, downsample v3) configuration, small enough for quick tests.
SMALL = dict(depths=[1, 1, 2, 1], dims=8, ssm_d_state=2, ssm_ratio=2.0, ssm_dt_rank='auto', ssm_conv=3,
             ssm_conv_bias=False, forward_type='v05_noz', mlp_ratio=4.0, downsample_version='v3',
             patchembed_version='v2', norm_layer='ln2d', num_classes=10, drop_path_rate=0.)
# Overrides that shrink a registered variant (vmamba_tiny) to something fast.
TINY_OVERRIDES = dict(dims=8, depths=[1, 1, 2, 1], ssm_d_state=2, drop_path_rate=0.)

F32_TOL = 1e-5  # relative L2 error, float32 vs the official float32 run
F64_TOL = 1e-7  # relative L2 error, float64 vs an official float64 run


# ------------------------------------------------------------------------------------------------- helpers

small_model = model_factory(VSSM, SMALL)

GOLDENS = (sorted(p.stem for p in (SHARED_FIXTURES / 'vmamba').glob('golden_*.json'))
           or ['golden_s1l8_224', 'golden_s2_dstate4_192'])


@pytest.fixture(scope='module', params=GOLDENS)
def golden(request):
    """(name, json, tensors, model with the golden weights loaded strictly, eval, and its outputs computed once)."""
    name = request.param
    meta, tensors, _, model = load_golden('vmamba', name, VSSM)
    with torch.no_grad():
        logits, ran = record_outputs(model.layers, lambda: model(tensors['input']))
    return name, meta, tensors, model, dict(logits=logits, stages=dict(ran))


def as_official_layout(model: VSSM, x: torch.Tensor) -> torch.Tensor:
    """Our maps are NCHW; the official model keeps NHWC unless channel_first (ln2d / bn)."""
    return x if model.channel_first else x.permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------- 1. official golden outputs

def test_golden_logits(golden):
    name, _, t, _, out = golden
    err = rel_err(out['logits'], t['logits'])
    assert err < F32_TOL, f'{name}: logits relative error {err:.2e}'


def test_golden_stages(golden):
    """stageI of the official model is the output of layers[I]: its blocks, then its downsample."""
    name, _, t, model, out = golden
    stages = [i for i in range(4) if f'stage{i}' in t]
    assert stages, f'{name}: no stage tensors'
    errors = {f'stage{i}': rel_err(as_official_layout(model, out['stages'][i]), t[f'stage{i}']) for i in stages}
    bad = {k: f'{v:.2e}' for k, v in errors.items() if not v < F32_TOL}
    assert not bad, f'{name}: stages off: {bad}'


def test_golden_float64(golden):
    """A float64 copy agrees with the official float32 run to float32 precision (and with float64 data if any)."""
    name, _, t, model, out = golden
    logits = float64_logits(model, t['input'])
    err = rel_err(logits, t['logits'])
    assert err < F32_TOL, f'{name}: float64 logits vs official float32 logits: {err:.2e}'
    assert rel_err(logits, out['logits']) < F32_TOL
    if 'logits_f64' in t:
        err = rel_err(logits, t['logits_f64'])
        assert err < F64_TOL, f'{name}: float64 logits vs official float64 logits: {err:.2e}'


# ------------------------------------------------------------------ 2. official keys, shapes and sizes

@pytest.mark.parametrize('fixture', sorted(KEY_FIXTURES))
def test_official_state_dict_keys_and_shapes(fixture):
    official = read_fixture_json('vmamba', f'keys_vmamba_{fixture}.json')
    name = KEY_FIXTURES[fixture]
    assert_official_keys(meta_model(name), official, name, ordered=True)
    assert all(dtype == 'float32' for _, _, dtype in official['keys'])


@pytest.mark.parametrize('fixture', sorted(KEY_FIXTURES))
def test_official_num_params(fixture):
    official = read_fixture_json('vmamba', f'keys_vmamba_{fixture}.json')
    name = KEY_FIXTURES[fixture]
    n = sum(p.numel() for p in meta_model(name).parameters())
    assert n == official['num_params'], f'{name}: {n} parameters, official {official["num_params"]}'


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_param_counts(name):
    n = sum(p.numel() for p in meta_model(name).parameters())
    assert round(n / 1e6) == PUBLISHED[name][0], f'{name}: {n / 1e6:.2f}M parameters, published {PUBLISHED[name][0]}M'


def test_every_key_fixture_is_covered():
    assert fixture_names('vmamba', 'keys_vmamba_') == set(KEY_FIXTURES)


# ------------------------------------------------------------------------------------------------ 3. FLOPs

@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_flops(name):
    """fvcore-style count (multiply-add = 1, scans 9BLDN + BDL) within 3% of the table; meta device: shapes only."""
    gflops = count_flops(meta_model(name)).gflops
    published = PUBLISHED[name][1]
    assert abs(gflops - published) <= 0.03 * published, f'{name}: {gflops:.3f} GFLOPs, published {published}G'


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_flops_real_device(name):
    model = mambazoo.create_model(name)
    count = count_flops(model)
    published = PUBLISHED[name][1]
    assert abs(count.gflops - published) <= 0.03 * published, f'{name}: {count}'
    assert count.total == count_flops(meta_model(name)).total
    assert model.training, 'count_flops must restore the training mode'


def test_flop_count_scales_with_resolution_and_counts_the_scans():
    model = small_model().eval()
    a, b = count_flops(model, (3, 64, 64)), count_flops(model, (3, 128, 128))
    assert 3.9 < b.total / a.total < 4.1  # linear in the number of tokens
    # Every block runs one scan over 4 * d_inner channels (d_inner = 2 * width), N = 2, at its stage's size.
    want = 0
    for i, depth in enumerate(SMALL['depths']):
        channels, length = 4 * 2 * 8 * 2 ** i, (64 // (4 * 2 ** i)) ** 2
        want += depth * (9 * length * channels * 2 + length * channels)
    assert a.by_op['selective_scan'] == want
    assert a.by_op['convolution'] > 0 and a.by_op['native_layer_norm'] > 0


# ----------------------------------------------------------------------------------------------- 4. names

@pytest.mark.parametrize('alias', sorted(OFFICIAL_NAMES))
def test_official_alias_builds_same_architecture(alias):
    assert_alias_builds_same_architecture(alias, OFFICIAL_NAMES[alias], VSSM)


def test_list_models_and_exports():
    # the official models, and our small one without weights (tests/models/test_small_variants.py)
    assert mambazoo.list_models('vmamba*') == sorted([*KEY_FIXTURES.values(), 'vmamba_nano'])
    assert set(OFFICIAL_NAMES) <= set(mambazoo.list_models('*', include_aliases=True))
    assert mambazoo.models.VSSM is VSSM


def test_timm_create_model_returns_our_class():
    import timm
    for name in KEY_FIXTURES.values():
        assert timm.is_model(name), name
    with torch.device('meta'):
        model = timm.create_model('vmamba_tiny')
    assert type(model) is VSSM
    assert sum(p.numel() for p in model.parameters()) == 30249064


def test_released_configuration_hyper_parameters():
    """Every hyper-parameter of the official configs reaches the modules."""
    tiny, small = meta_model('vmamba_tiny'), meta_model('vmamba_small')
    op = tiny.layers[0].blocks[0].op
    assert (op.d_model, op.d_inner, op.d_state, op.dt_rank, op.use_z) == (96, 96, 1, 6, False)
    assert op.conv2d.kernel_size == (3, 3) and op.conv2d.bias is None and op.conv2d.groups == 96
    assert isinstance(op.act, torch.nn.SiLU) and isinstance(tiny.layers[0].blocks[0].mlp.act, torch.nn.GELU)
    assert small.layers[2].blocks[0].op.d_inner == 2 * 384
    assert [len(layer.blocks) for layer in tiny.layers] == [2, 2, 8, 2]
    assert [len(layer.blocks) for layer in small.layers] == [2, 2, 15, 2]
    assert tiny.dims == [96, 192, 384, 768] and meta_model('vmamba_base').dims == [128, 256, 512, 1024]
    ds = tiny.layers[0].downsample[1]
    assert (ds.kernel_size, ds.stride, ds.padding) == ((3, 3), (2, 2), (1, 1))
    stem = tiny.patch_embed
    assert [(m.kernel_size, m.stride) for m in (stem[0], stem[5])] == [((3, 3), (2, 2))] * 2
    assert tiny.channel_first
    drop = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0. for layer in tiny.layers
            for b in layer.blocks]
    assert drop[0] == 0 and abs(drop[-1] - 0.2) < 1e-7 and abs(drop[1] - 0.2 / 13) < 1e-7
    assert tiny.pretrained_cfg['url'].endswith('vssm1_tiny_0230s_ckpt_epoch_264.pth')


# ------------------------------------------------------------------------ 5. SS2D: one scan, four directions

def test_one_selective_scan_call_per_block_with_directions_folded_into_channels(monkeypatch, set_policy):
    """The pure-PyTorch CPU path (what autograd and float64 take; here forced with the policy's compiled_cpu off)."""
    set_policy(compiled_cpu=False)
    model = small_model().eval()

    def shapes(u, delta, A, B, C, D=None, **kwargs):
        return dict(u=tuple(u.shape), delta=tuple(delta.shape), A=tuple(A.shape), B=tuple(B.shape),
                    C=tuple(C.shape), D=tuple(D.shape), kwargs=sorted(kwargs))

    calls = spy(monkeypatch, cross_scan_ops, 'selective_scan', shapes)  # what cross_selective_scan calls on a CPU
    with torch.no_grad():
        model(images(2, 3, 64, 96))
    assert len(calls) == sum(SMALL['depths'])
    first = calls[0]
    d_inner, L = 16, 16 * 24
    assert first['u'] == first['delta'] == (2, 4 * d_inner, L)
    assert first['B'] == first['C'] == (2, 4, 2, L)
    assert first['A'] == (4 * d_inner, 2) and first['D'] == (4 * d_inner,)
    assert calls[-1]['u'] == (2, 4 * 64 * 2, 2 * 3)


def test_one_compiled_cross_scan_per_block_in_cpu_inference(monkeypatch):
    """float32 CPU inference: one call of the compiled cross kernel per block, all four directions in it."""
    from mambazoo.ops import scan_numba
    if not scan_numba.numba_importable():
        pytest.skip('numba is not installed')
    model = small_model().eval()

    def shapes(x, dts, dt_weight, A, B, C, *args):
        return dict(x=tuple(x.shape), dts=tuple(dts.shape), dt_weight=tuple(dt_weight.shape), A=tuple(A.shape),
                    B=tuple(B.shape))

    calls = spy(monkeypatch, cross_scan_ops, 'run_cross_scan_kernel', shapes)
    with torch.no_grad():
        model(images(2, 3, 64, 96))
    assert len(calls) == sum(SMALL['depths'])
    d_inner, L, rank = 16, 16 * 24, 1
    assert calls[0] == dict(x=(2, L, d_inner), dts=(2, L, 4, rank), dt_weight=(4, d_inner, rank),
                            A=(4 * d_inner, 2), B=(2, L, 4, 2))


def test_ss2d_equals_four_separate_scans_along_explicit_permutations():
    """SS2D's core == four independent reference scans, each along its explicit token order, summed on the grid."""
    torch.manual_seed(0)
    op = perturb(vm.SS2D(d_model=6, d_state=3, ssm_ratio=2.0, forward_type='v05_noz', conv_bias=False)).double()
    B, H, W = 2, 3, 5
    x = images(B, op.d_inner, H, W).double()
    with torch.no_grad():
        got = op.forward_core(x)
        index = cross_scan_index(H, W)
        flat = x.flatten(2)
        A = -torch.exp(op.A_logs).view(4, op.d_inner, -1)
        want = torch.zeros(B, op.d_inner, H * W, dtype=torch.float64)
        for k in range(4):
            u = flat[:, :, index[k]]  # (B, D, L) in direction k's order
            dbl = torch.einsum('cd,bdl->bcl', op.x_proj_weight[k], u)
            dt, Bk, Ck = dbl.split([op.dt_rank, op.d_state, op.d_state], dim=1)
            dt = torch.einsum('dr,brl->bdl', op.dt_projs_weight[k], dt)
            y = selective_scan_ref(u, dt, A[k], Bk, Ck, op.Ds.view(4, -1)[k], delta_bias=op.dt_projs_bias[k],
                                   delta_softplus=True)
            want[:, :, index[k]] += y  # token l of direction k sits at row-major position index[k, l]
    torch.testing.assert_close(got, want.view(B, -1, H, W), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------- 6. timm model surface

def test_forward_features_and_head():
    model = small_model().eval()
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 3) and model.num_features == 64
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats.mean(dim=(2, 3)))
        logits = model(x)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(logits, model.get_classifier()(pre))


def test_reset_classifier():
    model = small_model().eval()
    x = images(2, 3, 64, 64)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        assert model(x).shape == (2, 64)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.classifier.head.out_features == 5
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0, global_pool='')
    with torch.no_grad():
        assert model(x).shape == (2, 64, 2, 2)
    with pytest.raises(ValueError):
        model.reset_classifier(3, global_pool='max')


def test_forward_intermediates():
    model = perturb(small_model()).eval()
    x = images(2, 3, 64, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(2, 8 * 2 ** i, 16 // 2 ** i, 24 // 2 ** i) for i in range(4)]
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        h = model.patch_embed(x)
        for i, layer in enumerate(model.layers):  # each map is the stage's blocks, before its downsample
            h = layer.blocks(h)
            torch.testing.assert_close(inter[i], h, rtol=0, atol=0)
            h = layer.downsample(h)

        _, some = model.forward_intermediates(x, indices=[1, 3])
        assert len(some) == 2 and torch.equal(some[0], inter[1]) and torch.equal(some[1], inter[3])
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last2] == [32, 64]
        nhwc = model.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        for a, b in zip(nhwc, inter):
            assert torch.equal(a, b.permute(0, 2, 3, 1))

        # norm=True: per-stage LayerNorm over channels (the detection backbone's freshly initialised outnorms)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        for a, b in zip(normed, inter):
            ln = torch.nn.functional.layer_norm(b.permute(0, 2, 3, 1), b.shape[1:2], eps=1e-5).permute(0, 3, 1, 2)
            torch.testing.assert_close(a, ln)

        early, ran = record_outputs([layer.blocks[0] for layer in model.layers], lambda: model.forward_intermediates(
            x, indices=[1], stop_early=True, intermediates_only=True))
        calls = [i for i, _ in ran]
        assert calls == [0, 1], f'stop_early ran stages {calls}'
        assert torch.equal(early[0], inter[1])
        with pytest.raises(ValueError):
            model.forward_intermediates(x, output_fmt='NLC')


def test_prune_intermediate_layers():
    model = perturb(small_model()).eval()
    x = images(1, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.layers) == 2 and isinstance(model.layers[-1].downsample, torch.nn.Identity)
        assert isinstance(model.get_classifier(), torch.nn.Identity) and model.global_pool == ''
        got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_features_only_is_the_official_detection_backbone():
    """features_only with feature_norm: timm's wrapper around the official detection backbone (per-stage maps
    through outnorm{i}, the official Backbone_VSSM state_dict keys)."""
    torch.manual_seed(0)
    wrapper = mambazoo.create_model('vmamba_tiny', features_only=True, feature_norm=True, **TINY_OVERRIDES).eval()
    torch.manual_seed(0)
    full = mambazoo.create_model('vmamba_tiny', **TINY_OVERRIDES).eval()
    backbone = wrapper.model
    assert isinstance(backbone, VSSMBackbone) and wrapper.default_cfg['input_size'] == (3, 224, 224)
    assert backbone.feature_info.channels() == [8, 16, 32, 64]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    want_keys = {k for k in full.state_dict() if not k.startswith('classifier.')}
    want_keys |= {f'outnorm{i}.{p}' for i in range(4) for p in ('weight', 'bias')}
    assert set(backbone.state_dict()) == want_keys
    backbone.load_state_dict(perturb(full).state_dict(), strict=False)  # same trunk weights, outnorms stay
    with torch.no_grad():
        for i in range(4):  # give the outnorms non-trivial affine parameters
            getattr(backbone, f'outnorm{i}').weight.mul_(1.5)
            getattr(backbone, f'outnorm{i}').bias.add_(0.25)
        x = images(2, 3, 64, 96)
        feats = wrapper(x)
        raw = full.forward_intermediates(x, intermediates_only=True)
    assert isinstance(feats, list) and len(feats) == 4
    for i, (f, r) in enumerate(zip(feats, raw)):
        norm = getattr(backbone, f'outnorm{i}')
        ln = torch.nn.functional.layer_norm(r.permute(0, 2, 3, 1), r.shape[1:2], norm.weight, norm.bias, 1e-5)
        torch.testing.assert_close(f, ln.permute(0, 3, 1, 2))

    some = mambazoo.create_model('vmamba_tiny', features_only=True, feature_norm=True, out_indices=(1, 2),
                                 **TINY_OVERRIDES).eval()
    assert some.feature_info.channels() == [16, 32] and some.feature_info.reduction() == [8, 16]
    assert {k.split('.')[0] for k in some.model.state_dict() if k.startswith('outnorm')} == {'outnorm1', 'outnorm2'}
    with torch.no_grad():
        assert [tuple(f.shape) for f in some(images(1, 3, 64, 64))] == [(1, 16, 8, 8), (1, 32, 4, 4)]


def test_grad_checkpointing_same_output_and_grads(monkeypatch):
    model = perturb(small_model()).train()
    x = images(2, 3, 32, 32)

    out0, g0 = output_and_grads(model, x)
    calls = spy(monkeypatch, vm, 'grad_checkpoint')
    model.set_grad_checkpointing(True)
    out1, g1 = output_and_grads(model, x)
    assert len(calls) == sum(SMALL['depths'])
    torch.testing.assert_close(out1, out0)
    assert_close_by_name(g1, g0)
    assert small_model(use_checkpoint=True).layers[0].grad_checkpointing


def test_no_weight_decay_and_group_matcher():
    from timm.optim import param_groups_weight_decay
    model = small_model()
    groups = param_groups_weight_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay())
    no_decay = {id(p) for p in groups[0]['params']}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert 'layers.0.blocks.0.op.A_logs' in names and 'layers.0.blocks.0.op.Ds' in names
    assert 'layers.0.blocks.0.op.x_proj_weight' not in names
    from timm.models import group_parameters
    grouped = group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in grouped.values()) == len(list(model.named_parameters()))


# ------------------------------------------------------------------------------------------ 7. input sizes

@pytest.mark.parametrize('hw', [(64, 96), (96, 64), (33, 47), (16, 16), (7, 5)], ids=lambda hw: f'{hw[0]}x{hw[1]}')
def test_any_resolution(hw):
    """Any size works (strided convs round up), non-square included; the batch items stay independent."""
    model = perturb(small_model()).eval()
    x = images(2, 3, *hw)
    with torch.no_grad():
        out = model(x)
        first = model(x[:1])
        inter = model.forward_intermediates(x, intermediates_only=True)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], first, rtol=1e-5, atol=1e-6)
    up = lambda n: (n + 1) // 2  # a 3x3 stride-2 conv with padding 1
    h, w = up(up(hw[0])), up(up(hw[1]))
    for t in inter:
        assert t.shape[-2:] == (h, w)
        h, w = up(h), up(w)


def test_transposed_input_gives_transposed_scan_roles():
    """The row- and column-major directions swap under a transpose: with their parameters swapped too, a block's
    SS2D output is the transpose (checks that H and W are not mixed up on non-square maps)."""
    torch.manual_seed(0)
    op = perturb(vm.SS2D(d_model=4, d_state=2, ssm_ratio=1.0, forward_type='v05_noz', d_conv=1)).eval()
    swapped = copy.deepcopy(op)
    perm = [1, 0, 3, 2]
    with torch.no_grad():
        D = op.d_inner
        for name in ('x_proj_weight', 'dt_projs_weight', 'dt_projs_bias'):
            getattr(swapped, name).copy_(getattr(op, name)[perm])
        swapped.A_logs.copy_(op.A_logs.view(4, D, -1)[perm].reshape(4 * D, -1))
        swapped.Ds.copy_(op.Ds.view(4, D)[perm].reshape(-1))
        x = images(1, 4, 3, 5)
        torch.testing.assert_close(swapped(x.transpose(2, 3)), op(x).transpose(2, 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 1, 64, 64), (2, 4, 64, 64), (3, 64, 64), (2, 3, 64)],
                         ids=['1ch', '4ch', '3d', '3d-b'])
def test_bad_inputs_raise(shape):
    model = small_model().eval()
    x = torch.zeros(shape)
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError) as info:
            call(x)
        assert '(B, 3, H, W)' in str(info.value) and str(tuple(shape)) in str(info.value)


def test_one_channel_no_classifier():
    torch.manual_seed(0)
    model = mambazoo.create_model('vmamba_tiny', in_chans=1, num_classes=0, **TINY_OVERRIDES).eval()
    assert model.patch_embed[0].weight.shape == (4, 1, 3, 3)
    with torch.no_grad():
        out = model(images(2, 1, 32, 48))
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r'\(B, 1, H, W\)'):
        model(images(2, 3, 32, 32))


# ------------------------------------------------------------------------------------------- 8. gradients

def test_gradients_reach_every_parameter():
    model = perturb(small_model(drop_path_rate=0.1)).train()
    x = images(2, 3, 32, 48).requires_grad_()
    out = model(x)
    (out * images(*out.shape, seed=3)).sum().backward()
    assert_every_parameter_has_a_gradient(model)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradients_match_finite_differences():
    """Backward through the whole model (cross scan, grouped scan, cross merge) agrees with float64 gradcheck,
    for the input and for the scan parameters of a block."""
    torch.manual_seed(0)
    model = perturb(VSSM(depths=[1, 1], dims=[4, 8], ssm_d_state=2, ssm_ratio=1.0, forward_type='v05_noz',
                         norm_layer='ln2d', downsample_version='v3', patchembed_version='v2', num_classes=3,
                         drop_path_rate=0.)).double().eval()
    x = images(1, 3, 12, 20).double().requires_grad_()
    names = ['layers.0.blocks.0.op.A_logs', 'layers.0.blocks.0.op.dt_projs_bias', 'layers.1.blocks.0.op.x_proj_weight']
    params = dict(model.named_parameters())

    def fn(inp, *tensors):
        return torch.func.functional_call(model, dict(zip(names, tensors)), (inp,))

    inputs = (x,) + tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# -------------------------------------------------------------------------- 9. options of the official class

def test_channel_last_norm_layer_is_the_same_model():
    """norm_layer='ln' (the official channel-last layout) has the same parameters and output as 'ln2d'."""
    a = perturb(small_model(norm_layer='ln2d')).eval()
    b = small_model(norm_layer='ln').eval()
    b.load_state_dict(a.state_dict(), strict=True)
    assert not b.channel_first and a.channel_first
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_z_gate_forward_type():
    """forward_type without '_noz' doubles in_proj and multiplies the scan output by act(z)."""
    model = perturb(small_model(forward_type='v05')).eval()
    op = model.layers[0].blocks[0].op
    assert op.use_z and op.in_proj.weight.shape == (2 * op.d_inner, op.d_model)
    x = images(1, op.d_model, 6, 7)
    with torch.no_grad():
        xz = op.in_proj(x)
        u, z = xz.chunk(2, dim=1)
        y = op.out_norm(op.forward_core(op.act(op.conv2d(u)))) * op.act(z)
        torch.testing.assert_close(op(x), op.out_proj(y))
        assert torch.isfinite(model(images(1, 3, 32, 32))).all()


@pytest.mark.parametrize('kwargs', [
    dict(norm_layer='bn'), dict(gmlp=True), dict(patchembed_version='v1'), dict(downsample_version='v2'),
    dict(posembed=True, imgsize=64), dict(ssm_init='v1'), dict(ssm_init='v2'), dict(ssm_conv=1),
    dict(mlp_ratio=0.), dict(forward_type='v3_noz', ssm_act_layer='gelu', mlp_act_layer='relu'),
], ids=lambda k: '-'.join(f'{a}={b}' for a, b in k.items()))
def test_official_options_build_and_run(kwargs):
    model = perturb(small_model(**kwargs)).eval()
    with torch.no_grad():
        out = model(images(2, 3, 64, 64))
        other = model(images(1, 3, 48, 80))  # another size (resizes a position embedding)
    assert out.shape == (2, 10) and other.shape == (1, 10)
    assert torch.isfinite(out).all() and torch.isfinite(other).all()


@pytest.mark.parametrize('kwargs, needle', [
    (dict(forward_type='v0'), 'forward_type'), (dict(forward_type='v05_onnone'), 'forward_type'),
    (dict(norm_layer='gn'), 'norm_layer'), (dict(downsample_version='v1'), 'downsample_version'),
    (dict(patchembed_version='v3'), 'patchembed_version'), (dict(ssm_act_layer='tanh'), 'ssm_act_layer'),
    (dict(ssm_init='v9'), 'initialize'),
])
def test_unsupported_options_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        small_model(**kwargs)


# ------------------------------------------------------------------------------------------- 10. checkpoints

def test_release_checkpoint_with_ema(tmp_path):
    """The official release format: weights under 'model', EMA weights under 'model_ema' (loaded on request)."""
    torch.manual_seed(0)
    model = mambazoo.create_model('vmamba_tiny', **TINY_OVERRIDES)
    weights = perturb(copy.deepcopy(model), seed=1).state_dict()
    ema = perturb(copy.deepcopy(model), seed=2).state_dict()
    path = tmp_path / 'vssm1_tiny_0230s_ckpt_epoch_264.pth'
    torch.save({'model': weights, 'model_ema': ema, 'epoch': 264, 'max_accuracy': 82.6}, path)

    loaded = mambazoo.create_model('vssm1_tiny_0230s', checkpoint_path=path, **TINY_OVERRIDES)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, weights[k]), k
    mambazoo.load_checkpoint(loaded, path, use_ema=True)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    with pytest.raises(mambazoo.CheckpointMismatchError, match='does not fit the model'):
        mambazoo.create_model('vmamba_tiny_s2l5', checkpoint_path=path, **TINY_OVERRIDES)


def test_checkpoint_filter_fn_converts_official_variants():
    model = small_model()
    own = perturb(copy.deepcopy(model)).state_dict()
    old = {}
    for k, v in own.items():  # older official names and conv-shaped Linear2d weights
        k2 = k.replace('patch_embed.0.', 'patch_embed.proj.').replace('classifier.norm.', 'norm.')
        k2 = k2.replace('classifier.head.', 'head.').replace('.blocks.0.norm.', '.blocks.0.ln_1.')
        k2 = k2.replace('.op.', '.self_attention.')
        old[k2] = v[:, :, None, None] if k.endswith('in_proj.weight') else v
    assert any('ln_1' in k for k in old) and old['layers.0.blocks.0.self_attention.in_proj.weight'].dim() == 4
    converted = checkpoint_filter_fn(old, model)
    assert set(converted) == set(own)
    for k in own:
        assert torch.equal(converted[k].reshape(own[k].shape), own[k]) and converted[k].shape == own[k].shape, k
    assert checkpoint_filter_fn(own, model).keys() == own.keys()


def test_detection_checkpoint_loads_into_features_only(tmp_path):
    """An mmdet checkpoint ('backbone.' prefix, outnorms, neck/head keys) loads into the features_only model."""
    torch.manual_seed(0)
    backbone = mambazoo.create_model('vmamba_tiny', features_only=True, feature_norm=True, **TINY_OVERRIDES).model
    trained = perturb(copy.deepcopy(backbone), seed=3).state_dict()
    det = {f'backbone.{k}': v for k, v in trained.items()}
    det['neck.lateral_convs.0.conv.weight'] = torch.zeros(4, 8, 1, 1)
    path = tmp_path / 'mask_rcnn_vssm_fpn_coco_tiny_s_epoch_12.pth'
    torch.save({'state_dict': det, 'meta': {'epoch': 12}}, path)
    loaded = mambazoo.create_model('vmamba_tiny', features_only=True, feature_norm=True, checkpoint_path=path,
                                   **TINY_OVERRIDES).model
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained[k]), k

    # A classification checkpoint into the backbone: classifier dropped, outnorms keep their initial values.
    clf = perturb(mambazoo.create_model('vmamba_tiny', **TINY_OVERRIDES), seed=4).state_dict()
    torch.save({'model': clf}, tmp_path / 'cls.pth')
    loaded = mambazoo.create_model('vmamba_tiny', features_only=True, feature_norm=True,
                                   checkpoint_path=tmp_path / 'cls.pth', **TINY_OVERRIDES).model
    for k, v in loaded.state_dict().items():
        if k.startswith('outnorm'):
            assert torch.equal(v, torch.ones_like(v) if k.endswith('weight') else torch.zeros_like(v)), k
        else:
            assert torch.equal(v, clf[k]), k
