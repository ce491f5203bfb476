"""The machine-limit probe: every field measured and consistent (no timing assertions beyond "positive")."""
import pytest
import torch

from mambazoo.analysis.roofline import (SCAN_UPDATE_VECTOR_OPS, MachineLimits, cpu_isa, cpu_model,
                                        measure_machine_limits, scan_update_limit)

QUICK = dict(gemm_size=256, seconds=0.01, repeats=1)  # a fraction of a second after the loop's first compile


@pytest.mark.parametrize('threads', [1, 2])
def test_limits_are_measured_and_consistent(threads):
    before = torch.get_num_threads()
    limits = measure_machine_limits(threads, **QUICK)
    assert torch.get_num_threads() == before  # the GEMM's thread count is restored
    assert isinstance(limits, MachineLimits) and limits.threads == threads
    assert limits.cpu_model and limits.isa in ('avx512f', 'avx2', 'avx', 'asimd', 'sse2', 'unknown')
    assert limits.fma_gflops_per_core > 1 and limits.fma_gflops_all > 0 and limits.gemm_gmacs > 0
    if threads == 1:
        assert limits.fma_gflops_all == limits.fma_gflops_per_core
    assert limits.gemm_library in limits.gemm_gmacs_by_library
    assert limits.gemm_gmacs == max(limits.gemm_gmacs_by_library.values())
    assert 'torch.mm' in limits.gemm_gmacs_by_library
    assert limits.scan_ops_per_update == SCAN_UPDATE_VECTOR_OPS
    # the scan's limit: lane-FMAs per second over the vector instructions of one state update
    assert limits.scan_updates_per_s_per_core == pytest.approx(
        limits.fma_gflops_per_core / 2 * 1e9 / SCAN_UPDATE_VECTOR_OPS)
    assert limits.fma_gfmas_per_core == pytest.approx(limits.fma_gflops_per_core / 2)
    lines = limits.describe()
    assert len(lines) == 2 and 'GFLOP/s' in lines[0] and 'G state updates/s per core' in lines[1]
    assert set(limits.as_dict()) >= {'cpu_model', 'isa', 'fma_gflops_per_core', 'fma_gflops_all', 'gemm_gmacs',
                                     'scan_updates_per_s_per_core'}


def test_scan_limit_and_cpu_description():
    assert scan_update_limit(100.0) == pytest.approx(100 / 2 * 1e9 / SCAN_UPDATE_VECTOR_OPS)
    assert scan_update_limit(100.0, ops_per_update=10) == pytest.approx(5e9)
    assert isinstance(cpu_model(), str) and cpu_model()
    assert cpu_isa() in ('avx512f', 'avx2', 'avx', 'asimd', 'sse2', 'unknown')
