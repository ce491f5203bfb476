"""The Triton selective scan on a GPU against a float64 reference computed on the same GPU (issue 7).

Each check draws fresh random inputs (float64, seeded per case), casts them to the dtype under test and moves
them to the GPU; the reference then runs in float64 on exactly those values (and on the same cotangents, rounded
to the dtypes of the outputs they multiply), so only the kernel's own arithmetic is measured. Compared per tensor:
the output, the last state and the gradient of every input, by ||fast - ref|| / ||ref|| and elementwise
(``assert_rel_close``: |fast - ref| <= tol * (|ref| + max |ref|)). Tolerances by dtype: float32 1e-5 forward and
1e-4 for gradients (sums over L * dim terms), bfloat16 1e-2 and float16 5e-3 (one rounding of a float32 result).
Every buffer a kernel writes starts as NaN (conftest.py), so an unwritten element fails.

The reference is ``selective_scan_ref`` (the definition) up to L = 512; beyond, ``selective_scan_chunked`` in
float64 (equal to the reference to 1e-10 in tests/ops), because the reference's autograd over a Python loop of
L steps costs O(L^2) memory traffic.

Shapes: the issue's benchmark rows at reduced batch, L = 1, L one past a chunk, L = 20000, N = 1..16 (not only
powers of two), B and C fixed / per step / grouped (also mixed), each optional input absent somewhere, extreme
step sizes. Then: determinism, the dispatcher's choice on CUDA tensors, strided views, torch.compile (inductor,
fullgraph) and CUDA graph capture.
"""
import zlib

import pytest
import torch

from mambazoo.ops import (SCAN_BACKENDS, selective_scan, selective_scan_chunked, selective_scan_ref,
                          selective_scan_triton)
from test_selective_scan import NAMES, assert_rel_close, make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

DEVICE = 'cuda'
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
FWD_TOL = {F32: 1e-5, BF16: 1e-2, F16: 5e-3}
GRAD_TOL = {F32: 1e-4, BF16: 1e-2, F16: 5e-3}
REF_MAX_LENGTH = 512  # longer sequences: the float64 chunked scan as the reference

# dtype name: (dtype of u, delta, z, B, C; dtype of A, D, delta_bias)
DTYPES = {
    'float32': (F32, F32),
    'bfloat16': (BF16, BF16),
    'float16': (F16, F16),
    'bf16_activations': (BF16, F32),  # what the models pass under bf16 autocast: float32 parameters
}
ACTIVATIONS = ('u', 'delta', 'z', 'B', 'C')


def _tiny_prefix(x):
    x['delta'][..., :500] = 1e-6


def _all_tiny(x):
    x['delta'] = torch.full_like(x['delta'], 1e-6)


def _softplus_threshold(x):
    # raw deltas on both sides of softplus's threshold (20), where its gradient becomes exactly 1
    batch, dim, length = x['u'].shape
    x['delta'] = torch.linspace(-30, 30, batch * dim * length, dtype=torch.float64).reshape(batch, dim, length)
    x['A'] = torch.full_like(x['A'], -1e-3)


def _positive_bias(x):
    x['delta_bias'] = 0.1 * x['delta_bias'].abs()  # without softplus, delta + bias must stay positive


