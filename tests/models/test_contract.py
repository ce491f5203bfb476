"""The model contract: every registered name works in every tool of the ecosystem that a timm or torchvision user
reaches for (timm's model surface and features wrapper, FX feature extraction, TorchScript, torch.export,
torch.compile, dynamic quantization, gradient checkpointing).

Each name is built once (a module-scoped fixture: pytest runs all the checks of one name before building the
next) at its own pretrained config, and run at a small input; the other builds a check asks for (no classifier,
features only, an explicit None) are made on the meta device and take the fixture's weights, which skips the
random initialisation (most of the build time of the large variants).

The tool checks (backward, FX, TorchScript, torch.export, torch.compile, quantization, checkpointing) cost seconds
to a minute per model on 2 cores, so by default they run on one name per code configuration (``TOOL_CHECKED``: each
family's smallest variant and every variant that takes another code path: MambaVision's layer scale, Vim's stride 8,
VMamba's s2l5 blocks, MambaOut's two heads); the other names are those configurations at other widths and depths.
``MAMBAZOO_CONTRACT_ALL=1`` runs them on every name (recorded in benchmarks/RESULTS.md when run). The MambaVision
variants of over 150M parameters (L, L2, L3 and their 21K / 512-px versions) are built on the meta device and get
the checks that need no forward (their cfg, features, headless build): their windows pad stages 3-4 to full
resolution at any input, a minute of forwards each on 2 cores, for the code mambavision_base runs.
A point a family cannot meet is marked here with the reason (``LIMITS``), as are parameters a configuration leaves
without a gradient by construction (``NO_GRADIENT``); no point is left untried.
"""
import copy
import fnmatch
import os
import warnings

import pytest
import timm
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import mambazoo

NAMES = mambazoo.list_models()
SIZE = 64  # divisible by 32 (MambaVision), by 16 (the patch models) and of the form 16 + 8k (Vim stride 8)
BATCH = 2

# What a family cannot do, and why; every other point is checked for every name.
LIMITS = {
    ('vmamba', 'quantize'): "VMamba's official Linear2d (1x1 convolutions stored as an nn.Linear subclass, NCHW "
                            "input) are not plain nn.Linear: quantize_dynamic converts the classifier only",
}
# Parameters a configuration leaves without a gradient by construction (name -> (patterns, why)).
NO_GRADIENT = {
    'mambavision_nano': (['levels.3.blocks.*.mixer.A_log'],
                         "window 1 in stage 4 (the main job's 1x1 map of a 32 px input): its mixers scan one-token "
                         "sequences, from a zero state, so the state decay A never acts"),
}
TOOL_CHECKED = {'hybrid_tiny', 'mambaout_femto', 'mambaout_small_rw', 'test_mambaout', 'mambavision_tiny',
                'mambavision_base', 'vim_tiny', 'vim_tiny_stride8', 'vmamba_tiny', 'vmamba_tiny_s2l5'}
ALL_TOOLS = os.environ.get('MAMBAZOO_CONTRACT_ALL', '') not in ('', '0')
STRUCTURE_ONLY = set() if ALL_TOOLS else {
    'mambavision_large', 'mambavision_large_21k', 'mambavision_large2', 'mambavision_large2_512_21k',
    'mambavision_large3_256_21k', 'mambavision_large3_512_21k'}
# A constructor argument whose explicit None switches a feature off, and a state_dict key that then disappears.
NONE_SWITCHES = {
    'mambavision': ('layer_scale', 'gamma'),
    'mambaout': ('ls_init_value', 'gamma'),
    'vim': ('init_layer_scale', 'gamma'),
}


def family(name):
    return 'mambaout' if name == 'test_mambaout' else name.split('_')[0]


