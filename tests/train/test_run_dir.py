"""Runs are never lost (issue 18): a run folder is never written over by accident, a resume needs a checkpoint,
outputs that cannot hold a run are refused before the first step, a failed save says why and leaves nothing
half-written; the validation images are held out of the training split and the test split is evaluated once.

Through ``mambazoo train`` (in this process) and the functions behind it; the runs are a tiny MambaVision trained for
two steps of 8 images on scikit-learn's digits (32 px, one thread), nothing downloaded.
"""
import contextlib
import csv
import io
import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import PROJECT_ROOT, TINY_DOWNSTREAM_SETS, TINY_TRAIN_SETS, run_cli
from mambazoo.cli import main
from mambazoo.data import build_data
from mambazoo.data.datasets import load_digits
from mambazoo.data.loader import holdout_split
from mambazoo.train import checkpoint, load_config
from mambazoo.train.checkpoint import (CheckpointSaveError, RunDirError, load_training_state, prepare_run_dir,
                                       save_atomic)

DIGITS_SETS = [*TINY_TRAIN_SETS, 'data.name=digits', 'train.max_steps_per_epoch=2', 'sched.epochs=1']
DIGITS_TRAIN, DIGITS_TEST = 1438, 359  # load_digits' deterministic 80/20 split of the 1,797 images

DOWNSTREAM_SETS = [*TINY_DOWNSTREAM_SETS, 'downstream.steps=2', 'downstream.eval_interval=2', 'train.tensorboard=false']

DiskUsage = namedtuple('DiskUsage', 'total used free')
DISK_FULL_ERROR = '[enforce fail at inline_container.cc:672] . unexpected pos'


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """train sets torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train_argv(out: Path, *sets: str, options=()) -> list:
    return ['train', *options, '--output', str(out), '--set', *DIGITS_SETS, *sets]


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """One finished run (`mambazoo train` on digits, 1 epoch x 2 steps): (folder, exit status, stdout, stderr)."""
    out = tmp_path_factory.mktemp('run_dir') / 'run'
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(_train_argv(out))
    finally:
        torch.set_num_threads(threads)
    return out, code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture
def run_copy(digits_run, tmp_path):
    """A copy of the finished run, for a test to train into."""
    out, code, _, err = digits_run
    assert code == 0, err
    return Path(shutil.copytree(out, tmp_path / 'run'))


def _snapshot(folder: Path) -> dict:
    """{relative path: (bytes, mtime in ns)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob('*')) if p.is_file()}


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# An existing run: refused, resumed, or replaced

def test_second_train_into_a_run_is_refused_and_changes_nothing(run_copy, capsys):
    before = _snapshot(run_copy)
    assert 'last.pth' in before and 'best.pth' in before and 'metrics.csv' in before
    code, out, err = run_cli(_train_argv(run_copy), capsys)
    assert code == 2, err
    line = _error_line(err)
    assert str(run_copy) in line and 'already holds a run' in line and '--resume' in line and '--overwrite' in line
    assert _snapshot(run_copy) == before  # every file byte-identical, none touched, none added


def test_resume_continues_the_run(run_copy, capsys):
    assert load_training_state(run_copy / 'last.pth')['global_step'] == 2
    code, out, err = run_cli(_train_argv(run_copy, 'sched.epochs=2', options=['--resume']), capsys)
    assert code == 0, err
    assert f'resumed from {run_copy / "last.pth"}: epoch 1' in out
    last = load_training_state(run_copy / 'last.pth')
    assert last['epoch'] == 2 and last['global_step'] == 4
    assert [int(r['epoch']) for r in csv.DictReader(open(run_copy / 'metrics.csv'))] == [1, 2]


def test_overwrite_starts_a_fresh_run(run_copy, capsys):
    old_best = (run_copy / 'best.pth').read_bytes()
    code, out, err = run_cli(_train_argv(run_copy, 'train.max_steps_per_epoch=1', options=['--overwrite']), capsys)
    assert code == 0, err
    assert 'resumed from' not in out
    last = load_training_state(run_copy / 'last.pth')
    assert last['global_step'] == 1 and last['epoch'] == 1  # counted from 0 again, not from the old run's 2
    assert [int(r['epoch']) for r in csv.DictReader(open(run_copy / 'metrics.csv'))] == [1]
    assert (run_copy / 'best.pth').read_bytes() != old_best


