"""The loop-free selective scan (``selective_scan_parallel``) against the sequential reference, and the dispatcher's
choice of it while tracing / exporting.

B and C come as 'fixed' (dim, N), 'var' (batch, N, L) or an int G: grouped (batch, G, N, L). Inputs are drawn in
float64 from a seeded generator.
"""
import math

import pytest
import torch
from torch.autograd import gradcheck

from mambazoo.ops import SCAN_BACKENDS, get_scan_backend, selective_scan, selective_scan_ref, set_scan_backend
from mambazoo.ops.scan_parallel import selective_scan_parallel

FORMS = ('fixed', 'var', 2)
# Tracing warns that shapes become constants (intended: one trace per length) and that torch.jit is deprecated.
pytestmark = [pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning'),
              pytest.mark.filterwarnings('ignore:`torch.jit.:FutureWarning')]


def bc_shape(form, batch, dim, length, n_state):
    if form == 'fixed':
        return (dim, n_state)
    if form == 'var':
        return (batch, n_state, length)
    return (batch, form, n_state, length)


def make_inputs(batch=2, dim=4, length=13, n_state=3, *, b_form='var', c_form='var', D=True, z=True,
                delta_bias=True, softplus=True, seed=0, delta_scale=1.0, A_range=(-2.0, -0.05)):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    lo, hi = A_range
    return dict(
        u=randn(batch, dim, length),
        # with softplus delta is a raw pre-activation (any sign); without, a positive step
        delta=0.5 * randn(batch, dim, length) if softplus else
        delta_scale * (0.01 + torch.rand(batch, dim, length, generator=gen, dtype=torch.float64)),
        A=lo + (hi - lo) * torch.rand(dim, n_state, generator=gen, dtype=torch.float64),
        B=randn(*bc_shape(b_form, batch, dim, length, n_state)),
        C=randn(*bc_shape(c_form, batch, dim, length, n_state)),
        D=randn(dim) if D else None,
        z=randn(batch, dim, length) if z else None,
        delta_bias=0.5 * randn(dim) if delta_bias else None,
    )


def assert_close_rel(got, expected, rtol, what='output'):
    scale = expected.abs().max().item() or 1.0
    assert torch.isfinite(got).all(), f'{what}: non-finite values'
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f'{what}: {m}')


def form_id(form):
    return f'grouped{form}' if isinstance(form, int) else form


