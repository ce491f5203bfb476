"""``ops.linear``: F.linear through oneDNN for float32 CPU inference where the machine's measurement (or the
policy) says so, the plain op everywhere else; ``mambazoo.optimize_for_cpu`` routing a model's nn.Linear layers.

Every comparison is against F.linear in float64 on the same inputs, and every test that means the oneDNN road
checks that it was taken (``onednn_calls``): a silent fallback would otherwise pass unnoticed.
"""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mambazoo
from mambazoo.ops import linear as linear_module
from mambazoo.ops import scan_policy
from mambazoo.ops.linear import cpu_linear_route, linear, onednn_linear_applies

needs_onednn = pytest.mark.skipif(linear_module._onednn_linear_op() is None,
                                  reason='no oneDNN linear op here (not x86, or PyTorch without mkldnn)')


@pytest.fixture
def onednn_calls(monkeypatch):
    """A list that grows by one at each oneDNN linear call; the policy's route forced to oneDNN."""
    monkeypatch.setattr(mambazoo.ops.policy, '_policy', mambazoo.ops.policy.get_scan_policy())
    mambazoo.ops.set_scan_policy(cpu_linear='onednn')
    calls = []
    real = linear_module._onednn_linear_op()

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(linear_module, '_onednn_linear_op', lambda: None if real is None else counting)
    return calls


def assert_close_to_float64(got, x, weight, bias):
    want = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.dtype == torch.float32 and got.shape == want.shape
    # float32 sums of K products: a few ulps of the sum of |terms|
    scale = F.linear(x.double().abs(), weight.double().abs(), None if bias is None else bias.double().abs())
    assert ((got.double() - want).abs() <= 1e-6 * x.shape[-1] ** 0.5 * scale + 1e-30).all()


