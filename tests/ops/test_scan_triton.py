"""The Triton scan (``selective_scan_triton``) against the float64 reference, forward and every gradient.

Without a GPU (CI) the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1): slow per element, so the shapes are small but cover every branch of the kernels: chunk
boundaries (L not a multiple of the chunk, L = 1, several chunks), N padded to a power of two, B/C fixed, per
step and grouped (also mixed), each optional input present and absent, a last-state cotangent. Kernel outputs
are poisoned with NaN before each run, so an element a kernel forgets to write fails the test. tests/gpu/ runs
the same checks at the benchmark shapes on a GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mambazoo.ops import scan_triton
from mambazoo.ops.scan_triton import scan_chunk_length, selective_scan_triton
from test_selective_scan import (NAMES, TOL, assert_rel_close, cast, cotangents_for, form_id, make_inputs,
                                 scan_and_grads)
from mambazoo.ops import cross_selective_scan, selective_scan_ref

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get('TRITON_INTERPRET') != '1',
    reason='needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)')


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer a kernel must fill starts as NaN."""
    monkeypatch.setattr(scan_triton, '_output_like',
                        lambda x, dtype=None: torch.full_like(x, float('nan'), dtype=dtype))
    monkeypatch.setattr(scan_triton, '_output',
                        lambda shape, like: torch.full(shape, float('nan'), device=like.device))


CASES = {  # name: (batch, dim, L, N, b_form, c_form, options)
    'one_chunk_padded': (2, 4, 37, 3, 'var', 'var', {}),
    'several_chunks_N16': (1, 6, 300, 16, 2, 'fixed', {}),
    'L1': (2, 8, 1, 1, 'fixed', 4, dict(D=False, z=False, delta_bias=False, softplus=False)),
    'N1_many_channels': (2, 40, 150, 1, 4, 4, dict(z=False)),
    'grouped_mixed': (1, 12, 70, 5, 3, 2, dict(D=False, softplus=False, delta_bias=False)),
    'fixed_both_no_bias': (2, 3, 129, 2, 'fixed', 'fixed', dict(delta_bias=False)),
}
assert scan_chunk_length(300, 16) < 300 and scan_chunk_length(150, 1) < 150  # several chunks are exercised


def run_case(name, dtype=torch.float32, seed=0):
    batch, dim, length, n_state, b_form, c_form, options = CASES[name]
    inputs = make_inputs(batch, dim, length, n_state, b_form=b_form, c_form=c_form, seed=seed, **options)
    flags = dict(delta_softplus=options.get('softplus', True))
    cot = cotangents_for(inputs, n_state)
    seen = cast(inputs, dtype)  # the reference runs on exactly what the kernel saw, in float64
    got = scan_and_grads(selective_scan_triton, seen, cot, **flags)
    expected = scan_and_grads(selective_scan_ref, cast(seen, torch.float64), cot, **flags)
    return got, expected


@pytest.mark.parametrize('name', list(CASES))
def test_forward_and_gradients_match_float64_reference(name):
    (y, last, grads), (y_ref, last_ref, grads_ref) = run_case(name)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    assert_rel_close(y, y_ref, TOL[torch.float32])
    assert_rel_close(last, last_ref, TOL[torch.float32], 'last state')
    assert set(grads) == set(grads_ref)
    for key, g in grads_ref.items():
        assert grads[key].dtype == torch.float32 and grads[key].shape == g.shape
        assert_rel_close(grads[key], g, 1e-4, f'grad {key}')  # float32 sums over L*dim terms


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs_accumulate_in_float32(dtype):
    (y, last, grads), (y_ref, last_ref, grads_ref) = run_case('several_chunks_N16', dtype)
    assert y.dtype == dtype and last.dtype == torch.float32
    assert_rel_close(y, y_ref, TOL[dtype])
    assert_rel_close(last, last_ref, TOL[torch.float32], 'last state')  # float32 state, nothing rounded
    for key, g in grads_ref.items():
        assert grads[key].dtype == dtype
        assert_rel_close(grads[key], g, TOL[dtype], f'grad {key}')  # float32 sums rounded once to dtype


def test_extreme_delta_long_sequence():
    # delta*|A| up to 50 (decays to 2e-22) over 2000 steps, and deltas near zero: no overflow, no NaN.
    inputs = make_inputs(1, 4, 2000, 4, softplus=False, delta_bias=False, delta_range=(0.0, 5.0),
                         A_range=(-10.0, -0.01), seed=13)
    inputs['delta'][..., :500] = 1e-6
    cot = cotangents_for(inputs, 4)
    y, last, grads = scan_and_grads(selective_scan_triton, cast(inputs, torch.float32), cot)
    y_ref, last_ref, grads_ref = scan_and_grads(selective_scan_ref, inputs, cot)
    assert_rel_close(y, y_ref, 1e-5)
    assert_rel_close(last, last_ref, 1e-5, 'last state')
    for key, g in grads_ref.items():
        assert_rel_close(grads[key], g, 1e-4, f'grad {key}')