# name: shape (batch, dim, L, N), make_inputs options, 'dtypes', 'last_state' (default True), 'prepare' (a change
# to the float64 inputs), 'tol' (replaces the float32 tolerances)
CASES = {
    # the benchmark rows, batch reduced
    'vim_layer_4x384x197_N16_z': dict(shape=(4, 384, 197, 16), dtypes=('float32', 'bfloat16')),
    'vmamba_stage1_2x384x3136_N1_4dirs': dict(shape=(2, 384, 3136, 1), b_form=4, c_form=4, z=False,
                                             dtypes=('float32', 'bfloat16')),
    'n16_1x384x3136_noz': dict(shape=(1, 384, 3136, 16), z=False),
    'mambavision_stage3_8x160x196_N16_noz': dict(shape=(8, 160, 196, 16), z=False),
    'wide_1x1536x4096_N16_z': dict(shape=(1, 1536, 4096, 16), dtypes=('float32', 'bfloat16')),
    'vim_1248px_1x384x6085_N16_z': dict(shape=(1, 384, 6085, 16)),
    # sequence lengths: a single step, one step past a chunk of 128, very long
    'L1': dict(shape=(3, 8, 1, 1), b_form='fixed', c_form=4, D=False, z=False, delta_bias=False, softplus=False),
    'L129': dict(shape=(2, 24, 129, 16), c_form='fixed', dtypes=('float32', 'float16')),
    'L20000': dict(shape=(2, 16, 20000, 4), c_form=2),
    # state sizes padded to a power of two, B/C layouts (mixed), each optional input absent somewhere
    'N3_fixed_var_noD': dict(shape=(2, 20, 300, 3), b_form='fixed', D=False, last_state=False),
    'N5_grouped3_grouped2_nobias': dict(shape=(2, 12, 250, 5), b_form=3, c_form=2, delta_bias=False),
    'N7_var_grouped4_nosoftplus_noz': dict(shape=(2, 28, 200, 7), c_form=4, softplus=False, z=False,
                                          prepare=_positive_bias, last_state=False),
    'N12_fixed_fixed_plain': dict(shape=(2, 16, 150, 12), b_form='fixed', c_form='fixed', D=False,
                                  delta_bias=False, softplus=False),
    'bf16_activations_f32_params': dict(shape=(2, 64, 197, 16), b_form=2, c_form=2,
                                        dtypes=('bf16_activations',)),
    # extreme steps: delta*|A| up to 50 (decays down to 2e-22) after 500 steps of delta = 1e-6
    'extreme_delta': dict(shape=(2, 16, 2000, 4), softplus=False, delta_bias=False, delta_range=(0.0, 5.0),
                          A_range=(-10.0, -0.01), prepare=_tiny_prefix),
    # delta = 1e-6 throughout: decays within 1e-6 of 1 are not exact in float32 (exp2 near 0 is a few ulps
    # off on a GPU, and the same decay repeats), so the state is ~L ulps off: 4096 * 1.2e-7 = 5e-4 at worst.
    # A chunk carry gone wrong is an O(1) error here (the state integrates the whole sequence).
    'tiny_delta': dict(shape=(1, 16, 4096, 4), D=False, z=False, softplus=False, delta_bias=False,
                       A_range=(-1.0, -0.01), prepare=_all_tiny, tol=2e-3),
    'softplus_threshold': dict(shape=(1, 8, 64, 2), prepare=_softplus_threshold),
}
PARAMS = [pytest.param(name, dtype, id=f'{name}-{dtype}')
          for name, spec in CASES.items() for dtype in spec.get('dtypes', ('float32',))]
MAKE_INPUTS_OPTIONS = ('b_form', 'c_form', 'D', 'z', 'delta_bias', 'softplus', 'delta_range', 'A_range')


# ----------------------------------------------------------------------------------------------- helpers

def seed_of(name):
    return zlib.crc32(name.encode()) % 2 ** 31


def case_inputs(name, seed=None):
    """The case's inputs in float64 on the CPU (absent optional inputs are None)."""
    spec = CASES[name]
    batch, dim, length, n_state = spec['shape']
    options = {k: spec[k] for k in MAKE_INPUTS_OPTIONS if k in spec}
    inputs = make_inputs(batch, dim, length, n_state, seed=seed_of(name) if seed is None else seed, **options)
    if 'prepare' in spec:
        spec['prepare'](inputs)
    return inputs


def to_device(inputs, dtype_name):
    """What the kernel sees: inputs cast (activations and parameters by DTYPES) and on the GPU."""
    activations, parameters = DTYPES[dtype_name]
    return {k: None if v is None else v.to(device=DEVICE, dtype=activations if k in ACTIVATIONS else parameters)
            for k, v in inputs.items()}


def as_float64(inputs):
    """Exact float64 copies, on the same device, for the reference."""
    return {k: None if v is None else v.detach().to(torch.float64) for k, v in inputs.items()}


def cotangents(seen, seed):
    """(dL/dy, dL/dlast) in float64 on the GPU, already rounded to the output dtypes (y: u's, last: float32),
    so the fast and the reference backward start from the same values."""
    gen = torch.Generator().manual_seed(seed)
    batch, dim, length = seen['u'].shape
    gy = torch.randn((batch, dim, length), generator=gen, dtype=torch.float64).to(seen['u'].dtype)
    glast = torch.randn((batch, dim, seen['A'].shape[1]), generator=gen, dtype=torch.float64).float()
    return gy.to(DEVICE).double(), glast.to(DEVICE).double()


def leaves(inputs):
    return {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}


