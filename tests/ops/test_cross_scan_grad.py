"""The compiled training path of ``cross_selective_scan`` (``ops.cross_scan_grad``): forward and every gradient
against autograd through the float64 reference, gradcheck of the kernels' float64 twin, and a tiny VMamba's
parameter gradients against the pure-PyTorch path.

Every comparison that means the compiled path checks that it ran (``train_calls``), and which thread split it
took: a silent fallback to the PyTorch path would pass unnoticed.
"""
import importlib

import pytest
import torch

import mambazoo
from helpers import assert_every_parameter_has_a_gradient, images, output_and_grads, perturb, rel_err
from mambazoo.ops import cross_scan_index, cross_selective_scan, scan_numba, scan_policy
from mambazoo.ops.cross_scan_grad import CHUNK_STEPS, cross_selective_scan_train
from test_scan_numba import _cross_inputs, count_calls

pytestmark = pytest.mark.skipif(not scan_numba.numba_importable(), reason='numba is not installed')

cross_scan_module = importlib.import_module('mambazoo.ops.cross_scan')  # the package exports a function of that name
grad_module = importlib.import_module('mambazoo.ops.cross_scan_grad')
NAMES = ('x', 'dts', 'dt_weight', 'A', 'B', 'C', 'D', 'delta_bias')
SPLITS = {scan_numba.CROSS_BY_CHANNELS: 'channels', scan_numba.CROSS_BY_BATCH: 'batch',
          scan_numba.CROSS_BY_DIRECTION: 'direction'}


@pytest.fixture
def train_calls(monkeypatch):
    """A list that grows by one at each run of the compiled training path."""
    return count_calls(monkeypatch, cross_scan_module, 'cross_selective_scan_train')


@pytest.fixture
def splits(monkeypatch):
    """The thread splits the training kernels took ('batch', 'direction', 'channels'), one per kernel call."""
    taken = []
    real = grad_module._split

    def recording(*args):
        split = real(*args)
        taken.append(SPLITS[split[0]])
        return split
    monkeypatch.setattr(grad_module, '_split', recording)
    return taken


def leaves(inputs, dtype, requires=NAMES):
    return {k: None if v is None else v.detach().to(dtype).requires_grad_(k in requires) for k, v in inputs.items()}


def run(inputs, cotangent, softplus, **kwargs):
    """(output, {name: gradient}) of <cross_selective_scan(inputs), cotangent>."""
    y = cross_selective_scan(**inputs, delta_softplus=softplus, **kwargs)
    grads = torch.autograd.grad(y, [v for v in inputs.values() if v is not None and v.requires_grad], cotangent)
    return y.detach(), dict(zip([k for k, v in inputs.items() if v is not None and v.requires_grad], grads))


def float64_reference(inputs, cotangent, softplus):
    return run(leaves(inputs, torch.float64), cotangent.double(), softplus, backend='ref')


def assert_matches_reference(got, want, tol):
    """Each gradient within ``tol`` of the reference, relative to that gradient's own scale (L2)."""
    (y, grads), (y_ref, grads_ref) = got, want
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    errors = {'output': rel_err(y, y_ref)}
    for name, g_ref in grads_ref.items():
        assert grads[name].shape == g_ref.shape and grads[name].dtype == torch.float32, name
        assert torch.isfinite(grads[name]).all(), f'{name}: non-finite gradient'
        errors[name] = rel_err(grads[name], g_ref) if g_ref.norm() > 0 else grads[name].norm().item()
    assert max(errors.values()) < tol, {k: f'{v:.1e}' for k, v in errors.items()}


