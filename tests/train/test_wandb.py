"""Weights & Biases logging, offline: a run with ``train.wandb=true`` works without a network and its offline
run file holds the same metrics as metrics.csv (what ``wandb sync`` would upload later)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import PROJECT_ROOT, TINY_TRAIN_SETS

wandb = pytest.importorskip('wandb')
from wandb.proto import wandb_internal_pb2  # noqa: E402


def read_offline_run(path: Path):
    """The protobuf records of a W&B offline run file (``run-*.wandb``).

    The file is a 7-byte header (':W&B', magic, version) then a LevelDB-style log: 32 KiB blocks of chunks, each
    a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes.
    """
    data = path.read_bytes()
    assert data[:4] == b':W&B', 'not a W&B run file'
    block, pos, pending, records = 32768, 7, b'', []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b''
    return records


def history_values(records, key):
    values = []
    for record in records:
        if record.WhichOneof('record_type') != 'history':
            continue
        for item in record.history.item:
            name = item.key or '/'.join(item.nested_key)
            if name == key:
                values.append(json.loads(item.value_json))
    return values


@pytest.mark.slow
def test_offline_wandb_run_logs_the_epoch_metrics(tmp_path):
    out = tmp_path / 'run'
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    env.update(OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', WANDB_SILENT='true',
               WANDB_CONFIG_DIR=str(tmp_path / 'wandb_config'), WANDB_CACHE_DIR=str(tmp_path / 'wandb_cache'))
    sets = [*TINY_TRAIN_SETS, 'data.name=fake', 'data.fake_size=[32,16]', 'sched.epochs=2', 'train.wandb=true']
    proc = subprocess.run([sys.executable, '-m', 'mambazoo.cli', 'train', '--output', str(out), '--set', *sets],
                          env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / 'wandb').glob('offline-run-*/run-*.wandb'))
    assert len(runs) == 1, 'expected one offline run (WANDB_MODE defaults to offline)'
    records = read_offline_run(runs[0])
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(rows) == 2
    for key in ('val_top1', 'train_loss'):
        logged = history_values(records, f'epoch/{key}')
        assert logged == pytest.approx([float(r[key]) for r in rows], rel=1e-6), key
    assert history_values(records, 'step/loss'), 'per-step values are logged too'
    runs = [r.run for r in records if r.WhichOneof('record_type') == 'run']
    config = {item.key: json.loads(item.value_json) for run in runs for item in run.config.update}
    assert config['sched']['epochs'] == 2 and config['train']['wandb'] is True, 'the run config is logged'
