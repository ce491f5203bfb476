"""benchmarks/scan_gpu.py (issue 7's GPU benchmark) runs end to end: its ``--smoke`` mode on tiny shapes, which on a
machine without a GPU runs the Triton kernels in Triton's interpreter (the script sets TRITON_INTERPRET=1 itself).
The numbers of a smoke run mean nothing; this checks that the one GPU run the script gets can print everything."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'scan_gpu.py'
SCAN_ROWS = ('vim_t', 'vmamba_t_s1', 'b32_l3136', 'mambavision_t_s3', 'b8_d1536_l4096', 'vim_t_1248')


@pytest.mark.slow
def test_scan_gpu_smoke_run_prints_every_table(tmp_path):
    report = tmp_path / 'scan_gpu.json'
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, str(SCRIPT), '--smoke', '--part', 'all', '--json', str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    for title in ('## Scan: correctness', '## Scan forward, ms', '## Scan forward+backward, ms', '## End to end',
                  '## Summary'):
        assert title in out, f'{title!r} missing from the output'
    summary = out[out.index('## Summary'):]
    for row in SCAN_ROWS:
        assert f'| {row} | ok |' in summary, f'scan row {row} missing from the summary or its check failed'
        assert out.count(f'| {row} |') == 4, f'scan row {row} should appear in all four scan tables'
    for model in ('deit_tiny_patch16_224', 'vim_tiny'):
        assert f'| {model} |' in summary, f'model {model} missing from the summary'
    assert 'FAILED' not in out and 'error' not in summary

    data = json.loads(report.read_text())
    assert set(data['scan']['rows']) == set(SCAN_ROWS)
    for name, row in data['scan']['rows'].items():
        assert row['check']['ok'], name
        assert row['triton_fwd_ms'] > 0 and row['chunked_fwd_ms'] > 0 and row['fwdbwd_bytes'] > row['fwd_bytes']
    assert [r['model'] for r in data['models']['results']] == ['deit_tiny_patch16_224', 'vim_tiny']
    assert all(r['error'] is None and r['train_images_per_s'] > 0 for r in data['models']['results'])