# (batch, H, W, d, R, N, threads, the split the kernels take)
CASES = [
    (1, 1, 1, 16, 2, 1, 1, 'channels'),  # a 1x1 map: one step per direction
    (3, 5, 7, 32, 3, 4, 1, 'channels'),  # non-square, L = 35 < CHUNK_STEPS, N = 4
    (1, 13, 10, 16, 2, 1, 1, 'channels'),  # L = 130: chunks of 44, 44 and 42 steps
    (3, 8, 16, 20, 2, 1, 2, 'batch'),  # L = 128: two chunks of 64; d not a multiple of 16
    (1, 12, 11, 24, 4, 4, 2, 'direction'),  # L = 132, N = 4: each task adds into a dx of its own
    (2, 10, 7, 48, 3, 1, 5, 'channels'),  # three channel tasks: per-task dts/B/C gradients, summed
    (3, 6, 6, 16, 1, 1, 2, 'batch'),  # R = 1
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: 'b{}_{}x{}_d{}_r{}_n{}_t{}'.format(*c[:7]))
def test_forward_and_gradients_match_the_float64_reference(case, train_calls, splits, set_policy):
    batch, height, width, d, rank, n_state, threads, split = case
    if threads > 1 and scan_numba._gomp_parallel() is None:
        pytest.skip('PyTorch does not use libgomp here: the kernels run on one thread')
    set_policy(scan_threads=threads)
    inputs = _cross_inputs(batch, height, width, d, rank, n_state, seed=sum(case[:6]))
    cotangent = images(batch, height, width, d, seed=3)
    got = run(leaves(inputs, torch.float32), cotangent, True)
    assert train_calls == [1] and splits == [split, split]
    assert_matches_reference(got, float64_reference(inputs, cotangent, True), 1e-5)


@pytest.mark.parametrize('chunk_steps', [1, 5])
def test_many_short_chunks(chunk_steps, monkeypatch, train_calls):
    """Chunks of one step, and L = 42 in chunks of 5 (the last of 2): every chunk boundary is a state saved by the
    forward and restored by the backward."""
    monkeypatch.setattr(grad_module, 'CHUNK_STEPS', chunk_steps)
    inputs = _cross_inputs(2, 6, 7, 16, 2, 3, seed=13)
    cotangent = images(2, 6, 7, 16, seed=6)
    got = run(leaves(inputs, torch.float32), cotangent, True)
    assert train_calls
    assert_matches_reference(got, float64_reference(inputs, cotangent, True), 1e-5)


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('present', ['D', 'delta_bias', 'neither'])
def test_without_softplus_and_optional_inputs(present, threads, train_calls, set_policy):
    set_policy(scan_threads=threads)
    inputs = _cross_inputs(2, 9, 8, 16, 2, 2, seed=7)
    for name in ('dts', 'dt_weight', 'delta_bias'):
        inputs[name] = inputs[name].abs()  # positive step sizes
    for name in ('D', 'delta_bias'):
        if name != present:
            inputs[name] = None
    cotangent = images(2, 9, 8, 16, seed=4)
    got = run(leaves(inputs, torch.float32), cotangent, False)
    assert train_calls
    assert_matches_reference(got, float64_reference(inputs, cotangent, False), 1e-5)


def test_gradients_of_some_inputs_only(train_calls):
    """Inputs that do not require a gradient get none; the others are unchanged (SS2D with frozen parameters)."""
    inputs = _cross_inputs(1, 6, 5, 16, 2, 1, seed=8)
    cotangent = images(1, 6, 5, 16, seed=5)
    (_, grads), (_, grads_ref) = (run(leaves(inputs, dtype, requires=('x', 'B')), cotangent.to(dtype), True,
                                      **kwargs) for dtype, kwargs in ((torch.float32, {}),
                                                                      (torch.float64, {'backend': 'ref'})))
    assert train_calls and sorted(grads) == ['B', 'x']
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < 1e-5, name


