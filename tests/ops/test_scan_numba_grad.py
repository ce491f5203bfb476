"""CPU training by the compiled loops (``scan_numba_grad``): the selective scan's and the Mamba mixer's training
forward (chunk-start states kept) and their compiled backward.

Every float32 comparison is against the float64 sequential reference on the same (float32-representable) inputs,
through the public ops, and checks that the compiled training kernels ran (``kernel_runs``): a silent fallback to the
pure-PyTorch path would otherwise pass unnoticed. The kernels are dtype-generic, so gradcheck runs their float64
specialisation (one thread, called directly) through the same autograd Functions.
"""
import collections
import copy
import functools

import pytest
import torch

import mambazoo
from helpers import TINY_MAMBAVISION, assert_close_by_name, images, output_and_grads, perturb, rel_err, spy
from mambazoo.analysis.benchmark import saved_storages
from mambazoo.models.hybrid import MambaHybrid
from mambazoo.models.vim import VisionMamba
from mambazoo.ops import mamba_inner, scan_numba, scan_numba_grad, scan_policy, selective_scan, selective_scan_ref
from mambazoo.ops.mamba_inner import (fused_inner_applies, mamba_inner_conv, mamba_inner_conv_ref, mamba_inner_scan,
                                      mamba_inner_scan_ref)
from test_mamba_inner import make as make_mixer_inputs
from test_scan_numba import time_major
from test_selective_scan import NAMES, assert_rel_close, cast, cotangents_for, make_inputs, scan_and_grads

pytestmark = pytest.mark.skipif(not scan_numba.numba_importable(), reason='numba is not installed')

GRAD_RTOL = 2e-5  # float32 gradients, elementwise, relative to the largest one (sums of up to L * dim terms)


@pytest.fixture
def kernel_runs(monkeypatch):
    """The names of the compiled kernels run through ``scan_numba_grad``, in order."""
    return spy(monkeypatch, scan_numba_grad, '_run', lambda name, *args: name)


@pytest.fixture
def launch_tasks(monkeypatch):
    """[(kernel name, task count)] of the launches through ``scan_numba._launch``."""
    return spy(monkeypatch, scan_numba, '_launch', lambda name, arrays, flags, units, threads, *_: (name, threads))


