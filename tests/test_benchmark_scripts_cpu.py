"""The CPU benchmark scripts run end to end on tiny settings: benchmarks/cpu_latency.py (the CPU speed issue's and
issue 19's benchmark) on one model with one pass per row, its latency rows and its training rows apart, and
benchmarks/cpu_kernels.py on two calls; every table, the machine's limits in the header, and the JSON. The numbers
of so short a run mean nothing; this checks that the scripts can print everything."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / 'benchmarks'
SCRIPT = BENCHMARKS / 'cpu_latency.py'


def _run(args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _check_limits(out, limits):
    assert out.count('# machine limits:') == 2 and 'G state updates/s per core' in out
    for key in ('fma_gflops_per_core', 'fma_gflops_all', 'gemm_gmacs', 'scan_updates_per_s_per_core'):
        assert limits[key] > 0, key


def test_cpu_latency_smoke_run_prints_every_table(tmp_path):
    report = tmp_path / 'cpu_latency.json'
    out = _run([SCRIPT, '--models', 'mambavision_tiny', '--only', 'infer', '--repeats', '1', '--repeats-batch8', '1',
                '--repeats-ref', '1', '--no-memory', '--json', report])
    for title in ('| model | batch 1 ms', '| target | batch |', '| official code path (issue anchor) |'):
        assert title in out, f'{title!r} missing from the output'
    for row in ('| convnext_tiny (timm) |', '| mambavision_tiny |', '| mambavision_tiny (ref scan) |'):
        assert row in out
    assert 'our linear layers on' in out  # the header says which GEMM road our rows took
    assert 'GMAC/img' in out and '| training target |' not in out
    data = json.loads(report.read_text())
    _check_limits(out, data['machine_limits'])
    assert len(data['targets']) == 4 and all(t['measured'] > 0 for t in data['targets'])
    assert [(a['ours'], a['batch']) for a in data['anchors']] == [('mambavision_tiny', 1), ('mambavision_tiny', 8)]
    assert all(a['scaled_ms'] > 0 and a['speedup'] > 0 for a in data['anchors'])
    for row in data['rows']:  # the roofline columns: multiply-adds per image, achieved GMAC/s
        assert row['macs_per_image'] > 1e9 and all(rate > 0 for rate in row['gmacs_per_s'].values())
    assert 'train' not in data and data['train_batches'] == []


def test_cpu_latency_training_rows(tmp_path):
    report = tmp_path / 'cpu_latency_train.json'
    out = _run([SCRIPT, '--models', 'mambavision_tiny', '--only', 'train', '--train-batches', '2', '--repeats', '1',
                '--json', report])
    for title in ('| model | batch | step ms |', '| training target | batch |'):
        assert title in out, f'{title!r} missing from the output'
    assert '| model | batch 1 ms' not in out and 'TrainingStep' in out and '(turns with convnext_tiny (timm))' in out
    data = json.loads(report.read_text())
    _check_limits(out, data['machine_limits'])
    assert [(r['key'], r['batch']) for r in data['train']] == [('timm:convnext_tiny', 2), ('mambavision_tiny', 2)]
    assert all(r['step_ms'] > 0 and r['gmacs_per_s'] > 0 and r['saved_mb'] > 0 for r in data['train'])
    target, = data['train_targets']
    kept = {r['key']: r['saved_mb'] for r in data['train']}
    assert target['kept_ratio'] == pytest.approx(kept['mambavision_tiny'] / kept['timm:convnext_tiny'])
    assert (target['ours'], target['peer'], target['batch'], target['time_limit']) == (
        'mambavision_tiny', 'timm:convnext_tiny', 2, 1.0)
    assert target['time_ratio'] > 0 and target['met'] in (True, False)


def test_cpu_kernels_prints_the_efficiency_table():
    out = _run([BENCHMARKS / 'cpu_kernels.py', '--batches', '2', '--repeats', '1', '--rounds', '2', '--match', 'hybrid-T'])
    rows = [line for line in out.splitlines() if line.startswith('| hybrid-T')]
    assert len(rows) == 2  # the scan and the mixer layer
    assert 'G updates/s per core, 1 thread' in out and 'split target' in out
    assert out.count('# machine limits:') == 2
    for row in rows:  # batch 2 is large enough to split: each row says whether two threads made 1.7x
        assert row.rstrip(' |').endswith(('met', 'NOT met (< 1.7x)'))