def test_nothing_of_the_size_of_the_states_is_saved():
    """The graph keeps the inputs' float32 copies and one state per chunk, not a (batch, d, L, N) tensor."""
    batch, height, width, d, n_state = 2, 16, 12, 32, 4
    inputs = leaves(_cross_inputs(batch, height, width, d, 2, n_state, seed=9), torch.float32)
    y = cross_selective_scan(**inputs, delta_softplus=True)
    saved = y.grad_fn.saved_tensors
    length, chunks = height * width, -(-height * width // CHUNK_STEPS)
    states = [t for t in saved if t.shape == (batch * 4, chunks, n_state, d)]
    assert len(states) == 1
    inputs_size = sum(v.numel() for v in inputs.values())
    assert sum(t.numel() for t in saved) <= inputs_size + states[0].numel() + 2 * 4 * d * n_state + 4 * length
    assert max(t.numel() for t in saved) < batch * 4 * d * length * n_state


def test_inference_and_the_pytorch_path_do_not_take_it(train_calls, monkeypatch):
    inference_calls = count_calls(monkeypatch, cross_scan_module, 'run_cross_scan_kernel')
    inputs = leaves(_cross_inputs(1, 4, 4, 16, 2, 1, seed=10), torch.float32)
    with torch.no_grad():
        cross_selective_scan(**inputs, delta_softplus=True)
    assert inference_calls == [1] and not train_calls
    with scan_policy(compiled_cpu=False):
        cross_selective_scan(**inputs, delta_softplus=True).sum().backward()
    assert inference_calls == [1] and not train_calls and inputs['x'].grad is not None


@pytest.mark.parametrize('shape, softplus, optional', [((1, 2, 3, 4, 2, 1), True, True),
                                                       ((2, 3, 2, 3, 1, 2), True, False),
                                                       ((1, 1, 2, 5, 2, 1), False, True)])
def test_gradcheck_float64(shape, softplus, optional):
    """The kernels in float64 (a numba specialisation of the same code, run on one thread): gradcheck of every
    input. exp2 and softplus stay float32-accurate polynomials, smooth to well within gradcheck's tolerances."""
    batch, height, width = shape[:3]
    inputs = leaves(_cross_inputs(*shape, seed=11, dtype=torch.float64), torch.float64)
    if not softplus:
        inputs['dts'] = inputs['dts'].detach().abs().requires_grad_()
        inputs['dt_weight'] = inputs['dt_weight'].detach().abs().requires_grad_()
    if not optional:
        inputs['D'] = inputs['delta_bias'] = None
    positions = cross_scan_index(height, width)

    def fn(*tensors):
        return cross_selective_scan_train(*tensors, softplus, positions)
    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in NAMES), atol=1e-6, rtol=1e-4)


def test_bad_shapes_raise():
    inputs = _cross_inputs(1, 3, 4, 16, 2, 1, seed=12)
    positions = cross_scan_index(3, 4)
    with pytest.raises(ValueError, match='B must have shape'):
        cross_selective_scan_train(**{**inputs, 'B': inputs['B'][..., :3, :]}, delta_softplus=True,
                                   positions=positions)
    with pytest.raises(ValueError, match='positions'):
        cross_selective_scan_train(**inputs, delta_softplus=True, positions=positions + 1)


def test_tiny_vmamba_parameter_gradients_equal_the_pytorch_path(train_calls):
    """A training step of a tiny VMamba v2 (N = 1), compiled backward vs the pure-PyTorch one: same gradients."""
    model = perturb(mambazoo.create_model('vmamba_tiny', dims=8, depths=[1, 1, 2, 1], drop_path_rate=0.)).train()
    x = images(2, 3, 64, 48)  # stage maps 16x12 (L = 192: three chunks) down to 2x1
    out, grads = output_and_grads(model, x)
    assert len(train_calls) == 5
    with scan_policy(compiled_cpu=False):
        out_ref, grads_ref = output_and_grads(model, x)
    assert len(train_calls) == 5
    assert_every_parameter_has_a_gradient(model)
    assert rel_err(out, out_ref) < 1e-5
    errors = {name: rel_err(grads[name], grads_ref[name]) for name in grads_ref}
    assert max(errors.values()) < 1e-4, {k: f'{v:.1e}' for k, v in errors.items() if v >= 1e-5}