def test_softplus_threshold_and_large_bias():
    # raw deltas on both sides of softplus's threshold (20), where the gradient switches to exactly 1
    inputs = make_inputs(1, 4, 40, 2, seed=3)
    inputs['delta'] = torch.linspace(-30, 30, 4 * 40, dtype=torch.float64).reshape(1, 4, 40)
    inputs['A'] = -torch.full_like(inputs['A'], 1e-3)
    cot = cotangents_for(inputs, 2)
    *_, grads = scan_and_grads(selective_scan_triton, cast(inputs, torch.float32), cot, delta_softplus=True)
    *_, grads_ref = scan_and_grads(selective_scan_ref, inputs, cot, delta_softplus=True)
    for key in ('delta', 'delta_bias', 'u'):
        assert_rel_close(grads[key], grads_ref[key], 1e-4, f'grad {key}')


def test_time_major_views_in_and_out():
    # (L, batch, dim) storage seen as (batch, dim, L): read in place, output in the same layout
    inputs = cast(make_inputs(2, 6, 50, 4, seed=5), torch.float32)
    for key in ('u', 'delta', 'z'):
        inputs[key] = inputs[key].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    y = selective_scan_triton(**inputs, delta_softplus=True)
    assert y.stride() == inputs['u'].stride()
    assert_rel_close(y, selective_scan_ref(**cast(inputs, torch.float64), delta_softplus=True), 1e-5)


def test_strided_D_and_delta_bias():
    inputs = cast(make_inputs(1, 4, 30, 2, seed=4), torch.float32)
    expected = selective_scan_ref(**cast(inputs, torch.float64), delta_softplus=True)
    for key in ('D', 'delta_bias'):  # every other element of a buffer padded with NaN
        inputs[key] = torch.stack([inputs[key], torch.full_like(inputs[key], float('nan'))], 1)[:, 0]
        assert inputs[key].stride() == (2,)
    assert_rel_close(selective_scan_triton(**inputs, delta_softplus=True), expected, TOL[torch.float32])


def test_mixed_layouts_gradients():
    # u and z time-major, delta channel-major: every gradient lands in its own input's shape and dtype
    inputs = make_inputs(2, 4, 40, 3, seed=21)
    seen = cast(inputs, torch.float32)
    for key in ('u', 'z'):
        seen[key] = seen[key].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    seen['z'] = seen['z'].to(torch.bfloat16)
    cot = cotangents_for(inputs, 3)
    y, last, grads = scan_and_grads(selective_scan_triton, seen, cot, delta_softplus=True)
    *_, grads_ref = scan_and_grads(selective_scan_ref, cast(seen, torch.float64), cot, delta_softplus=True)
    assert grads['z'].dtype == torch.bfloat16
    for key, g in grads_ref.items():
        assert_rel_close(grads[key], g, TOL[torch.bfloat16] if key == 'z' else 1e-4, f'grad {key}')


def test_kernels_compile_for_a_hopper_gpu():
    # The interpreter skips the compiler's checks: compile both kernels for sm_90 (no GPU needed) in a process
    # without TRITON_INTERPRET, through LLVM and ptxas
    script = Path(__file__).with_name('compile_triton_kernels.py')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('registers') == 6, run.stdout


def test_gradient_through_last_state_only():
    inputs = cast(make_inputs(1, 4, 50, 3, D=False, z=False, seed=11), torch.float32)
    x = {k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()}
    x_ref = {k: None if v is None else v.double().requires_grad_() for k, v in inputs.items()}
    selective_scan_triton(**x, return_last_state=True)[1].sum().backward()
    selective_scan_ref(**x_ref, return_last_state=True)[1].sum().backward()
    for key in ('u', 'delta', 'A', 'B', 'delta_bias'):
        assert_rel_close(x[key].grad, x_ref[key].grad, 1e-5, f'grad {key}')
    assert not x['C'].grad.any()


