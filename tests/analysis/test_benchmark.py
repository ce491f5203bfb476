"""The benchmark: every field measured and reported, ratios, failures kept per row, and the CPU memory probe."""
import json
from dataclasses import fields

import pytest
import torch
from torch import nn

from helpers import TINY_MAMBAVISION
from mambazoo.analysis import benchmark
from mambazoo.analysis.benchmark import (BenchmarkResult, PeakMemory, benchmark_report, create_any_model,
                                         format_benchmark_table, measure_training_step, run_benchmark,
                                         saved_activation_bytes)

MEASURED = ('params_m', 'gflops', 'infer_images_per_s', 'infer_ms_per_batch', 'latency_ms', 'infer_peak_memory_mb',
            'train_images_per_s', 'train_ms_per_step', 'train_peak_memory_mb')


@pytest.fixture(scope='module')
def results():
    """Ours (small) against a timm model, inference and training, at two sizes; 48 is no multiple of 32."""
    torch.manual_seed(0)
    return run_benchmark(['mambavision_tiny'], ['test_vit'], sizes=(32, 48), batch_size=2, train=True, warmup=0,
                         iters=1, model_kwargs=TINY_MAMBAVISION)


def test_every_field_is_measured_and_reported(results):
    assert [(r.model, r.library, r.img_size) for r in results] == [
        ('mambavision_tiny', 'mambazoo', 32), ('test_vit', 'timm', 32),
        ('mambavision_tiny', 'mambazoo', 48), ('test_vit', 'timm', 48)]
    report = json.loads(json.dumps(benchmark_report(results)))
    assert report['fields'] == [f.name for f in fields(BenchmarkResult)]
    for row in report['results']:
        assert set(row) == set(report['fields'])
    for key in ('torch', 'timm', 'threads', 'device_name', 'memory_method', 'flops_convention'):
        assert key in report['environment']
    for r in results[:2] + results[3:]:
        assert r.error is None
        for key in MEASURED:
            value = getattr(r, key)
            assert value is not None and value >= 0, (r.model, key)
        assert r.infer_images_per_s > 0 and r.train_images_per_s > 0 and r.gflops > 0
        assert r.infer_images_per_s == pytest.approx(2 / r.infer_ms_per_batch * 1e3)
    assert results[0].params_m == pytest.approx(sum(
        p.numel() for p in create_any_model('mambavision_tiny', **TINY_MAMBAVISION).parameters()) / 1e6)


def test_ratios_and_failures(results):
    ours, vit, failed, vit48 = results
    assert all(v == 1.0 for v in ours.ratios.values())
    assert vit.ratios['infer_images_per_s'] == pytest.approx(vit.infer_images_per_s / ours.infer_images_per_s)
    assert failed.error and 'divisible by 32' in failed.error and failed.infer_images_per_s is None
    assert vit48.error is None and vit48.ratios['infer_images_per_s'] is None  # no reference to compare with
    table = format_benchmark_table(results)
    assert 'x ref' in table and 'error: ValueError' in table and table.count('\n') == 5


def test_bad_requests():
    with pytest.raises(ValueError, match='unknown model'):
        create_any_model('no_such_model')
    with pytest.raises(ValueError, match='at least one model'):
        run_benchmark([])


def test_cpu_peak_memory_sees_an_allocation():
    try:
        open('/proc/self/clear_refs', 'w').close()
    except OSError:
        pytest.skip('no /proc/self/clear_refs (not Linux)')
    with PeakMemory(torch.device('cpu')) as mem:
        block = torch.ones(32 * 2 ** 20 // 4)  # 32 MiB, touched
        del block
    assert 30 <= mem.mb < 200


def test_saved_activation_bytes_counts_what_autograd_keeps():
    """Linear keeps its input (for its weight's gradient), ReLU its output; the weights are not counted, a storage
    kept twice counts once, and the model's mode is restored."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval()
    x = torch.randn(3, 4)
    assert saved_activation_bytes(model, x) == (3 * 4 + 3 * 8) * 4
    assert not model.training
    twice = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Tanh())  # tanh keeps its output
    assert saved_activation_bytes(twice, x) == (3 * 4 + 3 * 4 + 3 * 4) * 4


def test_training_step_measured_and_shared_with_the_benchmark(monkeypatch):
    """``measure_training_step`` times a step and leaves the model as it found it; ``run_benchmark``'s training
    fields come from it (benchmarks/cpu_latency.py's training rows call it too: they agree by construction)."""
    torch.manual_seed(0)
    model = create_any_model('mambavision_tiny', **TINY_MAMBAVISION).eval()
    optimizers = []

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)
    monkeypatch.setattr(torch.optim, 'AdamW', RecordedAdamW)
    seconds, peak_mb = measure_training_step(model, batch_size=2, img_size=32, warmup=0, iters=1)
    assert seconds > 0 and (peak_mb is None or peak_mb >= 0)
    assert not model.training and all(p.grad is None for p in model.parameters())
    # the trainer's default optimizer (optim.fused), so that its steps are the ones timed
    assert [o.defaults['fused'] for o in optimizers] == [True]

    calls = []

    def fake_step(model, batch_size, img_size, *args):
        calls.append((batch_size, img_size))
        return 0.5, 7.0
    monkeypatch.setattr(benchmark, 'measure_training_step', fake_step)
    result, = run_benchmark(['mambavision_tiny'], sizes=(32,), batch_size=2, train=True, latency=False, warmup=0,
                            iters=1, model_kwargs=TINY_MAMBAVISION, flops=False)
    assert calls == [(2, 32)]
    assert (result.train_ms_per_step, result.train_images_per_s, result.train_peak_memory_mb) == (500.0, 4.0, 7.0)
