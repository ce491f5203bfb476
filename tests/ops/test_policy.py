"""``ops.policy``: the one place that chooses an op's implementation, and the policy it reads."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mambazoo.ops import ScanPolicy, choose_implementation, get_scan_policy, policy_from_environment, scan_policy
from mambazoo.ops.scan_numba import numba_importable

needs_numba = pytest.mark.skipif(not numba_importable(), reason='numba is not installed')


def tensors(dtype=torch.float32, grad=False):
    u = torch.randn(1, 4, 5, dtype=dtype, requires_grad=grad)
    return (u, torch.randn(1, 4, 5, dtype=dtype), None)


@needs_numba
def test_cpu_float32_inference_is_compiled():
    with torch.no_grad():
        assert choose_implementation(tensors()) == 'compiled'
    assert choose_implementation(tensors()) == 'compiled'  # grad mode on, but nothing needs a gradient


@pytest.mark.parametrize('case,expected', [
    ('grad', 'chunked'), ('float64', 'chunked'), ('compiled_off', 'chunked'), ('layout', 'chunked'),
    ('ref', 'ref'), ('parallel', 'parallel'), ('flop_counter', 'chunked'), ('half', 'compiled'),
])
def test_choice_table(case, expected):
    args = tensors(torch.float64 if case == 'float64' else torch.float32, grad=case == 'grad')
    if case == 'half':
        args = tensors(torch.bfloat16)  # accumulates in float32: the compiled loop takes it
        if not numba_importable():
            expected = 'chunked'
    changes = {'compiled_off': dict(compiled_cpu=False), 'ref': dict(backend='ref'),
               'parallel': dict(backend='parallel')}.get(case, {})
    with scan_policy(**changes):
        if case == 'flop_counter':
            with FlopCounterMode(display=False):
                got = choose_implementation(args)
        else:
            got = choose_implementation(args, compiled_layout=case != 'layout')
    assert got == expected


def test_call_override_and_tracing():
    assert choose_implementation(tensors(), backend='ref') == 'ref'
    with pytest.raises(ValueError, match='nope'):
        choose_implementation(tensors(), backend='nope')
    seen = []

    def record(u):
        seen.append(choose_implementation((u,)))
        return u * 2
    torch.jit.trace(record, (torch.randn(2, 3),), check_trace=False)
    assert seen == ['parallel']


def test_policy_reads_the_environment_once_and_validates():
    assert policy_from_environment({}) == ScanPolicy()
    env = {'MAMBAZOO_SCAN': 'ref', 'MAMBAZOO_NUMBA': '0', 'MAMBAZOO_SCAN_THREADS': '3',
           'MAMBAZOO_CPU_LINEAR': 'onednn'}
    assert policy_from_environment(env) == ScanPolicy('ref', False, 3, 'onednn')
    assert policy_from_environment({'MAMBAZOO_ONEDNN_LINEAR': '0'}).cpu_linear == 'aten'
    with pytest.raises(ValueError, match='scan backend'):
        policy_from_environment({'MAMBAZOO_SCAN': 'fast'})
    with pytest.raises(ValueError, match='cpu_linear'):
        ScanPolicy(cpu_linear='mkl')
    with pytest.raises(ValueError, match='scan_threads'):
        ScanPolicy(scan_threads=0)


def test_scan_policy_context_restores_even_on_error():
    before = get_scan_policy()
    with pytest.raises(RuntimeError):
        with scan_policy(backend='ref', compiled_cpu=False) as inside:
            assert get_scan_policy() is inside and inside.backend == 'ref' and not inside.compiled_cpu
            raise RuntimeError
    assert get_scan_policy() == before
