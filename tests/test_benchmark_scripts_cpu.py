"""benchmarks/cpu_latency.py (the CPU speed issue's benchmark) runs end to end on one model with one pass per row:
the latency table, the targets and the issue-anchor table are printed and written to the JSON. The numbers of
so short a run mean nothing; this checks that the script can print everything."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'cpu_latency.py'


def test_cpu_latency_smoke_run_prints_every_table(tmp_path):
    report = tmp_path / 'cpu_latency.json'
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, str(SCRIPT), '--models', 'mambavision_tiny', '--repeats', '1',
                           '--repeats-batch8', '1', '--repeats-ref', '1', '--no-memory', '--json', str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    for title in ('| model | batch 1 ms', '| target | batch |', '| official code path (issue anchor) |'):
        assert title in out, f'{title!r} missing from the output'
    for row in ('| convnext_tiny (timm) |', '| mambavision_tiny |', '| mambavision_tiny (ref scan) |'):
        assert row in out
    assert 'our linear layers on' in out  # the header says which GEMM road our rows took
    data = json.loads(report.read_text())
    assert len(data['targets']) == 4 and all(t['measured'] > 0 for t in data['targets'])
    assert [(a['ours'], a['batch']) for a in data['anchors']] == [('mambavision_tiny', 1), ('mambavision_tiny', 8)]
    assert all(a['scaled_ms'] > 0 and a['speedup'] > 0 for a in data['anchors'])