def expected_tasks(threads, units):
    """The task count a call over ``units`` channels splits into (one without PyTorch's libgomp)."""
    return max(1, min(threads, units // 16)) if scan_numba._gomp_parallel() is not None else 1


# ------------------------------------------------------------------------------------------ the selective scan

SCAN_CASES = [
    # batch, dim, L, N, form of B and C, options
    (1, 32, 150, 16, 'var', {}),  # three chunks (CHUNK = 64), the last one partial
    (3, 40, 128, 4, 2, {}),  # whole chunks; two groups; 40 channels: not whole 16-channel blocks per thread
    (2, 24, 20, 1, 4, {'z': False}),  # N = 1, four groups (VMamba's directions); L < chunk
    (3, 16, 1, 16, 'var', {}),  # one step
    (1, 400, 70, 8, 'var', {'z': False}),  # MambaVision's mixer: no gate; two channel blocks (BLOCK = 384)
    (2, 32, 90, 5, 2, {'D': False, 'delta_bias': False}),
    (1, 48, 66, 3, 'var', {'softplus': False, 'delta_range': (0.0, 3.0)}),
]


@functools.lru_cache(maxsize=None)
def scan_case(index):
    """Case ``index`` of SCAN_CASES: (float32 inputs, cotangents, softplus, the float64 reference's (y, last,
    grads)), computed once for both thread counts."""
    batch, dim, length, n_state, form, options = SCAN_CASES[index]
    softplus = options.get('softplus', True)
    inputs = cast(make_inputs(batch, dim, length, n_state, b_form=form, c_form=form, seed=dim + length, **options),
                  torch.float32)
    cot = cotangents_for(inputs, n_state)
    return inputs, cot, softplus, scan_and_grads(selective_scan_ref, cast(inputs, torch.float64), cot,
                                                 delta_softplus=softplus)


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('index', range(len(SCAN_CASES)), ids=[str(case[:5]) for case in SCAN_CASES])
def test_scan_training_matches_reference(index, threads, kernel_runs, launch_tasks):
    inputs, cot, softplus, (y_ref, last_ref, grads_ref) = scan_case(index)
    with scan_policy(scan_threads=threads):
        y, last, grads = scan_and_grads(selective_scan, inputs, cot, delta_softplus=softplus)
    assert kernel_runs == ['scan_train', 'scan_backward']
    # two threads: dB and dC summed over two partials
    assert dict(launch_tasks)['scan_backward'] == expected_tasks(threads, inputs['u'].shape[1])
    assert_rel_close(y, y_ref, 2e-6)
    assert_rel_close(last, last_ref, 2e-6, 'last state')
    assert set(grads) == set(grads_ref)
    for name, g in grads_ref.items():
        assert grads[name].dtype == torch.float32 and grads[name].shape == g.shape
        assert_rel_close(grads[name], g, GRAD_RTOL, f'grad {name}')


def test_scan_training_on_time_major_inputs(kernel_runs):
    """u, delta, z as views of time-major memory (the layout VMamba's fallback passes): no copy, same results."""
    inputs = cast(make_inputs(2, 24, 80, 4, seed=4), torch.float32)
    inputs = {k: time_major(v) if k in ('u', 'delta', 'z') else v for k, v in inputs.items()}
    cot = cotangents_for(inputs, 4)
    y, _, grads = scan_and_grads(selective_scan, inputs, cot, delta_softplus=True)
    assert kernel_runs == ['scan_train', 'scan_backward']
    assert y.permute(2, 0, 1).is_contiguous()  # the inference path's output layout
    y_ref, _, grads_ref = scan_and_grads(selective_scan_ref, cast(inputs, torch.float64), cot, delta_softplus=True)
    assert_rel_close(y, y_ref, 2e-6)
    for name, g in grads_ref.items():
        assert_rel_close(grads[name], g, GRAD_RTOL, f'grad {name}')


@pytest.mark.parametrize('name', NAMES)
def test_scan_input_alone_requiring_grad(name, kernel_runs):
    """One input requires a gradient: it gets the reference's, the others none (and no error)."""
    inputs = cast(make_inputs(2, 16, 30, 4, b_form=2, c_form=2, seed=6), torch.float32)
    x = {k: v.detach().clone().requires_grad_(k == name) for k, v in inputs.items()}
    selective_scan(**x, delta_softplus=True).sum().backward()
    assert kernel_runs == ['scan_train', 'scan_backward']
    assert all(v.grad is None for k, v in x.items() if k != name)
    ref = cast(inputs, torch.float64)
    ref[name].requires_grad_()
    selective_scan_ref(**ref, delta_softplus=True).sum().backward()
    assert_rel_close(x[name].grad, ref[name].grad, GRAD_RTOL, f'grad {name}')


@pytest.mark.parametrize('softplus', [True, False])
def test_scan_gradcheck_float64(softplus, monkeypatch):
    """gradcheck of the compiled kernels' float64 twin, with chunks of 5 steps: L = 13 is three chunks."""
    monkeypatch.setattr(scan_numba_grad, 'CHUNK', 5)
    inputs = make_inputs(2, 4, 13, 3, b_form=2, c_form=2, softplus=softplus, seed=8)
    order = [inputs[k].detach().requires_grad_() for k in NAMES]

    def fn(*tensors):
        return scan_numba_grad.SelectiveScanCompiledFn.apply(*tensors, softplus)

    assert torch.autograd.gradcheck(fn, order, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_half_precision_inputs_train_in_float32(kernel_runs):
    inputs = cast(make_inputs(2, 16, 40, 4, seed=9), torch.bfloat16)
    cot = cotangents_for(inputs, 4)
    y, _, grads = scan_and_grads(selective_scan, inputs, cot, delta_softplus=True)
    assert kernel_runs == ['scan_train', 'scan_backward']
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads.values())
    _, _, grads_ref = scan_and_grads(selective_scan_ref, cast(inputs, torch.float64), cot, delta_softplus=True)
    for name, g in grads_ref.items():
        assert_rel_close(grads[name], g, 2e-2, f'grad {name}')


def test_inference_keeps_no_states(kernel_runs, monkeypatch):
    """Without autograd (no_grad, or nothing requiring a gradient) the inference kernel runs: no state is kept."""
    inference = spy(monkeypatch, scan_numba, 'run_scan_kernel')
    inputs = cast(make_inputs(1, 16, 20, 4, seed=10), torch.float32)
    with torch.no_grad():
        selective_scan(**{k: v.clone().requires_grad_() for k, v in inputs.items()}, delta_softplus=True)
    selective_scan(**inputs, delta_softplus=True)
    assert len(inference) == 2 and kernel_runs == []


# --------------------------------------------------------------------------------------- the Mamba mixer's ops

MIXER_CASES = [
    # batch, L, d, N, branches, divide, conv bias
    (3, 150, 40, 16, 2, True, True),  # Vim: three chunks, the last partial; channels not whole 16-blocks per thread
    (1, 128, 32, 16, 2, False, False),  # whole chunks
    (2, 20, 16, 1, 1, False, True),  # one branch (the hybrids' and Mamba's); N = 1; L < chunk
    (3, 1, 16, 4, 2, True, True),  # one step
    (1, 70, 400, 4, 1, False, False),  # two channel blocks in one thread
]


def mixer_grads(a, divide, dtype, conv, scan):
    """(y, {name: gradient}) of <y, gy> through the conv and the scan, for leaf copies of the inputs in dtype."""
    leaves = {}

    def leaf(name, t):
        leaves[name] = t.detach().to(dtype).requires_grad_()
        return leaves[name]

    xz, weight = leaf('xz', a['xz']), leaf('weight', a['weight'])
    bias = leaf('bias', a['bias']) if a['bias'] is not None else None
    deltas = [leaf(f'deltas[{k}]', t) for k, t in enumerate(a['deltas'])]
    projections = [leaf(f'projections[{k}]', t) for k, t in enumerate(a['projections'])]
    A, D, delta_bias = leaf('A', a['A']), leaf('D', a['D']), leaf('delta_bias', a['delta_bias'])
    y = scan(conv(xz, weight, bias), deltas, projections, xz, A, D, delta_bias, a['rank'], divide)
    gy = images(*y.shape, seed=3).to(dtype)
    (y * gy).sum().backward()
    return y, {k: v.grad for k, v in leaves.items()}


@functools.lru_cache(maxsize=None)
def mixer_case(index):
    """Case ``index`` of MIXER_CASES: (inputs, divide, the float64 reference's (y, grads)), computed once."""
    batch, length, d, n_state, branches, divide, bias = MIXER_CASES[index]
    a = make_mixer_inputs(batch=batch, length=length, d=d, N=n_state, rank=3, branches=branches, bias=bias,
                          seed=length + d)
    return a, divide, mixer_grads(a, divide, torch.float64, mamba_inner_conv_ref,
                                  lambda *args: mamba_inner_scan_ref(*args, backend='ref'))


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('index', range(len(MIXER_CASES)), ids=[str(case) for case in MIXER_CASES])
def test_mixer_training_matches_reference(index, threads, kernel_runs, launch_tasks):
    a, divide, (y_ref, grads_ref) = mixer_case(index)
    with scan_policy(scan_threads=threads):
        y, grads = mixer_grads(a, divide, torch.float32, mamba_inner_conv, mamba_inner_scan)
    assert sorted(kernel_runs) == ['conv', 'conv_backward', 'mixer_backward', 'mixer_train']
    tasks = dict(launch_tasks)
    assert tasks['mixer_backward'] == tasks['conv_backward'] == expected_tasks(threads, a['xz'].shape[2] // 2)
    assert_rel_close(y, y_ref, 2e-6)
    assert set(grads) == set(grads_ref)
    for name, g in grads_ref.items():
        assert grads[name].dtype == torch.float32
        assert_rel_close(grads[name], g, GRAD_RTOL, f'grad {name}')


@pytest.mark.parametrize('branches,divide', [(1, False), (2, True)])
def test_mixer_gradcheck_float64(branches, divide, monkeypatch):
    """gradcheck of the mixer kernels' float64 twins (conv and scan), with chunks of 4 steps over L = 9."""
    monkeypatch.setattr(scan_numba_grad, 'CHUNK', 4)
    a = make_mixer_inputs(batch=2, length=9, d=4, N=3, rank=2, branches=branches, k=3, seed=11)
    K = branches
    order = [a['xz'], a['weight'], a['bias'], *a['deltas'], *a['projections'], a['A'], a['D'], a['delta_bias']]
    order = [t.detach().requires_grad_() for t in order]

    def fn(xz, weight, bias, *rest):
        u = scan_numba_grad.mixer_conv_silu_train(xz, weight, bias)
        deltas, projections, (A, D, delta_bias) = rest[:K], rest[K:2 * K], rest[2 * K:]
        return scan_numba_grad.mixer_scan_train(u, deltas, projections, xz, A, D, delta_bias, a['rank'], divide)

    assert torch.autograd.gradcheck(fn, order, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_mixer_inputs_not_requiring_grad(kernel_runs):
    """Only xz requires a gradient (frozen parameters): the training path, the gradient of xz only."""
    a = make_mixer_inputs(batch=2, length=12, d=16, N=4, rank=2, dtype=torch.float32, seed=12)
    xz = a['xz'].clone().requires_grad_()
    u = mamba_inner_conv(xz, a['weight'], a['bias'])
    y = mamba_inner_scan(u, a['deltas'], a['projections'], xz, a['A'], a['D'], a['delta_bias'], a['rank'], True)
    y.sum().backward()
    assert sorted(kernel_runs) == ['conv', 'conv_backward', 'mixer_backward', 'mixer_train']
    xz_ref = a['xz'].double().requires_grad_()
    u_ref = mamba_inner_conv_ref(xz_ref, a['weight'].double(), a['bias'].double())
    mamba_inner_scan_ref(u_ref, [t.double() for t in a['deltas']], [t.double() for t in a['projections']], xz_ref,
                         a['A'].double(), a['D'].double(), a['delta_bias'].double(), a['rank'], True,
                         backend='ref').sum().backward()
    assert_rel_close(xz.grad, xz_ref.grad, GRAD_RTOL, 'grad xz')
    assert all(t.grad is None for t in (a['weight'], a['A'], *a['deltas']))


def test_mixer_inference_keeps_no_states(kernel_runs, monkeypatch):
    calls = {name: spy(monkeypatch, mamba_inner, name) for name in ('run_mixer_conv_silu', 'run_mixer_scan')}
    a = make_mixer_inputs(batch=1, length=10, d=16, N=4, rank=2, dtype=torch.float32, seed=13)
    u = mamba_inner_conv(a['xz'], a['weight'], a['bias'])  # grad mode on, nothing requires a gradient
    mamba_inner_scan(u, a['deltas'], a['projections'], a['xz'], a['A'], a['D'], a['delta_bias'], a['rank'])
    assert [len(c) for c in calls.values()] == [1, 1] and kernel_runs == []


# --------------------------------------------------------------------------- the mixer's inner part as one op

def make_inner_inputs(batch, length, d, N, rank, branches, bias, dtype=torch.float64, seed=0):
    """``mamba_inner_fused``'s inputs: ``make_mixer_inputs``' xz, conv, A and D, and the projections' weights."""
    a = make_mixer_inputs(batch=batch, length=length, d=d, N=N, rank=rank, branches=branches, bias=bias,
                          dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(xz=a['xz'], conv_weight=a['weight'], conv_bias=a['bias'],
                x_weights=[r(rank + 2 * N, d) / d ** 0.5 for _ in range(branches)],
                dt_weights=[r(d, rank) / rank ** 0.5 for _ in range(branches)],
                dt_biases=[r(d) / 4 for _ in range(branches)], A=a['A'], D=a['D'], dt_rank=rank)


def inner_grads(a, divide, dtype, op):
    """(y, {name: gradient}) of <y, gy> through ``op`` (``mamba_inner_fused`` or its reference) on leaf copies."""
    leaves = {}

    def leaf(name, t):
        if t is None:
            return None
        leaves[name] = t.detach().to(dtype).requires_grad_()
        return leaves[name]

    args = {k: ([leaf(f'{k}[{i}]', t) for i, t in enumerate(v)] if isinstance(v, list) else
                v if k == 'dt_rank' else leaf(k, v)) for k, v in a.items()}
    y = op(**args, divide=divide)
    gy = images(*y.shape, seed=5).to(dtype)
    (y * gy).sum().backward()
    return y, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('index', [0, 2, 3, 4], ids=[str(MIXER_CASES[i]) for i in (0, 2, 3, 4)])
def test_fused_inner_training_matches_reference(index, threads, kernel_runs):
    """``mamba_inner_fused`` under autograd (conv and step sizes recomputed in the backward) == its reference,
    float32 against float64, every input's gradient."""
    batch, length, d, n_state, branches, divide, bias = MIXER_CASES[index]
    a = make_inner_inputs(batch, length, d, n_state, 3, branches, bias, seed=length + d)
    y_ref, grads_ref = inner_grads(a, divide, torch.float64, mamba_inner.mamba_inner_fused_ref)
    with scan_policy(scan_threads=threads):
        y, grads = inner_grads(a, divide, torch.float32, mamba_inner.mamba_inner_fused)
    # the conv runs twice: forward, and again in the backward
    assert kernel_runs == ['conv', 'mixer_train', 'conv', 'mixer_backward', 'conv_backward']
    assert_rel_close(y, y_ref, 2e-6)
    assert set(grads) == set(grads_ref)
    for name, g in grads_ref.items():
        assert grads[name].dtype == torch.float32
        assert_rel_close(grads[name], g, GRAD_RTOL, f'grad {name}')


def test_fused_inner_with_frozen_weights_gives_the_input_its_gradient(kernel_runs):
    """Only xz requires a gradient (a frozen block inside a trained network): the op still trains by the compiled
    kernels, xz's gradient is the reference's and no weight gets one."""
    a = make_inner_inputs(2, 40, 32, 8, 2, 2, True, dtype=torch.float32, seed=31)
    xz = a['xz'].clone().requires_grad_()
    args = {k: v for k, v in a.items() if k != 'xz'}
    mamba_inner.mamba_inner_fused(xz, **args, divide=True).sum().backward()
    assert 'mixer_backward' in kernel_runs
    xz_ref = a['xz'].double().requires_grad_()
    args_64 = {k: ([t.double() for t in v] if isinstance(v, list) else v if k == 'dt_rank' else v.double())
               for k, v in args.items()}
    mamba_inner.mamba_inner_fused_ref(xz_ref, **args_64, divide=True).sum().backward()
    assert_rel_close(xz.grad, xz_ref.grad, GRAD_RTOL, 'grad xz')
    assert all(t.grad is None for t in (a['conv_weight'], *a['x_weights'], *a['dt_weights'], a['A']))


@pytest.mark.parametrize('branches,divide,bias', [(1, False, True), (2, True, False)])
def test_fused_inner_gradcheck_float64(branches, divide, bias, monkeypatch):
    """gradcheck of ``MixerInnerCompiledFn`` on the kernels' float64 twins, chunks of 4 steps over L = 9."""
    monkeypatch.setattr(scan_numba_grad, 'CHUNK', 4)
    a = make_inner_inputs(2, 9, 4, 3, 2, branches, bias, seed=21)
    K = branches
    order = [t.detach().requires_grad_() if t is not None else None for t in
             (a['xz'], a['conv_weight'], a['conv_bias'], *a['x_weights'], *a['dt_weights'], *a['dt_biases'],
              a['A'], a['D'])]

    def fn(xz, conv_weight, conv_bias, *rest):
        x_w, dt_w, dt_b, (A, D) = rest[:K], rest[K:2 * K], rest[2 * K:3 * K], rest[3 * K:]
        return scan_numba_grad.mixer_inner_train(xz, conv_weight, conv_bias, list(x_w), list(dt_w), list(dt_b), A,
                                                 D, a['dt_rank'], divide)

    assert torch.autograd.gradcheck(fn, order, eps=1e-6, atol=1e-6, rtol=1e-4)


def vim_mixer(seed=0):
    torch.manual_seed(seed)
    return perturb(VisionMamba(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=1, num_classes=10,
                               rms_norm=True, residual_in_fp32=True, fused_add_norm=True, bimamba_type='v2',
                               if_cls_token=True, if_divide_out=True, use_middle_cls_token=True)).layers[0].mixer


def test_vim_mixer_trains_by_the_fused_op_and_keeps_less(kernel_runs):
    """A plain Vim mixer in training takes ``mamba_inner_fused``: the same output and gradients as its module
    calls (a hook on x_proj makes the block call them), with neither the conv's output (batch, L, 2 d) nor the two
    step sizes (batch, L, d) kept for the backward."""
    mixer = vim_mixer()
    x = images(2, 19, 32)  # 38 tokens: no weight has the activations' sizes
    fused_out, fused_grads = output_and_grads(mixer, x)
    assert 'mixer_backward' in kernel_runs
    hook_calls = []
    handle = mixer.x_proj.register_forward_hook(lambda *args: hook_calls.append(1))
    out, grads = output_and_grads(mixer, x)
    assert hook_calls == [1]
    torch.testing.assert_close(fused_out, out, rtol=1e-6, atol=1e-7)
    assert_close_by_name(fused_grads, grads)

    d, tokens = mixer.d_inner, 2 * 19
    by_calls = collections.Counter(saved_storages(mixer, x).values())  # {storage bytes: how many}
    handle.remove()
    fused = collections.Counter(saved_storages(mixer, x).values())
    xz_bytes, delta_bytes = tokens * 2 * d * 4, tokens * d * 4
    # xz (and u with the calls); out_proj's input (and the two step sizes with the calls)
    assert (by_calls[xz_bytes], by_calls[delta_bytes]) == (2, 3)
    assert (fused[xz_bytes], fused[delta_bytes]) == (1, 1)


def test_fused_inner_applies_only_where_the_calls_compute_nothing_else():
    mixer = vim_mixer()
    xz = torch.randn(1, 5, 2 * mixer.d_inner)
    projections = mixer._projections()
    assert fused_inner_applies(xz, projections)
    with torch.no_grad():
        assert not fused_inner_applies(xz, projections)  # inference: the module calls keep nothing anyway
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not fused_inner_applies(xz, projections)
    assert not fused_inner_applies(xz.double(), projections)
    with scan_policy(compiled_cpu=False):
        assert not fused_inner_applies(xz, projections)
    for register in ('register_forward_hook', 'register_forward_pre_hook', 'register_full_backward_hook'):
        handle = getattr(mixer.dt_proj_b, register)(lambda *args: None)
        assert not fused_inner_applies(xz, projections), register
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not fused_inner_applies(xz, projections)
    finally:
        handle.remove()
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(mixer), {torch.nn.Linear})
    assert not fused_inner_applies(xz, quantized._projections())
    for p in mixer.parameters():
        p.requires_grad_(False)
    assert not fused_inner_applies(xz, projections)
    assert fused_inner_applies(xz.requires_grad_(), projections)


# ---------------------------------------------------------------------------------------------- whole models

MODELS = {
    'vim': lambda: VisionMamba(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2, num_classes=10,
                               rms_norm=True, residual_in_fp32=True, fused_add_norm=True, final_pool_type='mean',
                               if_abs_pos_embed=True, bimamba_type='v2', if_cls_token=True, if_divide_out=True,
                               use_middle_cls_token=True, drop_path_rate=0.),
    'hybrid': lambda: MambaHybrid(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10),
    'mambavision': lambda: mambazoo.create_model('mambavision_tiny', num_classes=10, window_size=[8, 8, 2, 1],
                                                 drop_path_rate=0., **TINY_MAMBAVISION),
}


@pytest.mark.parametrize('family', list(MODELS))
def test_models_train_as_on_the_pytorch_path(family, kernel_runs):
    """A training step's gradients with the compiled backward == with the pure-PyTorch path (compiled_cpu off).
    In eval mode: the ops take their training path whenever a parameter requires a gradient, and MambaVision's
    BatchNorms, on the statistics of a batch of two, would amplify float32 rounding on either path a thousandfold."""
    torch.manual_seed(0)
    model = perturb(MODELS[family]()).eval()
    x = images(2, 3, 32, 32)
    out, grads = output_and_grads(model, x)
    assert ('mixer_backward' if family != 'mambavision' else 'scan_backward') in kernel_runs
    with scan_policy(compiled_cpu=False):
        out_ref, grads_ref = output_and_grads(model, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    scale = max(g.abs().max().item() for g in grads_ref.values())
    assert_close_by_name({k: g / scale for k, g in grads.items()}, {k: g / scale for k, g in grads_ref.items()})


def test_vim_trains_under_bfloat16_autocast(kernel_runs):
    """bfloat16 GEMMs hand the mixer bfloat16 activations: the compiled ops compute in float32 and give bfloat16
    gradients back. Both paths round differently, so each is compared with the float64 model: the compiled one
    must be about as close as the PyTorch path."""
    torch.manual_seed(0)
    model = perturb(MODELS['vim']()).eval()
    x = images(2, 3, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, grads = output_and_grads(model, x)
        assert 'mixer_backward' in kernel_runs
        with scan_policy(compiled_cpu=False):
            out_torch, grads_torch = output_and_grads(model, x)
    out_64, grads_64 = output_and_grads(copy.deepcopy(model).double(), x.double())
    assert rel_err(out, out_64) <= 1.5 * rel_err(out_torch, out_64) + 2e-3
    for name, g in grads_64.items():
        assert rel_err(grads[name], g) <= 1.5 * rel_err(grads_torch[name], g) + 2e-3, name
