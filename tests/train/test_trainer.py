"""Training: configs, atomic checkpoints, exact resume after SIGKILL, 2-process gloo data parallelism, corrupt
image folders, the OOM fallback, and an end-to-end smoke run of `mambazoo train` / `mambazoo validate`.

Everything runs a tiny MambaVision (0.15M parameters) on 32 px images with one thread per process, so that the
file stays fast on a shared 2-core CPU.
"""
import csv
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import PROJECT_ROOT, TINY_MAMBAVISION_YAML, TINY_TRAIN_SETS, make_image_folder
from mambazoo.cli import main as cli_main
from mambazoo.train import DEFAULTS, apply_overrides, evaluate, load_config, train
from mambazoo.train.checkpoint import RunDirError, load_training_state, save_atomic
from mambazoo.train.config import ConfigError
from mambazoo.train.trainer import build_optimizer, find_batch_size

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', HF_HUB_OFFLINE='1')


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """train() sets torch's thread count for the process; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train(out: Path, *sets: str, resume=None):
    return train(load_config(None, [*TINY_TRAIN_SETS, *sets, f'train.output={out}']), resume=resume)


def _cli(args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-m', 'mambazoo.cli', *args], env=ENV, cwd=PROJECT_ROOT, **kwargs)


def _tensors(state):
    """Every tensor in a (nested) state dict, by a flat key."""
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f'{prefix}/{k}', v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f'{prefix}/{i}', v)
    walk('', state)
    return out


def _assert_bit_identical(a, b, what):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys(), what
    assert ta, what
    for k in ta:
        same = ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k])
        if not same:
            diff = (ta[k].double() - tb[k].double()).abs().max().item() if ta[k].shape == tb[k].shape else 'shape'
            raise AssertionError(f'{what}{k} differs (max abs difference {diff})')


# ---------------------------------------------------------------------------------------------------------
# Config

def _write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize('data,key', [
    ({'optim': {'lrr': 0.1}}, 'optim.lrr'),
    ({'trian': {'seed': 1}}, 'trian'),
    ({'data': {'aug': {'hflp': 0.5}}}, 'data.aug.hflp'),
])
def test_unknown_yaml_key_is_an_error(tmp_path, data, key):
    with pytest.raises(ConfigError, match=re.escape(repr(key))) as info:
        load_config(_write_yaml(tmp_path / 'c.yaml', data))
    assert 'unknown config key' in str(info.value)


def test_unknown_override_key_and_malformed_override(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'sched.epoch'; did you mean 'sched.epochs'"):
        load_config(None, ['sched.epoch=3'])
    with pytest.raises(ConfigError, match='unknown config key'):
        apply_overrides(DEFAULTS, ['nope=1'])
    with pytest.raises(ConfigError, match='key=value'):
        load_config(None, ['sched.epochs'])
    with pytest.raises(ConfigError, match="'optim' must be a mapping"):
        load_config(None, ['optim=3'])
    (tmp_path / 'list.yaml').write_text('- 1\n')
    with pytest.raises(ConfigError, match='mapping at the top level'):
        load_config(tmp_path / 'list.yaml')
    # The CLI stops with the same message, one line, before any training starts.
    assert cli_main(['train', '--set', 'optim.lrr=0.1', '--output', str(tmp_path / 'run')]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown config key 'optim.lrr'")
    assert not (tmp_path / 'run').exists()


def test_overrides_parse_yaml_values():
    c = load_config(None, ['sched.epochs=5', 'optim.lr=0.25', 'train.amp=true', 'optim.betas=[0.9, 0.95]',
                           'data.mean=null', 'data.aug.auto_augment=rand-m9-mstd0.5-inc1', 'train.output=a=b',
                           'optim.clip_grad=5', "data.name='digits'", 'sched.warmup_epochs=0.5'])
    assert c['sched']['epochs'] == 5 and isinstance(c['sched']['epochs'], int)
    assert c['optim']['lr'] == 0.25
    assert c['train']['amp'] is True
    assert c['optim']['betas'] == [0.9, 0.95]
    assert c['data']['mean'] is None
    assert c['data']['aug']['auto_augment'] == 'rand-m9-mstd0.5-inc1'
    assert c['train']['output'] == 'a=b'
    assert c['data']['name'] == 'digits'
    assert c['sched']['warmup_epochs'] == 0.5  # a fraction of an epoch (timm's schedulers count steps)
    assert DEFAULTS['sched']['epochs'] == 10 and DEFAULTS['optim']['betas'] is None  # defaults untouched


def test_override_scientific_notation_is_a_float():
    assert load_config(None, ['optim.lr=1e-3'])['optim']['lr'] == pytest.approx(1e-3)


def test_model_kwargs_overrides_merge_with_yaml(tmp_path):
    path = _write_yaml(tmp_path / 'c.yaml', {'model': {'kwargs': {'dim': 32, 'in_dim': 16, 'depths': [1, 2, 2, 2],
                                                                 'custom_arg': 'x'}}})
    c = load_config(path, ['model.kwargs.dim=8', 'model.kwargs={in_dim: 4, num_heads: [1, 1, 2, 2]}'])
    assert c['model']['kwargs'] == {'dim': 8, 'in_dim': 4, 'depths': [1, 2, 2, 2], 'custom_arg': 'x',
                                    'num_heads': [1, 1, 2, 2]}
    # The shipped recipe loads (a registered small model by name), and a --set adds to its kwargs.
    c = load_config(PROJECT_ROOT / 'configs' / 'fashion_mnist_cpu.yaml', ['model.kwargs.dim=16', 'sched.epochs=1'])
    assert c['model']['name'] == 'mambavision_nano' and c['model']['kwargs'] == {'dim': 16}
    assert c['sched']['epochs'] == 1 and c['optim']['lr'] == 0.003 and c['data']['name'] == 'fashion_mnist'


# ---------------------------------------------------------------------------------------------------------
# find_batch_size and evaluate

def _oom_above(limit, calls):
    def step(bs):
        calls.append(bs)
        if bs > limit:
            raise torch.OutOfMemoryError(f'CUDA out of memory at batch {bs}')
    return step


def test_find_batch_size_halves_and_keeps_the_global_batch(caplog):
    calls = []
    with caplog.at_level(logging.WARNING, logger='mambazoo.train.trainer'):
        assert find_batch_size(_oom_above(20, calls), 128, 1) == (16, 8)
    assert calls == [128, 64, 32, 16]
    assert sum('out of memory' in r.getMessage() for r in caplog.records) == 3
    calls = []
    assert find_batch_size(_oom_above(1000, calls), 64, 2) == (64, 2) and calls == [64]
    assert find_batch_size(_oom_above(5, []), 24, 3) == (3, 24)   # 24 x 3 = 3 x 24


def test_find_batch_size_gives_up_at_one_and_passes_other_errors():
    with pytest.raises(torch.OutOfMemoryError):
        find_batch_size(_oom_above(0, []), 8, 1)
    calls = []

    def broken(bs):
        calls.append(bs)
        raise RuntimeError('not a memory problem')
    with pytest.raises(RuntimeError, match='not a memory problem'):
        find_batch_size(broken, 8, 1)
    assert calls == [8]


def test_find_batch_size_keeps_odd_global_batches():
    bs, accum = find_batch_size(_oom_above(2, []), 96, 1)
    assert bs * accum == 96


def test_evaluate_top1_top5_loss():
    logits = torch.tensor([[9., 8, 7, 6, 5, 4], [0, 9, 1, 2, 3, 4], [1, 2, 3, 4, 5, 9], [9, 5, 4, 3, 2, 1]])
    labels = torch.tensor([0, 2, 0, 5])  # top-1 right: row 0 only; top-5 right: rows 0 and 1

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[x.long().flatten()]
    loader = [(torch.tensor([[0.], [1.]]), labels[:2]), (torch.tensor([[2.], [3.]]), labels[2:])]
    m = evaluate(Fixed(), loader, torch.device('cpu'))
    assert m['count'] == 4
    assert m['top1'] == pytest.approx(25.0)
    assert m['top5'] == pytest.approx(50.0)
    assert m['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Atomic checkpoints

def test_save_atomic_writes_fsyncs_then_renames(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    target = tmp_path / 'last.pth'

    def fsync(fd):
        events.append(('fsync', os.path.isdir(f'/proc/self/fd/{fd}'), target.exists()))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(('replace', Path(src).parent == tmp_path and Path(src).name.startswith('.'), str(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    save_atomic({'x': torch.arange(3)}, target)
    # The temp file is fsynced before the rename (the target does not exist yet), the folder after it.
    assert [e[0] for e in events] == ['fsync', 'replace', 'fsync']
    assert events[0][1:] == (False, False)
    assert events[1][1:] == (True, str(target))
    assert events[2][1] is True
    assert torch.equal(torch.load(target)['x'], torch.arange(3))
    assert os.listdir(tmp_path) == ['last.pth']


@pytest.mark.parametrize('where', ['torch.save', 'os.replace'])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    target = tmp_path / 'last.pth'
    save_atomic({'step': 1, 'w': torch.ones(1000)}, target)
    real_save = torch.save

    def half_save(obj, f, *a, **k):
        real_save({'step': 2, 'w': torch.zeros(1000)}, f)
        f.truncate(f.tell() // 2)
        raise OSError('disk full')

    def bad_replace(src, dst):
        raise OSError('rename failed')
    if where == 'torch.save':
        monkeypatch.setattr(torch, 'save', half_save)
    else:
        monkeypatch.setattr(os, 'replace', bad_replace)
    with pytest.raises(OSError):
        save_atomic({'step': 2, 'w': torch.zeros(1000)}, target)
    monkeypatch.undo()
    state = load_training_state(target)
    assert state['step'] == 1 and torch.equal(state['w'], torch.ones(1000))
    assert os.listdir(tmp_path) == ['last.pth']  # the temp file is removed


_SAVER = r'''
import importlib.util, os, sys, time, torch
spec = importlib.util.spec_from_file_location('checkpoint', sys.argv[3])  # the module alone: a fast start
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
save_atomic = module.save_atomic
path, slow = sys.argv[1], sys.argv[2] == 'slow'
real_fsync = os.fsync
def fsync(fd):  # the window between a complete temp file and the rename, made wide
    if slow and not os.path.isdir(os.readlink(f'/proc/self/fd/{fd}')):
        print('fsync', flush=True)
        time.sleep(30)
    real_fsync(fd)
os.fsync = fsync
start = torch.load(path)['i'] if os.path.exists(path) else 0
for i in range(start + 1, start + 10 ** 6):
    save_atomic({'i': i, 'data': torch.full((2_000_000,), float(i))}, path)
    print('saved', i, flush=True)
'''


def _start_saver(tmp_path, target, slow=False):
    script = tmp_path / 'saver.py'
    script.write_text(_SAVER)
    import mambazoo.train.checkpoint as module
    return subprocess.Popen([sys.executable, str(script), str(target), 'slow' if slow else 'fast', module.__file__],
                            env=ENV, stdout=subprocess.PIPE, text=True)


def _check_whole(target, at_least):
    state = torch.load(target)
    assert state['i'] >= at_least
    assert torch.equal(state['data'], torch.full((2_000_000,), float(state['i'])))
    return state['i']


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / 'last.pth'
    # 1. Killed after the temp file is complete but before the rename: the previous checkpoint stays.
    save_atomic({'i': 1, 'data': torch.full((2_000_000,), 1.0)}, target)
    proc = _start_saver(tmp_path, target, slow=True)
    assert proc.stdout.readline().strip() == 'fsync'
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert _check_whole(target, 1) == 1
    strays = [p.name for p in tmp_path.iterdir() if p.name not in ('last.pth', 'saver.py')]
    assert len(strays) == 1 and strays[0].startswith('.last.pth.') and strays[0].endswith('.tmp')
    # 2. Killed at random moments of a save loop: always a whole checkpoint, never a torn one.
    rng = random.Random(0)
    last = 1
    for _ in range(2):
        proc = _start_saver(tmp_path, target)
        assert proc.stdout.readline().startswith('saved')
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        last = _check_whole(target, last + 1)
    # Leftover temp files are hidden, never named like a checkpoint, and never picked by a glob for them.
    assert [p.name for p in tmp_path.glob('*.pth')] == ['last.pth']
    assert all(p.name.startswith('.') and p.name.endswith('.tmp')
               for p in tmp_path.iterdir() if p.name not in ('last.pth', 'saver.py'))


# ---------------------------------------------------------------------------------------------------------
# One tiny in-process run: checkpoint contents, logs, resume edge cases

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('tiny') / 'run'
    threads = torch.get_num_threads()
    try:
        result = _train(out, 'data.name=fake', 'data.fake_size=[32,16]', 'sched.epochs=2', 'ema.enabled=true',
                        'ema.decay=0.9', 'train.checkpoint_interval_steps=2', 'train.tensorboard=true',
                        'train.plots=true')
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_checkpoint_contents(tiny_run):
    out, result = tiny_run
    last = load_training_state(out / 'last.pth')
    for key in ('model', 'ema', 'optimizer', 'scheduler', 'scaler', 'rng', 'epoch', 'step_in_epoch',
                'global_step', 'config', 'best_top1', 'best_epoch', 'history', 'mambazoo_model'):
        assert key in last, key
    record = last['mambazoo_model']  # what load_model rebuilds the model from (tests/train/test_model_file.py)
    assert record['name'] == 'mambavision_tiny' and record['args']['dim'] == 8
    assert record['args']['num_classes'] == 10 and record['args']['in_chans'] == 3
    assert record['pretrained_cfg']['input_size'] == [3, 32, 32] and len(record['pretrained_cfg']['label_names']) == 10
    assert last['epoch'] == 2 and last['step_in_epoch'] == 0 and last['global_step'] == 8
    assert set(last['rng']) >= {'python', 'numpy', 'torch'}
    assert last['optimizer']['state'] and last['scheduler']
    assert last['config']['data']['name'] == 'fake' and last['config']['model']['kwargs']['dim'] == 8
    model = result['model'].state_dict()
    _assert_bit_identical(last['model'], model, 'last.pth model ')
    _assert_bit_identical(last['ema'], result['ema'].state_dict(), 'last.pth ema ')
    assert not torch.equal(last['ema']['head.weight'], last['model']['head.weight'])
    best = load_training_state(out / 'best.pth')
    for key in ('model', 'ema', 'optimizer', 'scheduler', 'scaler', 'rng', 'epoch', 'step_in_epoch', 'global_step',
                'top1', 'mambazoo_model', 'config'):  # the full training state, as last.pth
        assert key in best, key
    assert best['epoch'] == result['best_epoch'] and best['top1'] == result['best_top1']
    assert sorted(p.name for p in out.glob('*.pth')) == ['best.pth', 'last.pth']
    assert not [p for p in out.iterdir() if p.name.endswith('.tmp')]


def test_run_logs_csv_curves_tensorboard(tiny_run):
    out, result = tiny_run
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert [int(r['epoch']) for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= float(r['val_top1']) <= 100 and float(r['val_top5']) >= float(r['val_top1'])
        assert np.isfinite(float(r['train_loss'])) and 'ema_top1' in r
    assert float(rows[-1]['val_top1']) == pytest.approx(result['final']['val_top1'])
    from PIL import Image
    png = np.asarray(Image.open(out / 'curves.png').convert('L'), dtype=np.float64)
    assert png.shape[0] > 100 and png.std() > 5
    events = list((out / 'tensorboard').glob('events.out.tfevents.*'))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert [e.value for e in acc.Scalars('epoch/val_top1')] == pytest.approx([float(r['val_top1']) for r in rows])


def test_resume_of_a_finished_run_changes_nothing(tiny_run, tmp_path):
    out, _ = tiny_run
    before = load_training_state(out / 'last.pth')
    import shutil
    copy = tmp_path / 'run'
    shutil.copytree(out, copy)
    _train(copy, 'data.name=fake', 'data.fake_size=[32,16]', 'sched.epochs=2', 'ema.enabled=true',
           'ema.decay=0.9', 'train.checkpoint_interval_steps=2', resume='auto')
    after = load_training_state(copy / 'last.pth')
    _assert_bit_identical(before['model'], after['model'], 'model ')
    assert after['global_step'] == before['global_step']


def test_resume_missing_checkpoint(tmp_path):
    with pytest.raises(RunDirError, match='nothing to resume: no checkpoint at .*nothing.pth'):
        _train(tmp_path / 'a', 'data.name=fake', 'data.fake_size=[8,8]', 'sched.epochs=1',
               resume=str(tmp_path / 'nothing.pth'))
    # 'auto' with nothing to resume is an error too, and nothing is written.
    with pytest.raises(RunDirError, match='nothing to resume'):
        _train(tmp_path / 'b', 'data.name=fake', 'data.fake_size=[8,8]', 'sched.epochs=1', resume='auto')
    assert not (tmp_path / 'b').exists()


@pytest.mark.parametrize('sets, fused', [([], True), (['optim.opt=adam'], True), (['optim.fused=false'], False),
                                          (['optim.opt=sgd'], False)])
def test_optimizer_is_torchs_fused_adam_unless_told_otherwise(sets, fused):
    """The fused kernel updates the weights as the per-tensor loop does (same steps, float32 rounding apart)."""
    o_cfg = load_config(None, ['optim.lr=0.01', *sets])['optim']
    weights = {}
    for kind in ('built', 'plain'):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
        opt = build_optimizer(model, o_cfg) if kind == 'built' else \
            build_optimizer(model, {**o_cfg, 'fused': False})
        assert bool(opt.defaults.get('fused')) == (fused if kind == 'built' else False)
        for step in range(3):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        weights[kind] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(weights['built'], weights['plain'], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Interrupted in-process (fast): an exception at the 4th checkpoint, then resume

INTERRUPT_SETS = ['sched.epochs=1', 'train.checkpoint_interval_steps=1', 'ema.enabled=true', 'ema.decay=0.8',
                  'model.drop_path_rate=0.1']
INTERRUPT_DATA = {
    'fake': ['data.name=fake', 'data.fake_size=[48,16]'],
    # in-memory images, crop and flip only: augmented a batch at a time (BatchAugment) by the trainer; with the
    # main job's channels-last layout
    'digits_batched': ['data.name=digits', 'data.aug.color_jitter=0', 'data.aug.train_interpolation=bilinear',
                       'data.aug.scale=[0.5,1.0]', 'train.max_steps_per_epoch=6', 'train.channels_last=true'],
}


@pytest.fixture(scope='module', params=sorted(INTERRUPT_DATA))
def interrupted_runs(tmp_path_factory, request):
    import mambazoo.train.trainer as trainer_module
    base = tmp_path_factory.mktemp('interrupt')
    sets = [*INTERRUPT_SETS, *INTERRUPT_DATA[request.param]]
    threads = torch.get_num_threads()
    try:
        reference = _train(base / 'reference', *sets)
        saves = []

        def failing_save(obj, path):
            saves.append(obj['global_step'] if 'global_step' in obj else None)
            if len(saves) == 4:
                raise KeyboardInterrupt('stopped during the 4th checkpoint')
            return save_atomic(obj, path)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainer_module, 'save_atomic', failing_save)
            with pytest.raises(KeyboardInterrupt):
                _train(base / 'resumed', *sets)
        assert load_training_state(base / 'resumed' / 'last.pth')['global_step'] == 3
        resumed = _train(base / 'resumed', *sets, resume='auto')
    finally:
        torch.set_num_threads(threads)
    return reference, resumed


def test_interrupted_and_resumed_in_process_is_bit_exact(interrupted_runs):
    reference, resumed = interrupted_runs
    _assert_bit_identical(reference['model'].state_dict(), resumed['model'].state_dict(), 'model ')
    _assert_bit_identical(reference['ema'].state_dict(), resumed['ema'].state_dict(), 'ema ')
    for key in ('val_loss', 'val_top1', 'val_top5', 'ema_top1', 'lr'):
        assert reference['final'][key] == resumed['final'][key], key


def test_interrupted_epoch_train_loss_matches(interrupted_runs):
    reference, resumed = interrupted_runs
    assert resumed['final']['train_loss'] == pytest.approx(reference['final']['train_loss'], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL

KILL_SETS = ['data.name=fake', 'data.fake_size=[48,16]', 'sched.epochs=2', 'sched.warmup_epochs=1',
             'train.checkpoint_interval_steps=1', 'data.mixup.mixup_alpha=0.8', 'data.mixup.cutmix_alpha=1.0',
             'loss.label_smoothing=0.1', 'data.aug.auto_augment=rand-m9-mstd0.5-inc1', 'data.aug.re_prob=0.25',
             'model.drop_path_rate=0.2', 'ema.enabled=true', 'ema.decay=0.8', 'optim.clip_grad=1.0']
TOTAL_STEPS = 12  # 48 images / batch 8 = 6 steps x 2 epochs
RESUMED = re.compile(r'resumed from .*: epoch (\d+), step (\d+), global step (\d+)')


def _kill_at(proc, last: Path, threshold: int, timeout: float = 240) -> int:
    """SIGKILL ``proc`` as soon as its last.pth reaches ``threshold`` optimizer steps."""
    seen, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f'the run ended (rc {proc.returncode}) before step {threshold}'
        try:
            st = last.stat()
        except FileNotFoundError:
            time.sleep(0.01)
            continue
        if (st.st_ino, st.st_mtime_ns) != seen:
            seen = (st.st_ino, st.st_mtime_ns)
            step = torch.load(last, map_location='cpu', weights_only=False)['global_step']  # never torn
            if step >= threshold:
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(30) == -signal.SIGKILL
                return step
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f'no checkpoint with {threshold} steps after {timeout} s')


def test_sigkill_and_resume_is_bit_exact(tmp_path):
    reference = _train(tmp_path / 'reference', *KILL_SETS)
    ref = load_training_state(tmp_path / 'reference' / 'last.pth')
    assert ref['global_step'] == TOTAL_STEPS

    out = tmp_path / 'killed'
    args = ['train', '--set', *TINY_TRAIN_SETS, *KILL_SETS, '--output', str(out)]
    log = open(tmp_path / 'log.txt', 'w+')
    for i, threshold in enumerate((1, 5, 8)):  # first checkpoint, mid epoch 1, mid epoch 2
        proc = _cli(args + (['--resume'] if i else []), stdout=log, stderr=subprocess.STDOUT)
        _kill_at(proc, out / 'last.pth', threshold)
    proc = _cli(args + ['--resume'], stdout=log, stderr=subprocess.STDOUT)
    assert proc.wait(300) == 0
    log.seek(0)
    text = log.read()
    resumed_at = [tuple(map(int, m)) for m in RESUMED.findall(text)]
    print('resumed at (epoch, step in epoch, global step):', resumed_at)
    assert len(resumed_at) == 3, text
    steps = [g for _, _, g in resumed_at]
    assert steps[0] >= 1 and steps[1] >= 5 and steps[2] >= 8 and steps[-1] < TOTAL_STEPS, resumed_at
    assert any(s != 0 for _, s, _ in resumed_at), 'no resume happened mid-epoch'

    got = load_training_state(out / 'last.pth')
    assert got['global_step'] == TOTAL_STEPS and got['epoch'] == 2
    _assert_bit_identical(ref['model'], got['model'], 'model ')
    _assert_bit_identical(ref['ema'], got['ema'], 'ema ')
    _assert_bit_identical(ref['optimizer'], got['optimizer'], 'optimizer ')
    assert got['scheduler'] == ref['scheduler']
    for a, b in zip(ref['history'], got['history']):
        for key in ('train_loss', 'val_loss', 'val_top1', 'val_top5', 'ema_top1', 'lr'):
            assert a[key] == b[key], key
    best_ref, best_got = load_training_state(tmp_path / 'reference' / 'best.pth'), load_training_state(out / 'best.pth')
    assert best_ref['epoch'] == best_got['epoch']
    _assert_bit_identical(best_ref['model'], best_got['model'], 'best ')
    assert reference['final']['val_top1'] == got['history'][-1]['val_top1']


# ---------------------------------------------------------------------------------------------------------
# Data parallel: torchrun, gloo, 2 processes

DDP_SETS = ['data.name=digits', 'sched.epochs=1', 'optim.lr=0.003', 'model.drop_path_rate=0.0',
            'data.aug.scale=[0.75,1.0]', 'data.aug.hflip=0.0', 'data.aug.color_jitter=0.0', 'data.crop_pct=1.0']


def _update(sd, init, keys):
    return torch.cat([(sd[k].double() - init[k].double()).flatten() for k in keys])


@pytest.fixture(scope='module')
def ddp_runs(tmp_path_factory):
    """2 processes x batch 32 (torchrun, gloo), 1 process x batch 64 (the same global batch), and a control:
    1 process x batch 32 for as many steps (what a rank alone would do without gradient averaging)."""
    base = tmp_path_factory.mktemp('ddp')
    torchrun = Path(sys.executable).with_name('torchrun')
    if not torchrun.exists():
        pytest.skip('torchrun is not installed beside the interpreter')
    ddp_out = base / 'ddp'
    proc = subprocess.run([str(torchrun), '--standalone', '--nproc_per_node=2', '-m', 'mambazoo.cli', 'train',
                           '--set', *TINY_TRAIN_SETS, *DDP_SETS, 'data.batch_size=32', 'train.tensorboard=true',
                           '--output', str(ddp_out)],
                          env=ENV, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        _train(base / 'one', *DDP_SETS, 'data.batch_size=64')
        _train(base / 'half', *DDP_SETS, 'data.batch_size=32', 'train.max_steps_per_epoch=20')
    finally:
        torch.set_num_threads(threads)
    return {'ddp': ddp_out, 'one': base / 'one', 'half': base / 'half', 'stdout': proc.stdout}


@pytest.mark.slow
def test_gloo_two_processes_match_one_process_with_the_same_global_batch(ddp_runs):
    """What holds: rank r takes every 2nd index of the same permutation, so at each step the ranks' samples
    together are the 1-process batch, with the same per-sample augmentations; DDP averages the gradients, so
    the mean loss gradient is the 1-process one. What does not: BatchNorm normalises over each rank's 32 images
    instead of all 64 (no SyncBatchNorm), and DDP keeps rank 0's running statistics, so the weights are close,
    not equal. Tolerance: measured relative distance of the weight updates ~0.23 (cosine ~0.97), against ~0.6
    (cosine ~0.8) for the control that sees half the global batch; we require DDP to be at most half as far
    as the control, and the validation metrics close."""
    L = lambda d: load_training_state(d / 'last.pth')
    ddp, one, half = L(ddp_runs['ddp']), L(ddp_runs['one']), L(ddp_runs['half'])
    assert ddp['global_step'] == one['global_step'] == half['global_step'] == 20  # (1437 - 143 held out) // 64
    assert ddp['scheduler'] == one['scheduler']
    from mambazoo.data.loader import derive_seed, seed_all
    import mambazoo
    seed_all(derive_seed(0, 0, 0xA11))  # the trainer's initialisation seed for rank 0
    init = mambazoo.create_model('mambavision_tiny', num_classes=10, in_chans=1, drop_path_rate=0.0,
                                 **yaml.safe_load(TINY_MAMBAVISION_YAML)).state_dict()
    keys = [k for k, v in init.items() if v.is_floating_point() and 'running' not in k]
    u_one, u_ddp, u_half = (_update(s['model'], init, keys) for s in (one, ddp, half))
    rel_ddp = ((u_ddp - u_one).norm() / u_one.norm()).item()
    rel_half = ((u_half - u_one).norm() / u_one.norm()).item()
    cos = torch.nn.functional.cosine_similarity(u_ddp, u_one, dim=0).item()
    print(f'update distance to 1 process: DDP {rel_ddp:.3f} (cosine {cos:.3f}), half-batch control {rel_half:.3f}')
    assert rel_ddp < 0.4 and cos > 0.93, (rel_ddp, cos)
    assert rel_ddp < 0.5 * rel_half, (rel_ddp, rel_half)
    # Validation over both ranks (every image once, all-reduced) against 1 process: same images, close metrics.
    a, b = ddp['history'][-1], one['history'][-1]
    assert abs(a['val_top1'] - b['val_top1']) < 5.0
    assert abs(a['val_loss'] - b['val_loss']) < 0.05
    assert a['lr'] == b['lr']
    # top-1 over the 143 held-out validation images comes in steps of 100/143: no image counted twice or missed.
    assert abs(a['val_top1'] * 143 / 100 - round(a['val_top1'] * 143 / 100)) < 1e-6


@pytest.mark.slow
def test_gloo_rank0_alone_writes_checkpoints_and_logs(ddp_runs):
    out = ddp_runs['ddp']
    assert sorted(p.name for p in out.iterdir()) == ['best.pth', 'last.pth', 'metrics.csv', 'tensorboard',
                                                     'test_metrics.json']
    assert len(list((out / 'tensorboard').iterdir())) == 1  # one event file: rank 1 opened no writer
    stdout = ddp_runs['stdout']
    assert stdout.count('training mambavision_tiny') == 1
    assert stdout.count('epoch 1/1:') == 1
    assert stdout.count('done: best val top-1') == 1
    assert stdout.count('test: top-1') == 1  # the test set evaluated once, over both ranks
    assert '2 processes' in stdout


@pytest.mark.slow
def test_gloo_cli_final_line_once(ddp_runs):
    assert ddp_runs['stdout'].count('final:') == 1


# ---------------------------------------------------------------------------------------------------------
# Corrupt images in an image folder

def test_training_over_corrupt_images_then_validate(tmp_path, caplog, capsys):
    bad = make_image_folder(tmp_path / 'images', per_class=8)
    out = tmp_path / 'run'
    with caplog.at_level(logging.WARNING, logger='mambazoo.data.datasets'):
        result = _train(out, 'data.name=imagefolder', f'data.path={tmp_path / "images"}', 'sched.epochs=2',
                        'data.batch_size=4', 'data.aug.auto_augment=rand-m9-mstd0.5-inc1')
    assert result['final'] and (out / 'last.pth').is_file()
    assert load_training_state(out / 'last.pth')['global_step'] == 2 * (19 // 4)
    messages = ' '.join(r.getMessage() for r in caplog.records)
    for path in bad['train'] + bad['val']:
        assert path in messages, f'{path} was not reported'

    capsys.readouterr()
    code = cli_main(['validate', '--checkpoint', str(out / 'best.pth'), '--data', str(tmp_path / 'images'),
                     '--json'])
    assert code == 0
    captured = capsys.readouterr()
    import json
    metrics = json.loads(captured.out)
    assert sorted(metrics['skipped_files']) == bad['val']
    assert 0 <= metrics['top1'] <= 100 and metrics['top5'] == 100.0  # 2 classes
    code = cli_main(['validate', '--checkpoint', str(out / 'best.pth'), '--data', str(tmp_path / 'images')])
    assert code == 0
    captured = capsys.readouterr()
    assert 'top-1' in captured.out and 'top-5' in captured.out
    for path in bad['val']:
        assert f'skipped unreadable image {path}' in captured.err


def test_validate_counts_only_readable_images(tmp_path):
    make_image_folder(tmp_path / 'images', per_class=8)
    from mambazoo.train.validate import validate
    metrics = validate('mambavision_tiny', None, tmp_path / 'images', batch_size=8, img_size=32,
                       model_kwargs=yaml.safe_load(TINY_MAMBAVISION_YAML))
    assert len(metrics['skipped_files']) == 3
    assert metrics['count'] == 16


def test_validate_reads_last_pth(tiny_run, capsys):
    out, result = tiny_run
    assert cli_main(['validate', '--checkpoint', str(out / 'last.pth'), '--data', 'digits']) == 0
    assert 'top-1' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Smoke: the shipped recipe through the command line

def test_smoke_train_and_validate_cli(tmp_path, capsys):
    out = tmp_path / 'smoke'
    code = cli_main(['train', '--config', str(PROJECT_ROOT / 'configs' / 'fashion_mnist_cpu.yaml'),
                     '--output', str(out), '--set', 'data.name=digits', f'model.kwargs={TINY_MAMBAVISION_YAML}',
                     'data.batch_size=32', 'data.eval_batch_size=128', 'train.max_steps_per_epoch=3', 'sched.epochs=2',
                     'sched.warmup_epochs=0', 'train.progress=false', 'train.threads=1'])
    assert code == 0
    printed = capsys.readouterr().out
    assert 'epoch 2/2' in printed and 'final: val top-1' in printed
    for name in ('best.pth', 'last.pth', 'metrics.csv', 'curves.png'):
        assert (out / name).is_file(), name
    assert list((out / 'tensorboard').glob('events.out.tfevents.*'))
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(rows) == 2
    last = load_training_state(out / 'last.pth')
    assert last['global_step'] == 6 and last['config']['data']['name'] == 'digits'
    assert last['config']['model']['kwargs']['window_size'] == [8, 8, 2, 1]  # merged from the YAML
    from PIL import Image
    assert np.asarray(Image.open(out / 'curves.png').convert('L')).std() > 5

    code = cli_main(['validate', '--checkpoint', str(out / 'best.pth'), '--data', 'digits'])
    assert code == 0
    line = capsys.readouterr().out
    m = re.search(r'on digits \((\d+) images\): top-1 ([\d.]+)%, top-5 ([\d.]+)%', line)
    assert m, line
    assert int(m.group(1)) == 359  # the digits test split
    assert float(m.group(3)) >= float(m.group(2))


def test_validate_reproduces_the_trainers_test(tmp_path):
    out = tmp_path / 'run'
    result = _train(out, 'data.name=digits', 'data.interpolation=bilinear', 'data.crop_pct=1.0',
                    'data.batch_size=32', 'train.max_steps_per_epoch=4', 'sched.epochs=1')
    from mambazoo.train.validate import validate
    metrics = validate(None, out / 'best.pth', 'digits', batch_size=128)
    assert metrics['count'] == result['test']['count'] == 359
    assert metrics['top1'] == pytest.approx(result['test']['top1'])
    assert metrics['loss'] == pytest.approx(result['test']['loss'], rel=1e-6)  # bilinear vs bicubic: ~1e-4


def test_train_without_fashion_mnist_fails_clearly(tmp_path, capsys):
    code = cli_main(['train', '--set', f'data.path={tmp_path}', 'data.img_size=32', '--output', str(tmp_path / 'r')])
    assert code == 2
    err = capsys.readouterr().err
    assert 'Fashion-MNIST not found' in err and 'digits' in err
