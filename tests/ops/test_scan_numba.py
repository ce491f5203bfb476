"""The compiled CPU scan (``scan_numba``), which the chunked backend runs for float32 inference on CPU.

Every comparison is against the float64 sequential reference on the same (float32-representable) inputs, and
every test that means the compiled kernel checks that it ran (``kernel_calls``): a silent fallback to the
pure-PyTorch path would otherwise pass unnoticed.
"""
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import spy
from mambazoo.ops import scan_numba, selective_scan, selective_scan_ref
from test_selective_scan import assert_rel_close, cast, make_inputs

pytestmark = pytest.mark.skipif(not scan_numba.numba_importable(), reason='numba is not installed')


def count_calls(monkeypatch, module, name):
    """Replace module.name by a wrapper that appends to the returned list at each call."""
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that grows by one at each run of the compiled kernel."""
    return count_calls(monkeypatch, scan_numba, 'run_scan_kernel')


def time_major(x):
    """The same values as a (batch, dim, L) view of time-major (L, batch, dim) memory, as the Mamba mixer holds."""
    return None if x is None else x.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def reference(inputs, **flags):
    return selective_scan_ref(**cast(inputs, torch.float64), **flags)


CASES = [
    # batch, dim, L, N, form of B and C, options
    (1, 384, 197, 16, 'var', {}),  # Vim-T's scan
    (2, 40, 50, 16, 'var', {}),  # dim not a multiple of the threads' 16-channel blocks
    (2, 24, 33, 1, 4, {'z': False}),  # VMamba: N = 1, four groups (directions), no gate
    (3, 8, 1, 4, 2, {}),  # one step
    (1, 48, 300, 3, 'var', {'D': False, 'delta_bias': False}),
    (2, 32, 64, 5, 'var', {'softplus': False, 'delta_range': (0.0, 3.0)}),
]


@pytest.mark.parametrize('layout', ['contiguous', 'time_major'])
@pytest.mark.parametrize('batch,dim,length,n_state,form,options', CASES)
def test_compiled_kernel_matches_reference(batch, dim, length, n_state, form, options, layout, kernel_calls):
    softplus = options.get('softplus', True)
    inputs = cast(make_inputs(batch, dim, length, n_state, b_form=form, c_form=form, seed=dim + length,
                              **options), torch.float32)
    if layout == 'time_major':
        inputs = {k: time_major(v) if k in ('u', 'delta', 'z') else v for k, v in inputs.items()}
    with torch.no_grad():
        y, last = selective_scan(**inputs, delta_softplus=softplus, return_last_state=True)
    assert kernel_calls, 'the compiled kernel did not run'
    y_ref, last_ref = reference(inputs, delta_softplus=softplus, return_last_state=True)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and last.shape == last_ref.shape
    assert_rel_close(y, y_ref, 2e-6)
    assert_rel_close(last, last_ref, 2e-6, 'last state')
    # the output layout of the pure-PyTorch path (what the custom op's fake declares)
    assert (y.permute(2, 0, 1) if layout == 'time_major' else y).is_contiguous()


@pytest.mark.parametrize('threads', ['1', '2', '3'])
def test_thread_count_does_not_change_the_result(threads, kernel_calls, monkeypatch, set_policy):
    """MAMBAZOO_SCAN_THREADS forces the channel split (small calls otherwise run on one thread)."""
    inputs = cast(make_inputs(2, 72, 40, 4, seed=3), torch.float32)
    with torch.no_grad():
        set_policy(scan_threads=int(threads))
        y = selective_scan(**inputs, delta_softplus=True)
        set_policy(scan_threads=1)
        y1 = selective_scan(**inputs, delta_softplus=True)
    assert len(kernel_calls) == 2
    assert torch.equal(y, y1)  # each channel is computed the same way whichever thread runs it
    assert_rel_close(y, reference(inputs, delta_softplus=True), 2e-6)


def test_task_ranges_are_whole_simd_blocks_covering_every_unit():
    def ranges(units, tasks, align=16):
        return [tuple(scan_numba._task_bounds(k, tasks, units, align)) for k in range(tasks)]
    assert ranges(72, 2) == [(0, 32), (32, 72)]
    assert ranges(768, 3) == [(0, 256), (256, 512), (512, 768)]
    assert ranges(40, 1) == [(0, 40)]
    assert ranges(5, 2, align=1) == [(0, 2), (2, 5)]


@pytest.mark.skipif(scan_numba._gomp_parallel() is None, reason="PyTorch does not use libgomp here")
@pytest.mark.parametrize('name', ['scan', 'scan_one_image', 'scan_wide', 'cross', 'cross_one_image', 'conv', 'mixer'])
def test_calls_split_in_pytorchs_openmp_threads(name, monkeypatch):
    """Above MIN_PARALLEL_WORK, every kernel runs as tasks in PyTorch's OpenMP threads; same results as one
    (the cross scan of one image is split by directions: their outputs are then added in another order). The scan
    of a batch with few channels (a thread's 36 x N = 4 states: under SCAN_BATCH_SPLIT_BELOW) is split by its
    elements, of one image or of many channels (400 x 4) by channels."""
    from mambazoo.ops import cross_selective_scan
    regions = []
    real = scan_numba._gomp_parallel()
    monkeypatch.setattr(scan_numba, '_gomp_parallel', lambda: lambda *a: regions.append(a[2]) or real(*a))
    monkeypatch.setattr(scan_numba, 'MIN_PARALLEL_WORK', 1)
    launches = spy(monkeypatch, scan_numba, '_launch', lambda kernel, arrays, flags, units, *_: (kernel, flags, units))
    if name.startswith('scan'):
        batch, dim = (1 if name == 'scan_one_image' else 3), (800 if name == 'scan_wide' else 72)
        inputs = cast(make_inputs(batch, dim, 40, 4, z=True, seed=12), torch.float32)
        run = lambda: selective_scan(**inputs, delta_softplus=True)  # noqa: E731
    elif name.startswith('cross'):
        inputs = _cross_inputs(1 if name == 'cross_one_image' else 2, 5, 4, 48, 4, 2, seed=13)
        run = lambda: cross_selective_scan(**inputs, delta_softplus=True)  # noqa: E731
    elif name == 'conv':
        xz, w, b = torch.randn(2, 30, 160), torch.randn(160, 1, 4), torch.randn(160)
        run = lambda: scan_numba.run_mixer_conv_silu(xz, w, b)  # noqa: E731
    else:
        inputs = _mixer_inputs(2, 30, 80, 4, 2, seed=14)
        run = lambda: scan_numba.run_mixer_scan(**inputs, divide=True)  # noqa: E731
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            split = run()
        assert regions == [2]
        torch.set_num_threads(1)
        with torch.no_grad():
            single = run()
        assert regions == [2]  # one thread: no parallel region
    finally:
        torch.set_num_threads(before)
    if name == 'cross_one_image':
        assert_rel_close(split, single, 1e-6)
    else:
        assert torch.equal(split, single)
    if name == 'scan':  # the gate's bit, and the split's by batch elements, over the 3 of them; one thread: channels
        assert [(f[1], units) for _, f, units in launches] == [(1 | scan_numba.SCAN_BY_BATCH, 3), (1, 72)]
    elif name.startswith('scan'):
        assert [(f[1], units) for _, f, units in launches] == [(1, dim), (1, dim)]


def test_importing_the_kernels_compiles_no_task():
    """Each task compiles at its first launch (``compiled_task``), so a fresh checkout's first run pays only for
    the kernels its model runs (MambaVision: the scan's), not for all ten (~100 s on 2 cores). Checked in a new
    interpreter, whose imports would have compiled eagerly declared tasks."""
    import subprocess
    import sys
    code = ('from mambazoo.ops import scan_numba, scan_numba_grad, cross_scan_grad\n'
            'print(len(scan_numba._TASKS), [n for n, t in scan_numba._TASKS.items() if t._cfunc is not None])\n')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['11', '[]']


def _task_doing_nothing(data):
    pass


def test_a_stale_cache_index_is_emptied_and_the_task_compiled(monkeypatch):
    """numba unpickles a cache index before checking it against the source, so an index left by another version
    of the kernel files (one naming a class since renamed) raises instead of being ignored; the task empties the
    package's cache indexes and compiles again, once."""
    attempts = []
    real_cfunc = scan_numba.numba.cfunc

    def cfunc(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise AttributeError("Can't get attribute 'Scratch' on <module 'mambazoo.ops.scan_numba_grad'>")
        return real_cfunc(*args, **kwargs)
    monkeypatch.setattr(scan_numba.numba, 'cfunc', cfunc)
    flushes = spy(monkeypatch, scan_numba, '_flush_kernel_caches')
    assert scan_numba.compiled_task(_task_doing_nothing).address
    assert len(attempts) == 2 and len(flushes) == 1


@pytest.mark.parametrize('threads', [1, 2])
def test_launch_refuses_arrays_the_task_would_misread(threads):
    arrays = [np.zeros((4, 1, 32), np.float32)] * 3 + [np.zeros((2, 32), np.float32)] + \
             [np.zeros((4, 1, 1, 2), np.float32)] * 2 + [np.zeros(32, np.float32)] * 2 + \
             [np.zeros((1, 2, 32), np.float32), np.zeros((4, 1, 32), np.float64)]  # y in float64
    with pytest.raises(ValueError, match='expected 3-d f4'):
        scan_numba._launch('scan', arrays, (False, False), 32, threads)


def test_half_precision_inputs_accumulate_in_float32(kernel_calls):
    inputs = cast(make_inputs(2, 32, 60, 8, seed=5), torch.float16)
    with torch.no_grad():
        y = selective_scan(**inputs, delta_softplus=True)
    assert kernel_calls and y.dtype == torch.float16
    assert_rel_close(y, reference(inputs, delta_softplus=True), 5e-3)


def test_extreme_steps(kernel_calls):
    """Decays that underflow (delta*A far below -126 in log2) and steps above softplus's threshold of 20."""
    inputs = cast(make_inputs(1, 16, 120, 4, seed=7, A_range=(-50.0, -0.01)), torch.float32)
    inputs['delta'] = inputs['delta'] * 60  # pre-activations from about -90 to 90
    with torch.no_grad():
        y = selective_scan(**inputs, delta_softplus=True)
    assert kernel_calls
    assert_rel_close(y, reference(inputs, delta_softplus=True), 1e-5)


@pytest.mark.parametrize('name', ['u', 'delta', 'z'])
def test_nan_propagates_like_the_reference(name, kernel_calls):
    inputs = cast(make_inputs(1, 16, 20, 4, seed=8), torch.float32)
    inputs[name][0, 3, 5] = math.nan
    with torch.no_grad():
        y = selective_scan(**inputs, delta_softplus=True)
    assert kernel_calls
    expected = reference(inputs, delta_softplus=True)
    assert expected.isnan().any()
    assert torch.equal(y.isnan(), expected.isnan())


@pytest.mark.parametrize('case', ['float64', 'fixed_B', 'mixed_groups', 'disabled'])
def test_other_scans_take_the_pytorch_path(case, kernel_calls, monkeypatch, set_policy):
    """What the kernel does not take (float64, a fixed B, B and C with different group counts, or
    MAMBAZOO_NUMBA=0) runs the pure-PyTorch path, with the same results. (Autograd runs the compiled training
    kernels: tests/ops/test_scan_numba_grad.py.)"""
    options = {'fixed_B': dict(b_form='fixed'), 'mixed_groups': dict(b_form=2, c_form='var')}.get(case, {})
    inputs = make_inputs(2, 8, 30, 4, seed=9, **options)
    if case != 'float64':
        inputs = cast(inputs, torch.float32)
    if case == 'disabled':
        set_policy(compiled_cpu=False)
    with torch.no_grad():
        y = selective_scan(**inputs, delta_softplus=True)
    assert not kernel_calls
    assert_rel_close(y, reference(inputs, delta_softplus=True), 1e-10 if case == 'float64' else 1e-5)


def test_dispatcher_auto_runs_the_kernel_on_cpu(kernel_calls):
    inputs = cast(make_inputs(1, 16, 20, 4, seed=10), torch.float32)
    with torch.no_grad():
        selective_scan(**inputs, delta_softplus=True)
    assert kernel_calls


def test_kernel_agrees_with_the_pytorch_path(monkeypatch, set_policy):
    """The two float32 inference paths of the chunked backend, on a model-sized scan."""
    inputs = cast(make_inputs(2, 96, 160, 16, seed=11), torch.float32)
    with torch.no_grad():
        y_kernel, last_kernel = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
        set_policy(compiled_cpu=False)
        y_torch, last_torch = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert_rel_close(y_kernel, y_torch, 2e-6)
    assert_rel_close(last_kernel, last_torch, 2e-6, 'last state')


def _kernel_args(length=4, batch=1, dim=16, N=2, groups=1):
    return dict(u=torch.zeros(length, batch, dim), delta=torch.zeros(length, batch, dim), z=None,
                A=-torch.ones(dim, N), B=torch.zeros(length, batch, groups, N), C=torch.zeros(length, batch, groups, N),
                D=None, delta_bias=None, delta_softplus=False, h=torch.zeros(batch, N, dim),
                y=torch.empty(length, batch, dim))


def test_run_scan_kernel_runs_on_valid_arguments():
    args = _kernel_args()
    args['y'].fill_(math.nan)
    scan_numba.run_scan_kernel(**args)
    assert torch.equal(args['y'], torch.zeros(4, 1, 16))  # zero inputs: every output written, all zero


@pytest.mark.parametrize('name,bad,match', [
    ('y', torch.empty(4, 1, 32)[..., ::2], 'contiguous'),
    ('y', torch.empty(1, 4, 16), 'y must have shape'),  # a size-1 transpose: contiguous, wrong shape
    ('h', torch.zeros(1, 16, 2), 'h must have shape'),
    ('B', torch.zeros(4, 1, 1, 3), 'B must have shape'),
    ('B', torch.zeros(4, 1, 3, 2), 'groups do not divide'),
    ('delta', torch.zeros(3, 1, 16), 'delta must have shape'),
])
def test_run_scan_kernel_refuses_bad_arguments(name, bad, match):
    """The compiled loop has no bounds checks: its launcher must refuse what would write out of bounds."""
    args = _kernel_args()
    args[name] = bad
    if name == 'B' and match.startswith('groups'):
        args['C'] = torch.zeros(4, 1, 3, 2)
    with pytest.raises(ValueError, match=match):
        scan_numba.run_scan_kernel(**args)


# ----------------------------------------------------------------------------------- the cross scan kernel

def _cross_inputs(batch, height, width, d, rank, n_state, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return dict(x=randn(batch, d, height, width).permute(0, 2, 3, 1),  # channels-last view, as VMamba has it
                dts=randn(batch, height, width, 4, rank, scale=0.5), dt_weight=randn(4, d, rank, scale=0.5),
                A=-(0.05 + torch.rand(4 * d, n_state, generator=gen, dtype=torch.float64) * 2).to(dtype),
                B=randn(batch, height, width, 4, n_state), C=randn(batch, height, width, 4, n_state),
                D=randn(4 * d), delta_bias=randn(4 * d, scale=0.5))


@pytest.fixture
def cross_kernel_calls(monkeypatch):
    # the module (the package exports a function of the same name)
    return count_calls(monkeypatch, importlib.import_module('mambazoo.ops.cross_scan'), 'run_cross_scan_kernel')


@pytest.mark.parametrize('threads', ['1', '2'])
@pytest.mark.parametrize('shape', [(1, 6, 9, 32, 3, 1), (2, 5, 4, 48, 4, 4), (1, 1, 7, 16, 2, 2), (3, 3, 3, 20, 2, 1)])
def test_cross_kernel_matches_reference(shape, threads, cross_kernel_calls, monkeypatch, set_policy):
    from mambazoo.ops import cross_selective_scan
    set_policy(scan_threads=int(threads))
    inputs = _cross_inputs(*shape, seed=sum(shape))
    with torch.no_grad():
        y = cross_selective_scan(**inputs, delta_softplus=True)
    assert cross_kernel_calls, 'the compiled cross kernel did not run'
    expected = cross_selective_scan(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True, backend='ref')
    assert y.dtype == torch.float32 and y.shape == expected.shape
    assert_rel_close(y, expected, 2e-6)


def test_cross_kernel_without_softplus_and_optional_inputs(cross_kernel_calls):
    from mambazoo.ops import cross_selective_scan
    inputs = _cross_inputs(2, 4, 6, 16, 2, 3, seed=5)
    inputs['dts'] = inputs['dts'].abs()  # positive step sizes: no softplus
    inputs['dt_weight'] = inputs['dt_weight'].abs()
    inputs.update(D=None, delta_bias=None)
    with torch.no_grad():
        y = cross_selective_scan(**inputs)
    assert cross_kernel_calls
    expected = cross_selective_scan(**{k: None if v is None else v.double() for k, v in inputs.items()},
                                    backend='ref')
    assert_rel_close(y, expected, 2e-6)


def test_cross_scan_with_autograd_keeps_off_the_inference_kernel(cross_kernel_calls):
    """Under autograd the training kernels run (tests/ops/test_cross_scan_grad.py), not the inference one."""
    from mambazoo.ops import cross_selective_scan
    inputs = _cross_inputs(1, 4, 4, 16, 2, 1, seed=6)
    inputs['x'] = inputs['x'].detach().requires_grad_()
    y = cross_selective_scan(**inputs, delta_softplus=True)
    y.sum().backward()
    assert not cross_kernel_calls and inputs['x'].grad is not None


@pytest.mark.parametrize('rank', [1, 6])
def test_cross_kernel_on_views_of_one_projection(rank, cross_kernel_calls):
    """As SS2D calls it: the step inputs, B and C are slices of one x_proj output (B, H, W, 4, R + 2N)."""
    from mambazoo.ops import cross_selective_scan
    gen = torch.Generator().manual_seed(rank)
    batch, height, width, d, n_state = 2, 5, 7, 24, 1
    inputs = _cross_inputs(batch, height, width, d, rank, n_state, seed=rank + 40)
    x_dbl = torch.randn(batch, height, width, 4, rank + 2 * n_state, generator=gen)
    inputs['dts'], inputs['B'], inputs['C'] = torch.split(x_dbl, [rank, n_state, n_state], dim=4)
    with torch.no_grad():
        y = cross_selective_scan(**inputs, delta_softplus=True)
    assert cross_kernel_calls
    expected = cross_selective_scan(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True, backend='ref')
    assert_rel_close(y, expected, 2e-6)


def test_cross_kernel_refuses_bad_arguments():
    length = 6
    args = dict(x=torch.zeros(1, length, 16), dts=torch.zeros(1, length, 4, 2), dt_weight=torch.zeros(4, 16, 2),
                A=-torch.ones(64, 1), B=torch.zeros(1, length, 4, 1), C=torch.zeros(1, length, 4, 1), D=None,
                delta_bias=None, delta_softplus=False)
    good = torch.arange(length).repeat(4, 1)
    bad = good.clone()
    bad[2, 3] = length  # one past the end: would write outside the output
    with pytest.raises(ValueError, match='positions'):
        scan_numba.run_cross_scan_kernel(**args, positions=bad)
    for name, value in (('dts', torch.zeros(1, length, 4, 3)), ('dt_weight', torch.zeros(4, 8, 2)),
                        ('B', torch.zeros(1, length, 4, 2)), ('positions', good[:, :-1])):
        with pytest.raises(ValueError, match=f'{name} must have shape'):
            scan_numba.run_cross_scan_kernel(**{**args, 'positions': good, name: value})


# ------------------------------------------------------------------------- the kernel's exp2 and softplus

def _elementwise(fn_name, x):
    import numba

    fn = getattr(scan_numba, fn_name)

    @numba.njit(error_model='numpy')
    def apply(values, out):
        for i in range(values.shape[0]):
            out[i] = fn(values[i])

    out = np.empty_like(x)
    apply(x, out)
    return out


def test_exp2_is_within_two_ulps():
    x = np.concatenate([np.linspace(-125.9, 127.4, 400_003), np.random.default_rng(0).normal(0, 3, 10_000)])
    x = x.astype(np.float32)
    got = _elementwise('_exp2', x).astype(np.float64)
    expected = np.exp2(x.astype(np.float64))
    ulp = np.spacing(expected.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - expected) / ulp) <= 2.0


def test_exp2_limits():
    x = np.array([-1000.0, -126.0, 0.0, 127.0, 128.0, 1000.0, np.nan, -np.inf, np.inf], np.float32)
    got = _elementwise('_exp2', x)
    assert got[0] == got[1] == np.float32(2.0 ** -126)  # clamped, documented
    assert got[2] == 1.0 and got[3] == np.float32(2.0 ** 127)
    assert np.isinf(got[4]) and np.isinf(got[5]) and np.isinf(got[8])
    assert np.isnan(got[6])
    assert got[7] == np.float32(2.0 ** -126)


def test_softplus_matches_float64():
    x = np.concatenate([np.linspace(-87.0, 40.0, 200_003), [-1e-30, 0.0, 1e-30, 19.999, 20.0, 20.001],
                        np.random.default_rng(1).normal(0, 1e-3, 10_000)]).astype(np.float32)
    got = _elementwise('_softplus', x).astype(np.float64)
    xd = x.astype(np.float64)
    expected = np.logaddexp(0.0, xd)
    rel = np.abs(got - expected) / expected
    # the same bound as the pure-PyTorch softplus: exp2 of a rounded -|x|*log2(e) (|x| ulps), plus a few ulps
    bound = (np.abs(xd) + 4) * np.finfo(np.float32).eps
    assert np.all(rel <= bound), np.max(rel / bound)
    assert np.isnan(_elementwise('_softplus', np.array([np.nan], np.float32)))[0]


# ------------------------------------------------- the Mamba mixer's kernels: conv1d + SiLU, two-direction scan

def _mixer_conv_reference(xz, weight, bias):
    """silu(depthwise conv1d) by F.conv1d in float64 on the (batch, C, L) layout, an independent path: the first
    branch causal on x = xz[..., :d], the second (if any) the causal conv of the time-reversed x, reversed back."""
    d, k = xz.shape[2] // 2, weight.shape[-1]
    x = xz[..., :d].double().transpose(1, 2)
    outs = []
    for branch in range(weight.shape[0] // d):
        w = weight[branch * d:(branch + 1) * d].double()
        b = None if bias is None else bias[branch * d:(branch + 1) * d].double()
        xb = x if branch == 0 else x.flip(-1)
        y = F.conv1d(xb, w, b, padding=k - 1, groups=d)[..., :x.shape[-1]]
        outs.append(y if branch == 0 else y.flip(-1))
    return F.silu(torch.cat(outs, dim=1)).transpose(1, 2)


@pytest.mark.parametrize('batch,length,d,k,branches,bias', [
    (1, 197, 384, 4, 2, True), (3, 30, 40, 4, 2, False), (2, 2, 16, 4, 2, True), (1, 1, 24, 3, 1, True),
    (2, 25, 33, 2, 1, True), (2, 9, 20, 4, 1, False)])
def test_mixer_conv_kernel_matches_conv1d(batch, length, d, k, branches, bias):
    gen = torch.Generator().manual_seed(length + d)
    xz = torch.randn(batch, length, 2 * d, generator=gen)
    weight = torch.randn(branches * d, 1, k, generator=gen) * 0.5
    b = torch.randn(branches * d, generator=gen) if bias else None
    got = scan_numba.run_mixer_conv_silu(xz, weight, b)
    assert got.shape == (batch, length, branches * d) and got.dtype == torch.float32
    assert_rel_close(got, _mixer_conv_reference(xz, weight, b), 2e-6)


def _mixer_inputs(batch, length, d, n_state, branches, rank=3, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, lo=-1.0, hi=1.0):
        return torch.rand(*shape, generator=gen) * (hi - lo) + lo

    return dict(u=rand(batch, length, branches * d),
                deltas=[rand(batch, length, d, lo=-3.0, hi=1.0) for _ in range(branches)],
                projections=[rand(batch, length, rank + 2 * n_state) for _ in range(branches)],
                xz=rand(batch, length, 2 * d, lo=-3.0, hi=3.0), A=-rand(branches * d, n_state, lo=0.05, hi=4.0),
                D=rand(branches * d), delta_bias=rand(branches * d, lo=-2.0, hi=0.5), dt_rank=rank)


def _mixer_scan_reference(inputs, divide):
    """The mixer's scan from the float64 sequential reference: branch 0 forwards, branch 1 on the reversed
    sequence (reversed back), each gated by silu(z), summed (and halved)."""
    x = {k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    d, rank = x['xz'].shape[2] // 2, x['dt_rank']
    n_state = x['A'].shape[1]
    z = x['xz'][..., d:].transpose(1, 2)
    total = 0
    for branch, (delta, proj) in enumerate(zip(inputs['deltas'], inputs['projections'])):
        ch = slice(branch * d, (branch + 1) * d)
        flip = (lambda t: t.flip(-1)) if branch else (lambda t: t)
        proj = proj.double().transpose(1, 2)
        y = selective_scan_ref(flip(x['u'][..., ch].transpose(1, 2)), flip(delta.double().transpose(1, 2)),
                               x['A'][ch], flip(proj[:, rank:rank + n_state]), flip(proj[:, rank + n_state:]),
                               x['D'][ch], z=flip(z), delta_bias=x['delta_bias'][ch], delta_softplus=True)
        total = total + flip(y)
    if divide and len(inputs['deltas']) == 2:
        total = total / 2
    return total.transpose(1, 2)


@pytest.mark.parametrize('threads', ['1', '2'])
@pytest.mark.parametrize('batch,length,d,n_state,branches,divide', [
    (1, 197, 384, 16, 2, True),  # Vim-T's layer
    (2, 33, 40, 16, 2, False),  # d not a multiple of the threads' 16-channel blocks
    (3, 1, 32, 4, 2, True),  # one step
    (2, 50, 48, 1, 1, False),  # one direction (the hybrid's mixer), N = 1
    (1, 20, 24, 5, 1, True),  # divide means nothing with one branch
])
def test_mixer_scan_kernel_matches_reference(batch, length, d, n_state, branches, divide, threads, monkeypatch, set_policy):
    set_policy(scan_threads=int(threads))
    inputs = _mixer_inputs(batch, length, d, n_state, branches, seed=length + d)
    got = scan_numba.run_mixer_scan(**inputs, divide=divide)
    assert got.shape == (batch, length, d) and got.dtype == torch.float32
    assert_rel_close(got, _mixer_scan_reference(inputs, divide), 2e-5)


@pytest.mark.parametrize('where', ['u_forward', 'u_backward', 'delta_backward', 'z'])
def test_mixer_scan_nan_propagates_like_the_reference(where):
    inputs = _mixer_inputs(1, 12, 16, 4, 2, seed=3)
    d = 16
    if where == 'u_forward':
        inputs['u'][0, 4, 2] = math.nan
    elif where == 'u_backward':
        inputs['u'][0, 4, d + 2] = math.nan
    elif where == 'delta_backward':
        inputs['deltas'][1][0, 7, 5] = math.nan
    else:
        inputs['xz'][0, 6, d + 1] = math.nan
    got = scan_numba.run_mixer_scan(**inputs, divide=True)
    expected = _mixer_scan_reference(inputs, True)
    assert expected.isnan().any() and not expected.isnan().all()
    assert torch.equal(got.isnan(), expected.isnan())


@pytest.mark.parametrize('change,match', [
    (lambda x: x.update(u=x['u'][..., :-1]), 'u must have shape'),
    (lambda x: x.update(deltas=[x['deltas'][0], x['deltas'][1][:, :-1]]), r'deltas\[1\] must have shape'),
    (lambda x: x.update(projections=[p[..., :-1] for p in x['projections']]), r'projections\[0\] must'),
    (lambda x: x.update(xz=x['xz'][:1]), 'xz must have shape'),
    (lambda x: x.update(A=x['A'][:, :2]), r'projections\[0\] must'),  # N from A: the projections disagree
    (lambda x: x.update(D=x['D'][:-1]), 'D must have shape'),
    (lambda x: x.update(projections=x['projections'][:1]), 'one or two branches'),
    (lambda x: x.update(deltas=x['deltas'] * 2, projections=x['projections'] * 2), 'one or two branches'),
    (lambda x: x.update(xz=x['xz'].double()), 'must be float32'),
])
def test_mixer_scan_refuses_bad_arguments(change, match):
    """The compiled loops do no bounds checks: every shape is checked before."""
    inputs = _mixer_inputs(2, 6, 16, 4, 2)
    change(inputs)
    with pytest.raises(ValueError, match=match):
        scan_numba.run_mixer_scan(**inputs)


def test_mixer_conv_refuses_bad_weights():
    xz = torch.randn(1, 5, 32)
    for weight in (torch.randn(24, 1, 4), torch.randn(16, 2, 4), torch.randn(16, 4)):
        with pytest.raises(ValueError, match='weight must be'):
            scan_numba.run_mixer_conv_silu(xz, weight, None)
    with pytest.raises(ValueError, match='bias must have shape'):
        scan_numba.run_mixer_conv_silu(xz, torch.randn(32, 1, 4), torch.randn(16))
    with pytest.raises(ValueError, match='xz must be float32'):
        scan_numba.run_mixer_conv_silu(xz.bfloat16(), torch.randn(32, 1, 4), None)
