"""The fast selective scan (``selective_scan_chunked``) and the dispatcher, tested against the sequential reference.

B and C come in three forms, written here as a "form": ``'fixed'`` is (dim, N), ``'var'`` is (batch, N, L)
and an int G is the grouped (batch, G, N, L) layout. Inputs are drawn in float64 from a seeded generator
and cast afterwards, so the reference can always run on exact float64 copies of what the fast path saw.
"""
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.profiler import ProfilerActivity, profile

from mambazoo.ops import (SCAN_BACKENDS, get_scan_backend, selective_scan, selective_scan_chunked,
                          selective_scan_ref, set_scan_backend)

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
FORMS = ('fixed', 'var', 2)  # 2: grouped with G=2 (dims used with it are even)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


# ----------------------------------------------------------------------------------------------- helpers

def bc_shape(form, batch, dim, length, n_state):
    if form == 'fixed':
        return (dim, n_state)
    if form == 'var':
        return (batch, n_state, length)
    return (batch, form, n_state, length)


def form_id(form):
    return f'grouped{form}' if isinstance(form, int) else form


def make_inputs(batch, dim, length, n_state, *, b_form='var', c_form='var', D=True, z=True, delta_bias=True,
                softplus=True, seed=0, dtype=torch.float64, delta_range=(0.01, 1.0), A_range=(-2.0, -0.05)):
    """The keyword arguments of a scan call (absent optional inputs are None), drawn in float64, cast to dtype."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)

    x = dict(
        u=randn(batch, dim, length),
        # with softplus, delta is the raw pre-activation (any sign); without, it is already a positive step
        delta=0.5 * randn(batch, dim, length) if softplus else uniform(*delta_range, batch, dim, length),
        A=uniform(*A_range, dim, n_state),
        B=randn(*bc_shape(b_form, batch, dim, length, n_state)),
        C=randn(*bc_shape(c_form, batch, dim, length, n_state)),
        D=randn(dim) if D else None,
        z=randn(batch, dim, length) if z else None,
        delta_bias=0.5 * randn(dim) if delta_bias else None,
    )
    return {k: None if v is None else v.to(dtype) for k, v in x.items()}


def cast(inputs, dtype):
    return {k: None if v is None else v.detach().to(dtype) for k, v in inputs.items()}


def leaves(inputs):
    """Fresh leaf copies of the inputs that require grad."""
    return {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}


def assert_rel_close(got, expected, rtol, what='output'):
    """Elementwise |got - expected| <= rtol * (|expected| + max|expected|), compared in float64."""
    got, expected = got.detach().double(), expected.detach().double()
    assert torch.isfinite(got).all(), f'{what}: non-finite values'
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f'{what} (rtol {rtol:g}, scale {scale:.3g}): {m}')


def scan_and_grads(scan, inputs, cotangents, **flags):
    """Run scan on leaf copies of inputs and backprop <y, gy> + <last, g_last>: (y, last, {name: grad})."""
    x = leaves(inputs)
    y, last = scan(**x, return_last_state=True, **flags)
    gy, g_last = cotangents
    ((y * gy.to(y.dtype)).sum() + (last * g_last.to(last.dtype)).sum()).backward()
    return y, last, {k: v.grad for k, v in x.items() if v is not None}


def cotangents_for(inputs, n_state, seed=1):
    gen = torch.Generator().manual_seed(seed)
    batch, dim, _ = inputs['u'].shape
    return (torch.randn(inputs['u'].shape, generator=gen, dtype=torch.float64),
            torch.randn((batch, dim, n_state), generator=gen, dtype=torch.float64))


# ------------------------------------------------------------------ 1. property test against the reference

@st.composite
def scan_cases(draw):
    batch, dim = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    length, n_state = draw(st.integers(1, 80)), draw(st.integers(1, 5))
    forms = st.sampled_from(['fixed', 'var'] + [g for g in range(1, dim + 1) if dim % g == 0])
    opt = st.booleans()
    inputs = make_inputs(batch, dim, length, n_state, b_form=draw(forms), c_form=draw(forms), D=draw(opt),
                         z=draw(opt), delta_bias=draw(opt), softplus=(softplus := draw(opt)),
                         seed=draw(st.integers(0, 2 ** 31 - 1)))
    flags = dict(delta_softplus=softplus, return_last_state=draw(opt))
    return inputs, flags, draw(st.integers(1, 20))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(scan_cases())
def test_chunked_matches_reference_float64(case):
    inputs, flags, chunk_size = case
    got = selective_scan_chunked(**inputs, **flags, chunk_size=chunk_size)
    expected = selective_scan_ref(**inputs, **flags)
    if flags['return_last_state']:
        (got, last), (expected, last_ref) = got, expected
        assert last.dtype == torch.float64 and last.shape == last_ref.shape
        assert_rel_close(last, last_ref, 1e-10, 'last state')
    assert got.dtype == torch.float64 and got.shape == inputs['u'].shape
    assert_rel_close(got, expected, 1e-10)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(scan_cases())
def test_chunked_gradients_match_reference_float64(case):
    inputs, flags, chunk_size = case
    cot = cotangents_for(inputs, inputs['A'].shape[1])
    flags = dict(delta_softplus=flags['delta_softplus'])
    *_, grads = scan_and_grads(selective_scan_chunked, inputs, cot, chunk_size=chunk_size, **flags)
    *_, grads_ref = scan_and_grads(selective_scan_ref, inputs, cot, **flags)
    for name, g in grads_ref.items():
        assert_rel_close(grads[name], g, 1e-10, f'grad {name}')


# ----------------------------------------------------------------------------------------- 2. dtypes

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('form', FORMS, ids=form_id)
def test_low_precision_dtypes_match_float64_reference(dtype, form):
    inputs = make_inputs(2, 6, 100, 4, b_form=form, c_form=form, dtype=dtype, seed=3)
    y, last = selective_scan_chunked(**inputs, delta_softplus=True, return_last_state=True, chunk_size=16)
    y_ref, last_ref = selective_scan_ref(**cast(inputs, torch.float64), delta_softplus=True, return_last_state=True)
    assert y.dtype == dtype
    assert last.dtype == torch.float32
    assert_rel_close(y, y_ref, TOL[dtype])
    assert_rel_close(last, last_ref, TOL[torch.float32], 'last state')  # accumulated in float32 from exact inputs


# -------------------------------------------------------------------------------------- 3. gradients

@pytest.mark.parametrize('softplus', [True, False], ids=['softplus', 'no_softplus'])
@pytest.mark.parametrize('b_form, c_form', [(f, f) for f in FORMS] + [('fixed', 2), (2, 'var')],
                         ids=lambda f: form_id(f))
def test_gradcheck_chunked_all_inputs(b_form, c_form, softplus):
    inputs = make_inputs(2, 4, 7, 3, b_form=b_form, c_form=c_form, softplus=softplus, seed=5)
    order = [inputs[k].detach().requires_grad_() for k in NAMES]

    def fn(*tensors):  # chunk 3 splits L=7 as 3 + 3 + 1
        return selective_scan_chunked(**dict(zip(NAMES, tensors)), delta_softplus=softplus,
                                      return_last_state=True, chunk_size=3)

    assert torch.autograd.gradcheck(fn, order, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('form', FORMS, ids=form_id)
def test_gradients_match_reference_large(form, dtype):
    n_state = 8
    inputs = make_inputs(2, 16, 300, n_state, b_form=form, c_form=form, seed=7)
    cot = cotangents_for(inputs, n_state)  # nonzero cotangent on the last state as well as on y
    y, last, grads = scan_and_grads(selective_scan_chunked, cast(inputs, dtype), cot, chunk_size=64,
                                    delta_softplus=True)
    y_ref, last_ref, grads_ref = scan_and_grads(selective_scan_ref, inputs, cot, delta_softplus=True)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4  # float32 gradients sum ~L*dim terms
    assert_rel_close(y, y_ref, rtol)
    assert_rel_close(last, last_ref, rtol, 'last state')
    assert set(grads) == set(grads_ref) == set(NAMES)
    for name, g in grads_ref.items():
        assert grads[name].dtype == dtype
        assert_rel_close(grads[name], g, rtol, f'grad {name}')


def test_gradient_through_last_state_only():
    inputs = make_inputs(1, 4, 50, 3, D=False, z=False, seed=11)
    x, x_ref = leaves(inputs), leaves(inputs)
    selective_scan_chunked(**x, return_last_state=True, chunk_size=7)[1].sum().backward()
    selective_scan_ref(**x_ref, return_last_state=True)[1].sum().backward()
    for name in ('u', 'delta', 'A', 'B', 'delta_bias'):
        assert x_ref[name].grad.abs().max() > 0
        assert_rel_close(x[name].grad, x_ref[name].grad, 1e-10, f'grad {name}')
    assert x['C'].grad is None or not x['C'].grad.any()  # the state does not depend on C


# ---------------------------------------------------------------------------------- 4. numerical stability

def check_long_float32(inputs, rtol, **flags):
    y, last = selective_scan_chunked(**cast(inputs, torch.float32), return_last_state=True, **flags)
    y_ref, last_ref = selective_scan_ref(**cast(cast(inputs, torch.float32), torch.float64),
                                         return_last_state=True, **flags)
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert_rel_close(y, y_ref, rtol)
    assert_rel_close(last, last_ref, rtol, 'last state')
    return y, last


def test_large_decay_long_sequence_float32():
    # delta * |A| up to 50: exp(delta*A) down to 2e-22; nothing may overflow, underflow must be harmless
    inputs = make_inputs(1, 8, 4096, 4, softplus=False, delta_bias=False, delta_range=(0.0, 5.0),
                         A_range=(-10.0, -0.01), seed=13)
    assert (inputs['delta'][..., None] * inputs['A'][:, None, :].abs()).max() > 45
    check_long_float32(inputs, 1e-5)


@pytest.mark.parametrize('ones', [False, True], ids=['random', 'constant_drive'])
def test_tiny_delta_long_sequence_float32(ones):
    # delta = 1e-6: decays within 1e-6 of 1 over 4096 steps, the state integrates ~4096 small increments.
    # The float32 sequential reference itself is ~5e-5 off float64 here (1 - 1e-6 is not exact in float32),
    # so the bound is 2e-4; a state that drifts, cancels or blows up is far outside it.
    inputs = make_inputs(1, 8, 4096, 4, softplus=False, delta_bias=False, D=False, z=False,
                         A_range=(-1.0, -0.01), seed=17)
    inputs['delta'] = torch.full_like(inputs['u'], 1e-6)
    if ones:
        for k in ('u', 'B', 'C'):
            inputs[k] = torch.ones_like(inputs[k])
    _, last = check_long_float32(inputs, 2e-4)
    if ones:  # h_L = delta * (1 - a^L) / (1 - a) with a = exp(delta*A), in closed form
        a = torch.exp(1e-6 * inputs['A'])
        assert_rel_close(last[0], 1e-6 * (1 - a ** 4096) / (1 - a), 2e-4, 'closed-form last state')


# ------------------------------------------------------------------------------ 5. chunk-size independence

@pytest.mark.parametrize('b_form, c_form', [('var', 'fixed'), (2, 'var')], ids=form_id)
def test_results_do_not_depend_on_chunk_size(b_form, c_form):
    length, n_state = 150, 4
    inputs = make_inputs(2, 6, length, n_state, b_form=b_form, c_form=c_form, dtype=torch.float32, seed=19)
    cot = cotangents_for(inputs, n_state)
    runs = [scan_and_grads(selective_scan_chunked, inputs, cot, chunk_size=c, delta_softplus=True)
            for c in (1, 7, 64, length)]
    y0, last0, grads0 = runs[0]
    for y, last, grads in runs[1:]:
        assert_rel_close(y, y0, 1e-6)
        assert_rel_close(last, last0, 1e-6, 'last state')
        for name, g in grads.items():
            assert_rel_close(g, grads0[name], 1e-5, f'grad {name}')


# ----------------------------------------------------------------------------------------- 6. dispatcher

@pytest.fixture
def restore_backend():
    previous = get_scan_backend()
    try:
        yield
    finally:
        set_scan_backend(previous)


@pytest.fixture
def small_inputs():
    return make_inputs(2, 4, 33, 3, dtype=torch.float32, seed=23)


def test_dispatcher_default_is_chunked(small_inputs, restore_backend, monkeypatch, set_policy):
    calls = []
    for name, fn in list(SCAN_BACKENDS.items()):
        monkeypatch.setitem(SCAN_BACKENDS, name, lambda *a, _n=name, _f=fn, **k: calls.append(_n) or _f(*a, **k))
    if 'MAMBAZOO_SCAN' not in os.environ:
        assert get_scan_backend() == 'auto'
    set_scan_backend('auto')
    set_policy(compiled_cpu=False)  # float32 would take the compiled loops (test_policy.py)
    y = selective_scan(**small_inputs, delta_softplus=True)
    assert calls == ['chunked']
    assert torch.equal(y, selective_scan_chunked(**small_inputs, delta_softplus=True))
    y_ref = selective_scan(**small_inputs, delta_softplus=True, backend='ref')
    assert calls == ['chunked', 'ref']
    assert torch.equal(y_ref, selective_scan_ref(**small_inputs, delta_softplus=True))


def test_dispatcher_backends_agree(small_inputs):
    y, last = selective_scan(**small_inputs, return_last_state=True, backend='chunked')
    y_ref, last_ref = selective_scan(**small_inputs, return_last_state=True, backend='ref')
    assert_rel_close(y, y_ref, 1e-5)
    assert_rel_close(last, last_ref, 1e-5, 'last state')


def test_unknown_backend_raises(small_inputs, restore_backend):
    with pytest.raises(ValueError, match='nope'):
        selective_scan(**small_inputs, backend='nope')
    before = get_scan_backend()
    with pytest.raises(ValueError, match='nope'):
        set_scan_backend('nope')
    assert get_scan_backend() == before


def test_set_scan_backend_round_trips(small_inputs):
    previous = get_scan_backend()
    try:
        for name in ('ref', 'chunked', 'auto'):
            set_scan_backend(name)
            assert get_scan_backend() == name
        set_scan_backend('ref')
        assert torch.equal(selective_scan(**small_inputs), selective_scan_ref(**small_inputs))
    finally:
        set_scan_backend(previous)
    assert get_scan_backend() == previous


def _bad(**changes):
    """Arguments for batch 2, dim 4, L 5, N 3 with some replaced."""
    x = make_inputs(2, 4, 5, 3, dtype=torch.float32)
    x.update(changes)
    return x


BAD_ARGS = {
    'A_wrong_dim': (lambda: _bad(A=-torch.rand(5, 3)), ValueError, r'^A must'),
    'A_1d': (lambda: _bad(A=-torch.rand(4)), ValueError, r'^A must'),
    'A_complex': (lambda: _bad(A=torch.complex(-torch.rand(4, 3), torch.rand(4, 3))), NotImplementedError,
                  r'complex A'),
    'B_wrong_N': (lambda: _bad(B=torch.randn(2, 4, 5)), ValueError, r'^B must'),
    'B_fixed_wrong_N': (lambda: _bad(B=torch.randn(4, 2)), ValueError, r'^B must'),
    'B_groups_not_dividing': (lambda: _bad(B=torch.randn(2, 3, 3, 5)), ValueError, r'^B must'),
    'C_wrong_L': (lambda: _bad(C=torch.randn(2, 3, 6)), ValueError, r'^C must'),
    'z_wrong_shape': (lambda: _bad(z=torch.randn(2, 4, 6)), ValueError, r'^z must'),
    'D_wrong_shape': (lambda: _bad(D=torch.randn(3)), ValueError, r'^D must'),
    'delta_bias_wrong_shape': (lambda: _bad(delta_bias=torch.randn(5)), ValueError, r'^delta_bias must'),
    'delta_wrong_shape': (lambda: _bad(delta=torch.rand(2, 4, 4)), ValueError, r'^delta must'),
    'u_2d': (lambda: _bad(u=torch.randn(4, 5)), ValueError, r'^u must'),
    'L_zero': (lambda: make_inputs(2, 4, 0, 3, dtype=torch.float32), ValueError, r'\bu\.shape\[2\]'),
}


@pytest.mark.parametrize('backend', ['chunked', 'ref', 'parallel', 'triton'])
@pytest.mark.parametrize('case', list(BAD_ARGS), ids=str)
def test_bad_arguments_raise_naming_the_argument(case, backend):
    make, exc, pattern = BAD_ARGS[case]
    with pytest.raises(exc, match=pattern):
        selective_scan(**make(), backend=backend)


# ------------------------------------------------------------------------------------------ 7. autocast

@pytest.mark.parametrize('grad', [True, False], ids=['autograd', 'no_grad'])  # two code paths in the fast scan
def test_autocast_bf16_still_computes_in_float32(grad):
    inputs = make_inputs(2, 8, 120, 4, b_form=2, c_form='var', dtype=torch.float32, seed=29)
    cot = cotangents_for(inputs, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        if grad:
            y, last, grads = scan_and_grads(selective_scan_chunked, inputs, cot, delta_softplus=True, chunk_size=16)
        else:
            y, last = selective_scan_chunked(**inputs, delta_softplus=True, return_last_state=True, chunk_size=16)
    y_ref, last_ref, grads_ref = scan_and_grads(selective_scan_ref, inputs, cot, delta_softplus=True)
    assert y.dtype == last.dtype == torch.float32
    assert_rel_close(y, y_ref, 1e-5)
    assert_rel_close(last, last_ref, 1e-5, 'last state')
    for name, g in grads_ref.items() if grad else ():
        assert grads[name].dtype == torch.float32
        assert_rel_close(grads[name], g, 1e-4, f'grad {name}')


# ------------------------------------------------------------------------------ 8. no (b, dim, L, N) tensor

def largest_cpu_allocation(fn):
    """The size in bytes of the largest single allocation made while fn() runs, from the profiler's
    allocation records (kineto "[memory]" events: one per allocation or free, nbytes < 0 for frees)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    assert sizes, 'the profiler recorded no allocations: the check would be vacuous'
    return max(sizes)