# ----------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize('b_form', FORMS, ids=form_id)
@pytest.mark.parametrize('c_form', FORMS, ids=form_id)
def test_matches_reference_for_every_b_c_layout(b_form, c_form):
    x = make_inputs(b_form=b_form, c_form=c_form, seed=hash((form_id(b_form), form_id(c_form))) % 1000)
    y, last = selective_scan_parallel(**x, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert y.dtype == torch.float64 and y.shape == x['u'].shape and last.shape == (2, 4, 3)
    assert_close_rel(y, y_ref, 1e-10)
    assert_close_rel(last, last_ref, 1e-10, 'last state')


@pytest.mark.parametrize('D,z,delta_bias,softplus', [
    (False, False, False, False), (True, False, False, False), (False, True, False, False),
    (False, False, True, True), (True, True, True, True), (False, False, False, True)])
def test_optional_parts(D, z, delta_bias, softplus):
    x = make_inputs(D=D, z=z, delta_bias=delta_bias, softplus=softplus, b_form=2, c_form='fixed', seed=3)
    assert_close_rel(selective_scan_parallel(**x, delta_softplus=softplus),
                     selective_scan_ref(**x, delta_softplus=softplus), 1e-10)


@pytest.mark.parametrize('length', [1, 2, 3, 7, 31, 33, 100])
def test_lengths_including_one_and_non_powers_of_two(length):
    x = make_inputs(length=length, b_form='var', c_form=2, seed=length)
    y, last = selective_scan_parallel(**x, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_close_rel(y, y_ref, 1e-10)
    assert_close_rel(last, last_ref, 1e-10, 'last state')


def test_long_sequence_with_large_delta_stays_finite_and_exact():
    # delta * |A| up to ~400: the decays underflow to 0 (a cumulative-sum formulation would overflow exp()).
    x = make_inputs(batch=1, dim=3, length=4096, n_state=4, softplus=False, delta_scale=50.0, A_range=(-8.0, -0.01),
                    seed=7)
    y, last = selective_scan_parallel(**x, return_last_state=True)
    y_ref, last_ref = selective_scan_ref(**x, return_last_state=True)
    assert_close_rel(y, y_ref, 1e-10)
    assert_close_rel(last, last_ref, 1e-10, 'last state')
    # float32 in, float32 accumulation: as close to the float64 reference as float32 allows.
    y32 = selective_scan_parallel(**{k: None if v is None else v.float() for k, v in x.items()})
    assert y32.dtype == torch.float32
    assert_close_rel(y32, y_ref, 1e-4, 'float32 output')


def test_half_precision_input_accumulates_in_float32():
    x = make_inputs(seed=11)
    x16 = {k: None if v is None else v.to(torch.bfloat16) for k, v in x.items()}
    y = selective_scan_parallel(**x16, delta_softplus=True)
    y_ref = selective_scan_ref(**{k: None if v is None else v.double() for k, v in x16.items()}, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, y_ref, 2e-2)


def test_bad_shapes_are_rejected_with_the_argument_name():
    x = make_inputs()
    x['B'] = torch.randn(2, 3)
    with pytest.raises(ValueError, match='B must be'):
        selective_scan_parallel(**x)


# ----------------------------------------------------------------------------------------------- gradients

def test_gradcheck_every_input():
    x = make_inputs(batch=1, dim=4, length=5, n_state=2, b_form=2, c_form='var', seed=5)
    names = list(x)

    def fn(*tensors):
        y, last = selective_scan_parallel(**dict(zip(names, tensors)), delta_softplus=True, return_last_state=True)
        return y, last

    inputs = tuple(v.detach().clone().requires_grad_() for v in x.values())
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_gradients_match_the_reference():
    x = make_inputs(length=19, b_form='fixed', c_form=2, seed=9)
    grads = []
    for scan in (selective_scan_parallel, selective_scan_ref):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        y, last = scan(**leaves, delta_softplus=True, return_last_state=True)
        (y.sin().sum() + last.cos().sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in x:
        assert_close_rel(grads[0][k], grads[1][k], 1e-9, f'gradient of {k}')


# ----------------------------------------------------------------------------------------------- dispatcher

class ScanModule(torch.nn.Module):
    def forward(self, u, delta, A, B, C):
        return selective_scan(u, delta, A, B, C, delta_softplus=True)


def scan_args(length, seed=0):
    x = make_inputs(batch=1, dim=4, length=length, n_state=3, seed=seed)
    return tuple(x[k].float() for k in ('u', 'delta', 'A', 'B', 'C'))


@pytest.fixture
def auto_backend_spied(monkeypatch):
    """'auto' as the process-wide backend, with every backend recording its calls in the returned list."""
    calls = []
    for name, fn in list(SCAN_BACKENDS.items()):
        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setitem(SCAN_BACKENDS, name, spy)
    previous = get_scan_backend()
    set_scan_backend('auto')
    yield calls
    set_scan_backend(previous)


def test_parallel_is_a_registered_backend():
    assert SCAN_BACKENDS['parallel'] is selective_scan_parallel
    x = make_inputs(seed=2)
    assert_close_rel(selective_scan(**x, delta_softplus=True, backend='parallel'),
                     selective_scan_ref(**x, delta_softplus=True), 1e-10)


def test_auto_runs_chunked_in_eager_mode_and_parallel_while_tracing(auto_backend_spied, set_policy):
    args = scan_args(16)
    set_policy(compiled_cpu=False)  # float32 inference would run the compiled loop (see test_policy.py)
    ScanModule()(*args)
    assert auto_backend_spied == ['chunked']
    auto_backend_spied.clear()
    torch.jit.trace(ScanModule(), args, check_trace=False)
    assert auto_backend_spied == ['parallel']
    auto_backend_spied.clear()
    torch.export.export(ScanModule(), args, strict=False)
    assert auto_backend_spied == ['parallel']


def test_explicit_backend_wins_over_export_choice(auto_backend_spied):
    class Chunked(torch.nn.Module):
        def forward(self, u, delta, A, B, C):
            return selective_scan(u, delta, A, B, C, backend='ref')
    torch.jit.trace(Chunked(), scan_args(4), check_trace=False)
    assert auto_backend_spied == ['ref']


def count_traced_nodes(length):
    graph = torch.jit.trace(ScanModule(), scan_args(length), check_trace=False).inlined_graph
    return len(list(graph.nodes()))


def test_traced_graph_grows_with_log_of_length_not_length():
    short, long = 64, 4096  # 64 times the steps, 6 more rounds
    n_short, n_long = count_traced_nodes(short), count_traced_nodes(long)
    n_double = count_traced_nodes(2 * short)  # one more round
    per_round = n_double - n_short  # slices, products, a concatenation and their constant arguments
    assert 0 < per_round < 100
    assert n_long == n_short + per_round * int(math.log2(long // short)), (n_short, n_double, n_long)
    assert n_long < 2 * n_short