def images(batch=BATCH, size=SIZE, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def rebuilt(name, model, **kwargs):
    """``create_model(name, **kwargs)`` built on the meta device, then given ``model``'s weights (all of them that
    it has: a check that some are missing)."""
    with torch.device('meta'):
        other = mambazoo.create_model(name, **kwargs)
    if name in STRUCTURE_ONLY:
        return other.eval()
    other.to_empty(device='cpu')
    target = getattr(other, 'model', other)  # timm's feature wrappers hold the model as .model
    own = model.state_dict()
    missing = [k for k in target.state_dict() if k not in own]
    target.load_state_dict({k: v for k, v in own.items() if k in target.state_dict()}, strict=False)
    assert not missing, f'{name} with {kwargs}: weights {missing[:5]} are not in the model'
    return other.eval()


def limit(name, point):
    reason = LIMITS.get((family(name), point))
    if reason:
        pytest.skip(reason)


def tool_check(name, point):
    """Skip a tool check on a name outside ``TOOL_CHECKED`` (unless MAMBAZOO_CONTRACT_ALL), and where the family
    cannot meet it."""
    needs_forward(name)
    if name not in TOOL_CHECKED and not ALL_TOOLS:
        pytest.skip(f'{point}: checked on the same code configuration of {family(name)} (TOOL_CHECKED); '
                    f'MAMBAZOO_CONTRACT_ALL=1 checks every name')
    limit(name, point)


@pytest.fixture(scope='module', params=NAMES)
def built(request):
    """(name, the model in eval mode, its output on ``images()``)."""
    name = request.param
    torch.manual_seed(0)
    if name in STRUCTURE_ONLY:
        with torch.device('meta'):
            return name, mambazoo.create_model(name).eval(), None
    model = mambazoo.create_model(name).eval()
    with torch.no_grad():
        logits = model(images())
    return name, model, logits


def needs_forward(name):
    if name in STRUCTURE_ONLY:
        pytest.skip(f'{name}: structure only (see the module docstring); MAMBAZOO_CONTRACT_ALL=1 runs it')


def test_forward_backward_reaches_every_parameter(built):
    name, model, _ = built
    tool_check(name, 'backward')
    model = copy.deepcopy(model).train()
    for m in model.modules():  # stochastic depth could drop a whole block for both images
        if hasattr(m, 'drop_prob'):
            m.drop_prob = 0.0
    out = model(images())
    assert out.shape == (BATCH, model.num_classes)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    patterns, _ = NO_GRADIENT.get(name, ([], ''))
    exempt = {n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    assert exempt <= set(missing), f'{name}: {sorted(exempt - set(missing))} do get a gradient (NO_GRADIENT is stale)'
    missing = [n for n in missing if n not in exempt]
    assert not missing, f'{name}: no gradient reaches {missing[:8]}'


def test_pretrained_cfg_fields(built):
    name, model, _ = built
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg or model.default_cfg == cfg
    keys = set(model.state_dict())
    assert len(cfg['input_size']) == 3
    assert f"{cfg['first_conv']}.weight" in keys, cfg['first_conv']
    classifiers = [cfg['classifier']] if isinstance(cfg['classifier'], str) else list(cfg['classifier'])
    assert all(f'{c}.weight' in keys for c in classifiers), cfg['classifier']
    assert cfg.get('num_classes', model.num_classes) == model.num_classes


def test_forward_features_and_head(built):
    name, model, logits = built
    needs_forward(name)
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(model.forward_head(feats), logits)
    cfg = model.pretrained_cfg
    if feats.dim() == 4:  # maps, NCHW (or NHWC, as timm's MambaOut): the pool size scales with the input
        nhwc = getattr(model, 'output_fmt', 'NCHW') == 'NHWC'
        assert feats.shape[-1 if nhwc else 1] == model.num_features
        if cfg.get('pool_size'):
            scale = cfg['input_size'][-1] // cfg['pool_size'][-1]
            assert tuple(feats.shape[1:3] if nhwc else feats.shape[-2:]) == (SIZE // scale, SIZE // scale)
    else:  # tokens (B, N, C)
        assert feats.shape[-1] == model.num_features
    hidden = getattr(model, 'head_hidden_size', model.num_features)
    assert pooled.shape == (BATCH, hidden)


def test_reset_classifier(built):
    name, model, _ = built
    needs_forward(name)
    model = copy.deepcopy(model)
    x = images()
    hidden = getattr(model, 'head_hidden_size', model.num_features)
    pool = model.global_pool
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(0)
        assert model(x).shape == (BATCH, hidden)
        model.reset_classifier(0, '')
        unpooled = model(x)
        model.reset_classifier(5, pool)
        assert model(x).shape == (BATCH, 5)
    assert unpooled.shape[0] == BATCH and unpooled.dim() >= 3  # no pooling: the map or the tokens
    if family(name) != 'mambaout':  # MambaOut's head norm stays after an unpooled reset (timm's too)
        torch.testing.assert_close(unpooled, feats)


def test_create_without_classifier_and_pooling(built):
    name, model, _ = built
    headless = rebuilt(name, model, num_classes=0, global_pool='')
    classifiers = model.pretrained_cfg['classifier']
    classifiers = [classifiers] if isinstance(classifiers, str) else list(classifiers)
    assert headless.num_classes == 0 and not any(f'{c}.weight' in headless.state_dict() for c in classifiers)
    needs_forward(name)
    with torch.no_grad():
        out = headless(images())
        feats = model.forward_features(images())
    assert out.shape[0] == BATCH and out.dim() >= 3
    if family(name) != 'mambaout':
        torch.testing.assert_close(out, feats)


def test_features_only_through_timms_wrapper(built):
    name, model, _ = built
    features = rebuilt(name, model, features_only=True)
    assert type(features).__module__.startswith('timm.'), type(features)
    assert features.default_cfg['input_size'] == model.pretrained_cfg['input_size']
    if family(name) != 'mambaout':  # timm's own mambaout_* names build timm's class (the same maps: test_mambaout)
        with torch.device('meta'):
            via_timm = timm.create_model(name, features_only=True)
        assert via_timm.feature_info.channels() == features.feature_info.channels()
        assert via_timm.feature_info.reduction() == features.feature_info.reduction()
    needs_forward(name)
    with torch.no_grad():
        maps = features(images())
        wanted = model.forward_intermediates(images(), indices=features.feature_info.out_indices,
                                             intermediates_only=True)
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    # the map's size is the input's over the reduction (Vim's stride-8 patches lose their border: 64 px -> 7)
    assert all(abs(m.shape[-1] - SIZE // r) <= 1 for m, r in zip(maps, features.feature_info.reduction()))
    for got, want in zip(maps, wanted):
        torch.testing.assert_close(got, want)


def test_forward_intermediates_options(built):
    name, model, _ = built
    needs_forward(name)
    x = images()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert len(last_two) == 2 and len(early) == 1 and len(normed) == 1
    for got, want in zip(last_two, maps[-2:]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(early[0], maps[0])
    assert normed[0].shape == maps[-1].shape


def test_fx_symbolic_trace_and_feature_extractor(built):
    name, model, logits = built
    tool_check(name, 'fx')
    x = images()
    with torch.no_grad():
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), logits)
        nodes = get_graph_node_names(model)[1]
        extractor = create_feature_extractor(model, return_nodes={nodes[-1]: 'out'})
        torch.testing.assert_close(extractor(x)['out'], logits)


def test_torchscript(built):
    name, model, logits = built
    tool_check(name, 'torchscript')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images()), logits, rtol=1e-5, atol=1e-5)


def test_torch_export(built):
    name, model, logits = built
    tool_check(name, 'export')
    exported = torch.export.export(model, (images(),), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(images()), logits, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph(built):
    name, model, logits = built
    tool_check(name, 'compile')
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='eager')  # graph capture is the contract, not codegen
    with torch.no_grad():
        torch.testing.assert_close(compiled(images()), logits, rtol=1e-4, atol=1e-4)


def test_quantize_dynamic_converts_every_linear(built):
    name, model, logits = built
    tool_check(name, 'quantize')
    linears = sum(type(m) is nn.Linear for m in model.modules())
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    assert linears > 0 and not any(type(m) is nn.Linear for m in quantized.modules())
    with torch.no_grad():
        out = quantized(images())
    assert out.shape == logits.shape and out.isfinite().all()


def test_grad_checkpointing_gives_the_same_output(built):
    name, model, _ = built
    tool_check(name, 'checkpointing')
    model = copy.deepcopy(model).train()  # stochastic depth: the same seed before both runs
    x = images()
    torch.manual_seed(1)
    plain = model(x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    checkpointed = model(x)
    torch.testing.assert_close(checkpointed, plain)


def test_explicit_none_switches_the_feature_off(built):
    name, _, _ = built
    switch = NONE_SWITCHES.get(family(name))
    if switch is None:
        pytest.skip(f'{family(name)} has no constructor argument whose None value switches a feature off')
    argument, key = switch
    with torch.device('meta'):
        off = mambazoo.create_model(name, **{argument: None})
    assert not any(key in k.split('.')[-1] for k in off.state_dict()), f'{argument}=None left {key} tensors'