def scan_and_grads(scan, inputs, cot, softplus=True, last_state=True, relayout=None):
    """(y, last or None, {name: gradient}) of scan on leaf copies of inputs, backpropagating cot.

    relayout: {name: function} giving the tensor the scan is called with (a view in another memory layout),
    applied differentiably to the leaf (a clone would not keep a non-dense layout)."""
    x = leaves(inputs)
    relayout = relayout or {}
    args = {k: relayout[k](v) if k in relayout and v is not None else v for k, v in x.items()}
    out = scan(**args, delta_softplus=softplus, return_last_state=last_state)
    y, last = out if last_state else (out, None)
    gy, glast = cot
    outputs, grad_outputs = [y], [gy.to(y.dtype)]
    if last_state:
        outputs.append(last)
        grad_outputs.append(glast.to(last.dtype))
    names = [k for k in NAMES if x[k] is not None]
    grads = torch.autograd.grad(outputs, [x[k] for k in names], grad_outputs)
    return y.detach(), None if last is None else last.detach(), dict(zip(names, grads))


def rel_err(got, expected):
    got, expected = got.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    return (got - expected).norm().item() / (scale or 1.0)


def check(got, expected, what, tol):
    """Norm-wise relative error <= tol, and elementwise |got - ref| <= tol * (|ref| + max|ref|)."""
    assert got.shape == expected.shape, f'{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}'
    assert torch.isfinite(got).all(), f'{what}: non-finite values (an element no kernel wrote stays NaN)'
    err = rel_err(got, expected)
    assert err <= tol, f'{what}: ||got - ref|| / ||ref|| = {err:.3g} > {tol:g}'
    assert_rel_close(got, expected, tol, what)


def reference_for(inputs):
    return selective_scan_ref if inputs['u'].shape[2] <= REF_MAX_LENGTH else selective_scan_chunked


def compare_with_reference(seen, cot, softplus=True, last_state=True, tol=None, relayout=None):
    """Run the Triton scan (on seen, relaid out) and the float64 reference (on seen) and check everything;
    returns the Triton results."""
    y, last, grads = scan_and_grads(selective_scan_triton, seen, cot, softplus, last_state, relayout)
    exact = as_float64(seen)
    y_ref, last_ref, grads_ref = scan_and_grads(reference_for(exact), exact, cot, softplus, last_state)
    assert y.dtype == seen['u'].dtype and y.device == seen['u'].device
    check(y, y_ref, 'output', tol or FWD_TOL[y.dtype])
    if last_state:
        assert last.dtype == F32
        check(last, last_ref, 'last state', tol or FWD_TOL[F32])  # a float32 state from exact inputs
    assert set(grads) == set(grads_ref) == {k for k, v in seen.items() if v is not None}
    for key, g_ref in grads_ref.items():
        assert grads[key].dtype == seen[key].dtype, f'grad {key}: {grads[key].dtype} for a {seen[key].dtype} input'
        check(grads[key], g_ref, f'grad {key}', tol or GRAD_TOL[grads[key].dtype])
    return y, last, grads


# ------------------------------------------------------------------------- 1. against the float64 reference

def test_cases_cross_chunk_boundaries():
    from mambazoo.ops.scan_triton import scan_chunk_length
    L129 = CASES['L129']['shape']
    assert L129[2] % scan_chunk_length(L129[2], L129[3]) == 1  # one step into a second chunk
    L20000 = CASES['L20000']['shape']
    assert L20000[2] // scan_chunk_length(L20000[2], L20000[3]) > 100
    x = case_inputs('extreme_delta')
    assert (x['delta'][..., None] * x['A'][:, None, :].abs()).max() > 45


@pytest.mark.parametrize('name, dtype', PARAMS)
def test_forward_and_gradients_match_float64_reference(name, dtype):
    spec = CASES[name]
    seen = to_device(case_inputs(name), dtype)
    cot = cotangents(seen, seed_of(name) + 1)
    compare_with_reference(seen, cot, softplus=spec.get('softplus', True), last_state=spec.get('last_state', True),
                           tol=spec.get('tol'))


# ------------------------------------------------------------------------------------- 2. layouts

def _time_major(t):
    """The same values stored with the L axis outermost (as the models' (L, batch, dim) activations)."""
    return t.movedim(-1, 0).contiguous().movedim(0, -1)


def _every_other(t, dim):
    """The same values as a non-dense view: every other entry along dim of a tensor twice as long there, the
    entries between them NaN (never to be read)."""
    shape = list(t.shape)
    shape[dim] *= 2
    wide = torch.full(shape, float('nan'), device=t.device, dtype=t.dtype)
    index = [slice(None)] * t.dim()
    index[dim] = slice(0, None, 2)
    wide[tuple(index)] = t  # differentiable: the gradient of t is that of the view
    return wide[tuple(index)]