MEM_SHAPE = (1, 64, 4096, 16)  # one float32 (batch, dim, L, N) tensor is 16 MiB


def test_memory_check_detects_the_reference():
    """The instrument works: the reference does materialise (batch, dim, L, N) tensors, and is caught."""
    inputs = make_inputs(*MEM_SHAPE, D=False, z=False, dtype=torch.float32)
    with torch.no_grad():
        assert largest_cpu_allocation(lambda: selective_scan_ref(**inputs)) >= math.prod(MEM_SHAPE) * 4


@pytest.mark.parametrize('form', FORMS, ids=form_id)
def test_inference_allocates_no_full_state_tensor(form):
    inputs = make_inputs(*MEM_SHAPE, b_form=form, c_form=form, dtype=torch.float32)
    with torch.no_grad():
        largest = largest_cpu_allocation(lambda: selective_scan_chunked(**inputs, delta_softplus=True,
                                                                        return_last_state=True))
    assert largest < math.prod(MEM_SHAPE) * 4, f'a single allocation of {largest} bytes'


# ------------------------------------------------------------------------------ the scan's fast softplus

def _softplus_inputs(dtype):
    # Where softplus is representable in float32 (exp(-87) is near the smallest normal), around the
    # threshold, around 0, and random values.
    grid = torch.linspace(-87.0, 40.0, 100_003, dtype=torch.float64)
    near = torch.cat([torch.tensor([-1e-30, 0.0, 1e-30, 19.999, 20.0, 20.001], dtype=torch.float64),
                      torch.randn(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-3])
    return torch.cat([grid, near]).to(dtype)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_fast_softplus_equals_torch_softplus(dtype):
    from mambazoo.ops.scan_chunked import softplus
    x = _softplus_inputs(dtype)
    expected = torch.nn.functional.softplus(x.double())  # threshold 20, as mamba_ssm
    got = softplus(x).double()
    rel = (got - expected).abs() / expected.abs().clamp(min=torch.finfo(dtype).tiny)
    # exp2(-|x| * log2(e)) rounds its argument: a relative error of about |x| ulps, as exp of a rounded
    # delta * A has in any scan; the log1p part adds a few ulps.
    bound = (x.double().abs() + 4) * torch.finfo(dtype).eps
    assert (rel <= bound).all(), (rel / bound).max().item()
    above = x > 20
    assert torch.equal(softplus(x)[above], x[above])  # the threshold, exactly as F.softplus


def test_fast_softplus_gradient_equals_torch_softplus():
    from mambazoo.ops.scan_chunked import softplus
    x = _softplus_inputs(torch.float64).requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours, = torch.autograd.grad(softplus(x), x, g)
    theirs, = torch.autograd.grad(torch.nn.functional.softplus(x), x, g)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)