def test_custom_op_passes_opcheck():
    # schema, fake (meta) implementation, autograd registration and aliasing, as torch.library checks them
    inputs = cast(make_inputs(2, 4, 20, 3, b_form=2, c_form='fixed', seed=7), torch.float32)
    args = [inputs[k] for k in NAMES]
    for t in args:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.mambazoo.selective_scan_fwd.default, (*args, True, 0, 0),
                          test_utils=('test_schema', 'test_faketensor', 'test_autograd_registration'))


def test_torch_compile_keeps_the_scan_as_one_op():
    # fullgraph=True fails on any graph break; the custom op is traced through its fake implementation
    inputs = cast(make_inputs(1, 4, 24, 2, seed=9), torch.float32)

    def step(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_triton(u * 2, delta, A, B, C, D, z, delta_bias, delta_softplus=True) + 1

    compiled = torch.compile(step, fullgraph=True, backend='aot_eager')
    x = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = compiled(**x)
    y_ref = step(**inputs)
    assert_rel_close(y, y_ref, 1e-6)
    y.sum().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in x.values())


def test_rejects_float64_and_cpu_without_interpreter(monkeypatch):
    inputs = make_inputs(1, 2, 5, 2)
    with pytest.raises(ValueError, match='float64'):
        selective_scan_triton(**inputs)
    if not torch.cuda.is_available():
        monkeypatch.delenv('TRITON_INTERPRET')
        with pytest.raises(ValueError, match='CUDA tensors'):
            selective_scan_triton(**cast(inputs, torch.float32))


# ----------------------------------------------------------------------------- the fused cross scan (VMamba)

def cross_inputs(batch, height, width, d_inner, n_state, rank, seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    return dict(x=randn(batch, height, width, d_inner), dts=randn(batch, height, width, 4, rank),
                dt_weight=randn(4, d_inner, rank, scale=0.5), A=-torch.rand(4 * d_inner, n_state, generator=gen,
                                                                          dtype=torch.float64) - 0.1,
                B=randn(batch, height, width, 4, n_state), C=randn(batch, height, width, 4, n_state),
                D=randn(4 * d_inner), delta_bias=randn(4 * d_inner, scale=0.5))


@pytest.mark.parametrize('height, width, n_state', [(12, 13, 1), (5, 3, 3)])
def test_fused_cross_scan_matches_composed_reference(height, width, n_state):
    # H != W catches a swapped traversal; 12 x 13 = 156 steps spans two chunks
    inputs = cross_inputs(2, height, width, 6, n_state, 3, seed=height)
    seen = cast(inputs, torch.float32)
    x = {k: v.clone().requires_grad_() for k, v in seen.items()}
    x_ref = {k: v.double().requires_grad_() for k, v in seen.items()}
    y = cross_selective_scan(**x, delta_softplus=True, backend='triton')
    y_ref = cross_selective_scan(**x_ref, delta_softplus=True, backend='ref')
    assert y.shape == (2, height, width, 6) and y.dtype == torch.float32
    assert_rel_close(y, y_ref, TOL[torch.float32])
    cot = torch.randn(y_ref.shape, dtype=torch.float64)
    (y * cot.float()).sum().backward()
    (y_ref * cot).sum().backward()
    for key in inputs:
        assert_rel_close(x[key].grad, x_ref[key].grad, 1e-4, f'grad {key}')


def test_fused_cross_scan_reads_channels_first_maps_in_place():
    # VMamba hands over x.permute(0, 2, 3, 1) of an NCHW map: strided, not copied
    inputs = cast(cross_inputs(1, 4, 6, 5, 2, 2, seed=1), torch.float32)
    inputs['x'] = inputs['x'].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    y = cross_selective_scan(**inputs, delta_softplus=True, backend='triton')
    y_ref = cross_selective_scan(**cast(inputs, torch.float64), delta_softplus=True, backend='ref')
    assert_rel_close(y, y_ref, TOL[torch.float32])


def test_cross_op_passes_opcheck():
    inputs = cast(cross_inputs(1, 3, 4, 2, 2, 2, seed=2), torch.float32)
    L = 12
    u = inputs['x'].reshape(1, L, 2).transpose(1, 2)
    delta = torch.randn(1, L, 8).transpose(1, 2)
    B = inputs['B'].reshape(1, L, 4, 2).permute(0, 2, 3, 1)
    C = inputs['C'].reshape(1, L, 4, 2).permute(0, 2, 3, 1)
    args = [t.requires_grad_() for t in (u, delta, inputs['A'], B, C, inputs['D'])]
    torch.library.opcheck(torch.ops.mambazoo.selective_scan_fwd.default,
                          (*args, None, inputs['delta_bias'].requires_grad_(), True, 3, 4),
                          test_utils=('test_schema', 'test_faketensor', 'test_autograd_registration'))