@needs_onednn
@pytest.mark.parametrize('shape,out_features,bias,view', [
    ((197, 192), 768, True, None),  # a Vim-T in_proj
    ((2, 197, 384), 44, False, 'first_half'),  # x_proj on one branch's channels: a strided view
    ((2, 197, 384), 12, False, 'second_half'),
    ((3, 7, 7, 96), 384, True, None),  # channels-last MLP of a 4-d map
    ((5, 197, 12), 192, True, 'transposed'),  # a non-contiguous batch dimension
    ((0, 16), 8, True, None),  # no rows
])
def test_onednn_linear_matches_float64(shape, out_features, bias, view, onednn_calls):
    gen = torch.Generator().manual_seed(sum(shape) + out_features)
    x = torch.randn(*shape, generator=gen)
    if view == 'first_half':
        x = x[..., :shape[-1] // 2]
    elif view == 'second_half':
        x = x[..., shape[-1] // 2:]
    elif view == 'transposed':
        x = x.transpose(0, 1)
    weight = torch.randn(out_features, x.shape[-1], generator=gen) / x.shape[-1] ** 0.5
    b = torch.randn(out_features, generator=gen) if bias else None
    with torch.no_grad():
        got = linear(x, weight, b)
    assert len(onednn_calls) == 1
    assert_close_to_float64(got, x, weight, b)


@pytest.mark.parametrize('path', ['onednn', 'f_linear'])
def test_gelu_applied_by_the_gemm(path, onednn_calls, monkeypatch):
    """``gelu=True`` is the exact (erf) GELU of the output, on both roads."""
    if path == 'f_linear':
        mambazoo.ops.set_scan_policy(cpu_linear='aten')  # restored by onednn_calls
    elif linear_module._onednn_linear_op() is None:
        pytest.skip('no oneDNN linear op here')
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(2, 50, 96, generator=gen), torch.randn(384, 96, generator=gen) / 10, \
        torch.randn(384, generator=gen)
    with torch.no_grad():
        got = linear(x, weight, bias, gelu=True)
    assert len(onednn_calls) == (path == 'onednn')
    want = F.gelu(F.linear(x.double(), weight.double(), bias.double()))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (got - F.gelu(F.linear(x, weight, bias))).abs().max() < 1e-5


@needs_onednn
def test_gradients_take_f_linear(onednn_calls):
    x = torch.randn(4, 6, requires_grad=True)
    layer = mambazoo.optimize_for_cpu(nn.Linear(6, 3))
    y = layer(x)
    y.sum().backward()
    assert not onednn_calls and x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():  # the same values without the gradient
        torch.testing.assert_close(layer(x), y.detach())
    assert len(onednn_calls) == 1
    torch.testing.assert_close(layer(x.detach()).detach(), y.detach())  # grad mode on, but the weight needs one
    assert len(onednn_calls) == 1


@needs_onednn
@pytest.mark.parametrize('case', ['float64', 'bfloat16', 'autocast', 'disabled', 'one_dim', 'meta', 'traced'])
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_other_calls_take_f_linear(case, onednn_calls, monkeypatch):
    x, weight, bias = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    if case == 'float64':
        x, weight, bias = x.double(), weight.double(), bias.double()
    elif case == 'bfloat16':
        x = x.bfloat16()
        weight, bias = weight.bfloat16(), bias.bfloat16()
    elif case == 'disabled':
        mambazoo.ops.set_scan_policy(cpu_linear='aten')  # restored by onednn_calls
    elif case == 'one_dim':
        x = x[0]
    elif case == 'meta':
        x, weight, bias = x.to('meta'), weight.to('meta'), bias.to('meta')
    with torch.no_grad():
        if case == 'autocast':
            with torch.autocast('cpu', dtype=torch.bfloat16):
                got = linear(x, weight, bias)
                want = F.linear(x, weight, bias)
        elif case == 'traced':
            traced = torch.jit.trace(lambda t: linear(t, weight, bias), (x,), check_trace=False)
            assert 'mkldnn' not in str(traced.graph)
            got, want = traced(x), F.linear(x, weight, bias)
        else:
            got, want = linear(x, weight, bias), F.linear(x, weight, bias)
    assert not onednn_calls
    if case != 'meta':
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape == want.shape and got.dtype == want.dtype


def test_applies_only_where_documented():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with torch.no_grad(), scan_policy(cpu_linear='onednn'):
        assert onednn_linear_applies(x, w, None) == (linear_module._onednn_linear_op() is not None)
        assert not onednn_linear_applies(x, w, torch.randn(3, dtype=torch.float64))
    with torch.no_grad(), scan_policy(cpu_linear='aten'):
        assert not onednn_linear_applies(x, w, None)
    assert not onednn_linear_applies(x, w.requires_grad_(), None)


@needs_onednn
@pytest.mark.parametrize('onednn_ms,aten_ms,route', [(1.0, 2.0, 'onednn'), (2.0, 1.0, 'aten'), (1.0, 1.03, 'aten')])
def test_auto_route_takes_the_measured_faster_gemm(onednn_ms, aten_ms, route, monkeypatch):
    """'auto' measures both GEMMs once and keeps oneDNN only when it is clearly (5%) faster: the AMD case (MKL's
    AVX2 code) and the Intel case (MKL as fast or faster) both covered, with the timings stubbed."""
    timings = iter([aten_ms, onednn_ms] * len(linear_module._PROBE_SHAPES))
    monkeypatch.setattr(linear_module, '_median_seconds', lambda fn, repeats=7: (fn(), next(timings))[1])
    linear_module._measured_route.cache_clear()
    try:
        with scan_policy(cpu_linear='auto'):
            assert cpu_linear_route() == route
            assert cpu_linear_route() == route  # measured once: a second call reads the cache
    finally:
        linear_module._measured_route.cache_clear()
    with scan_policy(cpu_linear='aten'):
        assert cpu_linear_route() == 'aten'


def test_auto_route_is_one_of_the_two():
    with scan_policy(cpu_linear='auto'):
        assert cpu_linear_route() in ('onednn', 'aten')


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_optimize_for_cpu_keeps_types_state_and_undoes():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), _OwnForward(8, 8), nn.Sequential(nn.Linear(8, 2)))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[0].weight
    x = torch.randn(5, 4)
    with torch.no_grad():
        plain = model(x)
    assert mambazoo.optimize_for_cpu(model) is model
    assert type(model[0]) is nn.Linear and type(model[3][0]) is nn.Linear and type(model[2]) is _OwnForward
    assert 'forward' in model[0].__dict__ and 'forward' not in model[2].__dict__
    assert model[0].weight is weight and list(model.state_dict()) == list(keys)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, plain, rtol=1e-6, atol=1e-6)
        for m in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(m(x), y, rtol=0, atol=0)
            assert m[0].forward.args[0] is m[0]  # the copy's forward runs the copy's weights
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)[0]) is nn.Linear
    mambazoo.optimize_for_cpu(model, enable=False)
    assert 'forward' not in model[0].__dict__


@needs_onednn
@pytest.mark.parametrize('name', ['mambavision_tiny', 'vmamba_tiny', 'vim_tiny', 'mambaout_femto', 'hybrid_tiny'])
def test_models_build_plain_linears_and_optimize_for_cpu_routes_them(name, onednn_calls):
    """Models build plain nn.Linear modules (quantization and timm's tools dispatch on the type);
    optimize_for_cpu routes every one of them (timm's Mlp and Attention inside ours too) through ops.linear."""
    model = mambazoo.create_model(name, num_classes=7).eval()
    assert not any(type(m).__module__ == 'mambazoo.ops.linear' for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        mambazoo.optimize_for_cpu(model)
        routed = model(x)
    assert onednn_calls, f'{name}: no linear call went to oneDNN'
    torch.testing.assert_close(routed, plain, rtol=1e-4, atol=1e-4)
