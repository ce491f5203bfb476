"""``mambazoo train --task detection|segmentation``: short runs that learn, write checkpoints and metrics, and
resume exactly; the CLI wiring."""
import csv
import shutil

import pytest
import torch

from helpers import TINY_DOWNSTREAM_SETS
from mambazoo.cli import main as cli_main
from mambazoo.downstream import build_composed_datasets, collate_detection
from mambazoo.downstream import train as downstream_train
from mambazoo.downstream.train import train_downstream
from mambazoo.train import load_config
from mambazoo.train.checkpoint import load_training_state

TINY = [*TINY_DOWNSTREAM_SETS, 'downstream.warmup_steps=2', 'optim.lr=0.002', 'sched.warmup_lr=0.0001']


def _config(tmp_path, task, *overrides):
    return load_config(None, TINY + [f'task={task}', f'train.output={tmp_path}', *overrides])


@pytest.mark.parametrize('task, metric', [('detection', 'bbox_map'), ('segmentation', 'miou')])
def test_short_run_learns_and_writes_checkpoints(tmp_path, task, metric):
    result = train_downstream(_config(tmp_path, task, 'downstream.steps=20', 'downstream.eval_interval=10'))
    first, last = result['history']
    assert (first['step'], last['step']) == (10, 20)
    assert last['train_loss'] < 0.85 * first['train_loss'], result['history']
    assert 0.0 <= last[metric] <= 1.0 and result['metric'] == metric
    rows = list(csv.DictReader(open(tmp_path / 'metrics.csv')))
    assert [int(r['step']) for r in rows] == [10, 20] and float(rows[1][metric]) == pytest.approx(last[metric])
    ckpt = load_training_state(tmp_path / 'last.pth')
    assert ckpt['task'] == task and ckpt['step'] == 20 and ckpt['classes'][0] == 'background'
    model = downstream_train.build_task_model(ckpt['config'], ckpt['num_classes'])
    model.load_state_dict(ckpt['model'])  # the checkpoint rebuilds its model from its own config
    assert (tmp_path / 'best.pth').is_file()


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """A run resumed from its step-3 checkpoint ends with the weights of the uninterrupted 6-step run."""
    saved = []
    real_save = downstream_train.save_atomic

    def save_and_keep_step_3(obj, path):
        real_save(obj, path)
        if obj['step'] == 3 and path.name == 'last.pth':
            saved.append(shutil.copy(path, tmp_path / 'step3.pth'))

    monkeypatch.setattr(downstream_train, 'save_atomic', save_and_keep_step_3)
    steps = ['downstream.steps=6', 'downstream.eval_interval=6', 'train.checkpoint_interval_steps=3',
             'downstream.detector=mask_rcnn']
    full = train_downstream(_config(tmp_path / 'full', 'detection', *steps))
    assert saved and load_training_state(tmp_path / 'step3.pth')['step'] == 3
    resumed_dir = tmp_path / 'resumed'
    resumed_dir.mkdir()
    shutil.copy(tmp_path / 'step3.pth', resumed_dir / 'last.pth')
    resumed = train_downstream(_config(resumed_dir, 'detection', *steps), resume='auto')
    a, b = full['model'].state_dict(), resumed['model'].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed['final']['segm_map'] == full['final']['segm_map']
    with pytest.raises(ValueError, match="'detection' checkpoint"):
        train_downstream(_config(resumed_dir, 'segmentation', *steps), resume=str(resumed_dir / 'last.pth'))


def test_cli_task_option(tmp_path, capsys):
    sets = TINY + ['downstream.steps=2', 'downstream.eval_interval=2']
    assert cli_main(['train', '--task', 'segmentation', '--output', str(tmp_path), '--set', *sets]) == 0
    out = capsys.readouterr().out
    assert 'final (segmentation, step 2)' in out and 'miou' in out
    assert load_training_state(tmp_path / 'last.pth')['task'] == 'segmentation'
    assert cli_main(['train', '--output', str(tmp_path), '--set', 'task=tracking']) == 2
    assert 'task must be one of' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(['train', '--task', 'tracking'])



class _HalfOracle(torch.nn.Module):
    """A 'detector' that finds the true boxes on even-numbered canvases and only a wrong box on odd ones."""

    def __init__(self, dataset):
        super().__init__()
        self.items = [dataset[i] for i in range(len(dataset))]

    def forward(self, images):
        out = []
        for image in images:
            index = next(i for i, (x, _) in enumerate(self.items) if torch.equal(x, image))
            truth = self.items[index][1]
            n = len(truth['labels'])
            boxes = truth['boxes'] if index % 2 == 0 else torch.tensor([[0.0, 0.0, 2.0, 2.0]]).repeat(n, 1)
            # Distinct scores: COCO's ranking (hence the mAP) then does not depend on the order of the images.
            scores = 0.9 - 0.05 * index - 0.01 * torch.arange(n, dtype=torch.float32)
            out.append({'boxes': boxes, 'labels': truth['labels'], 'scores': scores})
        return out


def _val_set():
    return build_composed_datasets('digits', train_size=1, val_size=9, canvas_size=64, item_size=(16, 32))[1]


def _evaluate_on_rank(rank, world_size, init_file, result_file):
    import torch.distributed as dist
    from mambazoo.data.loader import ResumableSampler
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        val = _val_set()
        sampler = ResumableSampler(len(val), shuffle=False, rank=rank, world_size=world_size, pad=False)
        loader = torch.utils.data.DataLoader(val, batch_size=2, sampler=sampler, collate_fn=collate_detection)
        figures = downstream_train.evaluate_detection(_HalfOracle(val), loader, torch.device('cpu'))
        if rank == 0:
            torch.save(figures, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: 10-30 s
def test_distributed_evaluation_scores_the_whole_validation_set(tmp_path):
    """2 gloo processes share 9 canvases (rank 0: the 5 even ones, all found; rank 1: the 4 odd ones, all
    missed): the mAP each rank reports is the mAP of all 9, as one process computes it."""
    import torch.multiprocessing as mp
    mp.spawn(_evaluate_on_rank, args=(2, str(tmp_path / 'init'), str(tmp_path / 'figures.pt')), nprocs=2)
    distributed = torch.load(tmp_path / 'figures.pt')
    val = _val_set()
    loader = torch.utils.data.DataLoader(val, batch_size=2, collate_fn=collate_detection)
    alone = downstream_train.evaluate_detection(_HalfOracle(val), loader, torch.device('cpu'))
    assert 0.2 < alone['bbox_map'] < 0.9, alone  # neither rank 0's share alone (1.0) nor rank 1's (0.0)
    assert distributed == pytest.approx(alone, abs=1e-9)
