"""``ops.mamba_inner``: the Mamba mixer's conv1d + SiLU and its gated two-direction scan, every implementation
against an oracle written here from the definition (each direction on its own: the backward branch on the
time-reversed sequence with a causal conv and ``selective_scan_ref``), float64 where the path allows."""
import pytest
import torch
import torch.nn.functional as F

from mambazoo.ops import mamba_inner, mamba_inner_conv, mamba_inner_scan, selective_scan_ref
from mambazoo.ops.scan_numba import numba_importable

needs_numba = pytest.mark.skipif(not numba_importable(), reason='numba is not installed')


def causal_conv_silu(x, weight, bias):
    """x (batch, L, d): silu of the causal depthwise conv, zero history, by F.conv1d on a left-padded input."""
    k = weight.shape[-1]
    padded = F.pad(x.transpose(1, 2), (k - 1, 0))
    return F.silu(F.conv1d(padded, weight, bias, groups=x.shape[-1])).transpose(1, 2)


def oracle_conv(xz, weight, bias, branches):
    d = xz.shape[-1] // 2
    x = xz[..., :d]
    outs = [causal_conv_silu(x, weight[:d], None if bias is None else bias[:d])]
    if branches == 2:
        outs.append(causal_conv_silu(x.flip(1), weight[d:], None if bias is None else bias[d:]).flip(1))
    return torch.cat(outs, dim=-1)


def oracle_scan(u, deltas, projections, xz, A, D, delta_bias, rank, divide):
    d, N = xz.shape[-1] // 2, A.shape[-1]
    z = xz[..., d:]
    total = 0
    for k, (delta, proj) in enumerate(zip(deltas, projections)):
        flip = (lambda t: t.flip(1)) if k == 1 else (lambda t: t)
        ch = slice(k * d, (k + 1) * d)
        y = selective_scan_ref(flip(u[..., ch]).transpose(1, 2), flip(delta).transpose(1, 2), A[ch],
                               flip(proj[..., rank:rank + N]).transpose(1, 2), flip(proj[..., rank + N:]).transpose(1, 2),
                               D[ch], z=flip(z).transpose(1, 2),
                               delta_bias=None if delta_bias is None else delta_bias[ch], delta_softplus=True)
        total = total + flip(y.transpose(1, 2))
    return total * 0.5 if divide else total


def make(batch=2, length=9, d=16, N=4, rank=3, branches=2, k=4, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(xz=r(batch, length, 2 * d), weight=r(branches * d, 1, k) / 2, bias=r(branches * d) if bias else None,
                deltas=[r(batch, length, d) for _ in range(branches)],
                projections=[r(batch, length, rank + 2 * N) for _ in range(branches)],
                A=-torch.rand(branches * d, N, generator=g, dtype=dtype) * 2 - 0.1, D=r(branches * d),
                delta_bias=r(branches * d) / 4, rank=rank)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize('branches', [1, 2])
@pytest.mark.parametrize('length,bias', [(9, True), (2, False), (1, True)])
def test_conv_reference_matches_oracle_float64(branches, length, bias):
    a = make(length=length, branches=branches, bias=bias)
    got = mamba_inner.mamba_inner_conv_ref(a['xz'], a['weight'], a['bias'])
    assert got.dtype == torch.float64
    assert rel_err(got, oracle_conv(a['xz'], a['weight'], a['bias'], branches)) < 1e-13


@pytest.mark.parametrize('branches,divide', [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize('backend', ['chunked', 'ref', 'parallel'])
def test_scan_reference_matches_oracle_float64_with_gradients(branches, divide, backend):
    a = make(branches=branches)
    u = torch.randn(2, 9, branches * 16, dtype=torch.float64, requires_grad=True)
    inputs = [u, *a['deltas'], *a['projections']]
    for t in inputs:
        t.requires_grad_()
    args = (a['xz'], a['A'], a['D'], a['delta_bias'], a['rank'], divide)
    got = mamba_inner_scan(u, a['deltas'], a['projections'], *args[:4], args[4], args[5], backend)
    want = oracle_scan(u, a['deltas'], a['projections'], *args)
    assert rel_err(got, want) < 1e-12
    w = torch.randn_like(want)
    g_got = torch.autograd.grad((got * w).sum(), inputs)
    g_want = torch.autograd.grad((want * w).sum(), inputs)
    for x, y in zip(g_got, g_want):
        assert rel_err(x, y) < 1e-11


@needs_numba
@pytest.mark.parametrize('branches,divide', [(1, False), (2, True)])
def test_compiled_path_matches_oracle(branches, divide, monkeypatch):
    """Float32 inference on a CPU takes the compiled kernels (spied), within float32 rounding of the oracle."""
    calls = []
    for name in ('run_mixer_conv_silu', 'run_mixer_scan'):
        real = getattr(mamba_inner, name)
        monkeypatch.setattr(mamba_inner, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    a = make(branches=branches, length=33, d=32, N=16, rank=4)
    a64 = dict(a)
    a32 = {k: ([t.float() for t in v] if isinstance(v, list) else v.float() if torch.is_tensor(v) else v)
           for k, v in a.items()}
    with torch.no_grad():
        u32 = mamba_inner_conv(a32['xz'], a32['weight'], a32['bias'])
        y32 = mamba_inner_scan(u32, a32['deltas'], a32['projections'], a32['xz'], a32['A'], a32['D'],
                               a32['delta_bias'], a32['rank'], divide)
    assert calls == ['run_mixer_conv_silu', 'run_mixer_scan']
    u64 = oracle_conv(a64['xz'], a64['weight'], a64['bias'], branches)
    assert rel_err(u32, u64) < 1e-5
    y64 = oracle_scan(u32.double(), a64['deltas'], a64['projections'], a64['xz'], a64['A'], a64['D'],
                      a64['delta_bias'], a64['rank'], divide)
    assert rel_err(y32, y64) < 2e-5
    assert y32.dtype == torch.float32 and y32.shape == (2, 33, 32)


def test_bad_shapes_name_the_argument():
    a = make(branches=2)
    with pytest.raises(ValueError, match='weight'):
        mamba_inner_conv(a['xz'], a['weight'][:, :, None], a['bias'])
    with pytest.raises(ValueError, match=r'deltas\[1\]'):
        mamba_inner_scan(torch.zeros(2, 9, 32, dtype=torch.float64), [a['deltas'][0], a['deltas'][1][:, :4]],
                         a['projections'], a['xz'], a['A'], a['D'], None, a['rank'])


class _Mixer(torch.nn.Module):
    def forward(self, xz, weight, d0, d1, p0, p1, A, D):
        u = mamba_inner_conv(xz, weight, None)
        return mamba_inner_scan(u, [d0, d1], [p0, p1], xz, A, D, None, 3, False)


def test_ops_are_fx_leaves_and_scriptable():
    a = make(branches=2, dtype=torch.float32)
    args = (a['xz'], a['weight'], *a['deltas'], *a['projections'], a['A'], a['D'])
    module = _Mixer()
    with torch.no_grad():
        want = module(*args)
        graph = torch.fx.symbolic_trace(module)
        targets = [n.target for n in graph.graph.nodes if n.op == 'call_function']
        assert targets == [mamba_inner_conv, mamba_inner_scan]  # one node each: their Python is not traced
        torch.testing.assert_close(graph(*args), want, rtol=0, atol=0)
        scripted = torch.jit.script(module)
        assert 'mambazoo::mamba_inner_scan' in str(scripted.inlined_graph)
        torch.testing.assert_close(scripted(*args), want, rtol=0, atol=0)