def _every_other_channel(t):
    return _every_other(t, 1)


LAYOUTS = {
    'time_major': dict(u=_time_major, delta=_time_major, z=_time_major, B=_time_major, C=_time_major,
                       A=lambda A: A.t().contiguous().t()),
    # u in (batch, dim, L) order, delta and z time-major (MambaVision passes x contiguous, delta transposed)
    'mixed': dict(delta=_time_major, z=_time_major, C=_time_major),
    'non_dense': dict(u=_every_other_channel, delta=_every_other_channel, z=_every_other_channel),
}


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_strided_views_in_and_out(layout):
    seen = to_device(make_inputs(2, 48, 150, 8, b_form='var', c_form=2, seed=101), 'float32')
    relayout = LAYOUTS[layout]
    y, *_ = compare_with_reference(seen, cotangents(seen, 102), relayout=relayout)
    if layout == 'time_major':
        assert y.stride() == _time_major(seen['u']).stride()  # a time-major input gives a time-major output


def test_strided_D_and_delta_bias():
    # D and delta_bias as (dim,) views with stride 2, as a slice of a larger parameter would be
    seen = to_device(make_inputs(2, 16, 100, 4, seed=103), 'float32')
    every_other = {'D': lambda t: _every_other(t, 0), 'delta_bias': lambda t: _every_other(t, 0)}
    compare_with_reference(seen, cotangents(seen, 104), relayout=every_other)


# ------------------------------------------------------------------------------------ 3. determinism