def test_resume_without_a_checkpoint_is_an_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'new'
    code, _, err = run_cli(_train_argv(out, options=['--resume']), capsys)
    assert code == 2, err
    line = _error_line(err)
    assert 'nothing to resume' in line and str(out / 'last.pth') in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# Outputs that cannot hold a run: refused before the first step

def test_output_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / 'plain').write_text('a file, not a folder\n')
    out = tmp_path / 'plain' / 'run'
    code, _, err = run_cli(_train_argv(out), capsys)
    assert code == 2, err
    line = _error_line(err)
    assert 'cannot write' in line and str(out) in line


def test_too_little_free_space_is_refused_with_the_sizes(tmp_path, monkeypatch, capsys):
    mb = 2 ** 20
    monkeypatch.setattr(checkpoint.shutil, 'disk_usage', lambda path: DiskUsage(1000 * mb, 999 * mb, 1 * mb))
    code, _, err = run_cli(_train_argv(tmp_path / 'run'), capsys)
    assert code == 2, err
    line = _error_line(err)
    assert 'not enough space' in line and str(tmp_path / 'run') in line
    assert 'MB' in line.split('need about')[1] and '1 MB free of 1,000 MB' in line
    assert not list((tmp_path / 'run').glob('*.pth'))
    # The function itself: what the checkpoints need against what the file system has.
    with pytest.raises(RunDirError, match=r'need about 10 MB, the file system has 1 MB free of 1,000 MB'):
        prepare_run_dir(tmp_path / 'other', None, False, needed_bytes=10 * mb)
    assert prepare_run_dir(tmp_path / 'other', None, False, needed_bytes=mb // 2) is None  # enough: a new run


# ---------------------------------------------------------------------------------------------------------
# Saving: stale temporaries cleared, a failed save named

def test_save_atomic_removes_stale_temporaries(tmp_path):
    stale = tmp_path / '.last.pth.k1ll3d.tmp'
    stale.write_bytes(b'half a checkpoint')
    unrelated = tmp_path / 'notes.tmp'
    unrelated.write_text('not ours')
    save_atomic({'step': 3}, tmp_path / 'last.pth')
    assert not stale.exists()
    assert unrelated.exists()
    assert load_training_state(tmp_path / 'last.pth') == {'step': 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth', 'notes.tmp']


def _disk_full(*args, **kwargs):
    raise RuntimeError(DISK_FULL_ERROR)


def test_failed_save_names_the_file_and_the_free_space(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth'
    save_atomic({'step': 1}, path)
    monkeypatch.setattr(checkpoint.torch, 'save', _disk_full)
    with pytest.raises(CheckpointSaveError) as info:
        save_atomic({'step': 2}, path)
    message = str(info.value)
    assert isinstance(info.value, OSError)  # the CLI's user errors: one line, exit 2
    assert str(path) in message and 'MB free' in message and 'unexpected pos' in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']  # no temporary file left
    monkeypatch.undo()
    assert load_training_state(path) == {'step': 1}  # the previous checkpoint, whole


def test_failed_save_during_train_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint.torch, 'save', _disk_full)
    code, _, err = run_cli(_train_argv(tmp_path / 'run'), capsys)
    assert code == 2, err
    line = _error_line(err)
    assert 'cannot write the checkpoint' in line and str(tmp_path / 'run') in line and 'MB free' in line
    assert not list((tmp_path / 'run').glob('.*.tmp'))


# ---------------------------------------------------------------------------------------------------------
# The detection / segmentation trainer: the same refusal

def test_downstream_trainer_refuses_an_existing_run(tmp_path, monkeypatch, capsys):
    from mambazoo.downstream import train as downstream_train
    out = tmp_path / 'det'
    save_atomic({'step': 7, 'task': 'detection'}, out / 'last.pth')
    before = _snapshot(out)
    steps = []
    monkeypatch.setattr(downstream_train, 'save_atomic', lambda *a, **k: steps.append(a))
    code, _, err = run_cli(['train', '--task', 'detection', '--config',
                            str(PROJECT_ROOT / 'configs' / 'detection_fashion_cpu.yaml'), '--output', str(out),
                            '--set', *DOWNSTREAM_SETS], capsys)
    assert code == 2, err
    line = _error_line(err)
    assert str(out) in line and 'already holds a run (last.pth)' in line
    assert '--resume' in line and '--overwrite' in line
    assert _snapshot(out) == before and not steps


# ---------------------------------------------------------------------------------------------------------
# Validation held out of the training split; the test split evaluated once

def test_holdout_split_is_disjoint_covering_and_seeded():
    train_idx, val_idx = holdout_split(1000, 'auto', seed=0)
    assert len(val_idx) == 100 and len(train_idx) == 900  # 'auto': a tenth (under 5000)
    assert not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(1000))
    assert train_idx == sorted(train_idx) and val_idx == sorted(val_idx)
    assert holdout_split(1000, 'auto', seed=0) == (train_idx, val_idx)  # deterministic per seed
    assert holdout_split(1000, 'auto', seed=1)[1] != val_idx  # another seed, other images
    assert len(holdout_split(60000, 'auto', seed=0)[1]) == 5000  # 'auto': at most 5000
    assert len(holdout_split(1000, 7, seed=0)[1]) == 7
    for count in (0, 1000):
        with pytest.raises(ValueError, match='both sides'):
            holdout_split(1000, count, seed=0)


def _digits_bundle(*sets: str):
    return build_data(load_config(None, [*TINY_TRAIN_SETS, 'data.name=digits', *sets]))


def test_build_data_holds_out_validation_from_the_digits_training_split():
    bundle = _digits_bundle()
    train_split, test_split = load_digits('train'), load_digits('val')
    assert len(train_split) == DIGITS_TRAIN and len(test_split) == DIGITS_TEST
    train_idx, val_idx = bundle.train.indices, bundle.val.indices
    assert len(val_idx) == DIGITS_TRAIN // 10
    assert not set(train_idx) & set(val_idx)
    assert sorted([*train_idx, *val_idx]) == list(range(DIGITS_TRAIN))
    for subset in (bundle.train, bundle.val):  # both index the training split's images
        np.testing.assert_array_equal(subset.dataset.images, train_split.images)
        np.testing.assert_array_equal(subset.dataset.labels, train_split.labels)
    assert bundle.test is not None and len(bundle.test) == DIGITS_TEST
    np.testing.assert_array_equal(bundle.test.images, test_split.images)
    np.testing.assert_array_equal(bundle.test.labels, test_split.labels)
    assert 'held out' in bundle.val_source
    # The held-out images follow train.seed; data.holdout sets their number.
    assert _digits_bundle('train.seed=1').val.indices != val_idx
    assert _digits_bundle().val.indices == val_idx
    assert len(_digits_bundle('data.holdout=50').val) == 50


def test_digits_run_tests_once_and_validate_agrees(digits_run, capsys):
    out, code, stdout, err = digits_run
    assert code == 0, err
    test_lines = [line for line in stdout.splitlines() if line.startswith('test:')]
    assert len(test_lines) == 1, stdout
    tested = json.loads((out / 'test_metrics.json').read_text())
    assert tested['count'] == DIGITS_TEST and tested['checkpoint'] == str(out / 'best.pth')
    assert f'top-1 {tested["top1"]:.2f}%' in test_lines[0]
    code, printed, err = run_cli(['validate', '--checkpoint', str(out / 'best.pth'), '--data', 'digits', '--json'],
                                 capsys)
    assert code == 0, err
    validated = json.loads(printed)
    assert validated['count'] == tested['count']
    assert validated['top1'] == pytest.approx(tested['top1'], abs=1e-9)
    assert validated['top5'] == pytest.approx(tested['top5'], abs=1e-9)