def test_forward_is_deterministic_and_the_same_with_and_without_autograd():
    name = 'vim_layer_4x384x197_N16_z'
    seen = to_device(case_inputs(name, seed=105), 'float32')
    with torch.no_grad():
        runs = [selective_scan_triton(**seen, delta_softplus=True, return_last_state=True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    cot = cotangents(seen, 106)
    y, last, grads = scan_and_grads(selective_scan_triton, seen, cot)
    assert torch.equal(y, runs[0][0]) and torch.equal(last, runs[0][1])
    _, _, grads_again = scan_and_grads(selective_scan_triton, seen, cot)
    for key, g in grads.items():
        if key in ('B', 'C'):  # per-step B and C gradients are float32 atomics: summation order may vary
            assert_rel_close(grads_again[key], g, 1e-6, f'grad {key}')
        else:  # one program writes each element: bitwise
            assert torch.equal(grads_again[key], g), f'grad {key} differs between two identical runs'


# ------------------------------------------------------------------------------------- 4. dispatcher

def test_dispatcher_picks_triton_for_cuda_tensors(monkeypatch, poisoned_outputs):
    calls = []
    for backend, fn in list(SCAN_BACKENDS.items()):
        monkeypatch.setitem(SCAN_BACKENDS, backend,
                            lambda *a, _n=backend, _f=fn, **k: calls.append(_n) or _f(*a, **k))
    seen = to_device(case_inputs('vim_layer_4x384x197_N16_z', seed=107), 'float32')
    with torch.no_grad():
        y_triton = selective_scan_triton(**seen, delta_softplus=True)
        poisoned_outputs['calls'] = 0
        y = selective_scan(**seen, delta_softplus=True)  # backend None: the process-wide 'auto'
        assert calls == ['triton'] and poisoned_outputs['calls'] > 0
        assert torch.equal(y, y_triton)
        assert torch.equal(selective_scan(**seen, delta_softplus=True, backend='triton'), y_triton)
        # float64 CUDA tensors are left to the pure-PyTorch scan
        y64 = selective_scan(**as_float64(seen), delta_softplus=True)
    assert calls == ['triton', 'triton', 'chunked']
    assert y64.dtype == torch.float64 and y64.is_cuda
    check(y, y64, 'triton vs float64 chunked', FWD_TOL[F32])


# ------------------------------------------------------------------------------------- 5. torch.compile

@pytest.mark.parametrize('layout', ['contiguous', 'mixed'])
def test_torch_compile_fullgraph_inductor_equals_eager(layout):
    # the scan is one opaque custom op in the graph (fullgraph=True fails on any graph break); inductor fuses
    # the pointwise work around it and calls the op's real kernels, forward and backward
    torch._dynamo.reset()
    seen = to_device(make_inputs(2, 32, 129, 16, seed=109), 'float32')
    if layout == 'mixed':  # MambaVision's: u contiguous, delta a transposed view (gradients of other strides)
        seen['delta'] = _time_major(seen['delta'])

    def step(u, delta, A, B, C, D, z, delta_bias):
        y, last = selective_scan_triton(u * 2, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                        return_last_state=True)
        return (y + 1) * 0.5, last * 3

    compiled = torch.compile(step, fullgraph=True)
    x, x_eager = leaves(seen), leaves(seen)
    y, last = compiled(**x)
    y_eager, last_eager = step(**x_eager)
    assert_rel_close(y, y_eager, 1e-6)
    assert_rel_close(last, last_eager, 1e-6, 'last state')
    gy, glast = cotangents(seen, 110)
    torch.autograd.backward((y, last), (gy.float(), glast.float()))
    torch.autograd.backward((y_eager, last_eager), (gy.float(), glast.float()))
    for key in NAMES:
        assert x[key].grad is not None, f'grad {key} missing under torch.compile'
        assert_rel_close(x[key].grad, x_eager[key].grad, 1e-5, f'grad {key}')


# ------------------------------------------------------------------------------------- 6. CUDA graphs

def test_cuda_graph_capture_and_replay_forward_and_backward():
    name = 'vim_layer_4x384x197_N16_z'
    first = to_device(case_inputs(name, seed=111), 'float32')
    second = to_device(case_inputs(name, seed=112), 'float32')
    static = leaves(first)
    params = [static[k] for k in NAMES if static[k] is not None]
    gy, glast = (t.float() for t in cotangents(first, 113))

    def forward_backward():
        y, last = selective_scan_triton(**static, delta_softplus=True, return_last_state=True)
        grads = torch.autograd.grad((y, last), params, (gy, glast))
        return y, last, grads

    # warm up on a side stream (Triton compiles here, outside the capture), as torch.cuda.graphs' docs do
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward_backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, last, grads = forward_backward()
    with torch.no_grad():
        for key, value in second.items():
            if value is not None:
                static[key].copy_(value)
    graph.replay()
    torch.cuda.synchronize()

    y_eager, last_eager, grads_eager = scan_and_grads(selective_scan_triton, second, (gy.double(), glast.double()))
    assert torch.equal(y, y_eager) and torch.equal(last, last_eager)  # the same kernels on the same values
    for key, g in zip([k for k in NAMES if static[k] is not None], grads):
        assert_rel_close(g, grads_eager[key], 1e-5, f'grad {key}')


# ------------------------------------------------------------------------ 7. VMamba's fused cross scan

def test_fused_cross_scan_matches_float64_reference():
    import mambazoo.ops as ops
    cross_selective_scan = getattr(ops, 'cross_selective_scan', None)
    if cross_selective_scan is None:
        pytest.skip('no fused cross scan (mambazoo.ops.cross_selective_scan) in this version')
    batch, height, width, d_inner, rank, n_state = 2, 12, 17, 24, 4, 1  # not square: rows != columns; L 204
    gen = torch.Generator().manual_seed(115)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(shape, generator=gen, dtype=torch.float64)

    inputs = dict(
        x=randn(batch, d_inner, height, width).permute(0, 2, 3, 1),  # channels-last view of a (B, C, H, W) map
        dts=randn(batch, height, width, 4, rank, scale=0.5),
        dt_weight=randn(4, d_inner, rank, scale=0.5),
        A=-(0.05 + 1.95 * torch.rand((4 * d_inner, n_state), generator=gen, dtype=torch.float64)),
        B=randn(batch, height, width, 4, n_state),
        C=randn(batch, height, width, 4, n_state),
        D=randn(4 * d_inner),
        delta_bias=randn(4 * d_inner, scale=0.5),
    )
    seen = {k: v.to(device=DEVICE, dtype=F32) for k, v in inputs.items()}
    exact = {k: v.double() for k, v in seen.items()}
    gy = torch.randn((batch, height, width, d_inner), generator=gen, dtype=torch.float64).float().to(DEVICE)

    def run(values, backend):
        x = {k: v.detach().clone().requires_grad_() for k, v in values.items()}
        y = cross_selective_scan(**x, delta_softplus=True, backend=backend)
        grads = torch.autograd.grad(y, list(x.values()), gy.to(y.dtype))
        return y, dict(zip(x, grads))

    y, grads = run(seen, 'triton')
    y_ref, grads_ref = run(exact, 'ref')
    assert y.dtype == F32
    check(y, y_ref, 'cross scan output', FWD_TOL[F32])
    for key, g_ref in grads_ref.items():
        check(grads[key], g_ref, f'cross scan grad {key}', GRAD_TOL[F32])
