"""``mambazoo train --task detection|segmentation``: train and evaluate a detector or a segmenter.

    from mambazoo.train import load_config
    from mambazoo.downstream.train import train_downstream
    result = train_downstream(load_config('configs/detection_fashion_cpu.yaml'))

The config is the classification trainer's (``mambazoo.train.config``): ``model.*`` names the backbone,
``optim.*`` / ``sched.*`` the optimizer and the learning-rate schedule (counted in optimizer steps here),
``data.batch_size`` / ``data.workers`` the loading, ``train.*`` the run (seed, output, device, threads, amp), and
``downstream.*`` the task's own settings (detector, data set composition, head sizes, steps, evaluation).

Evaluation: COCO-style box (and, for Mask R-CNN, mask) mAP through torchmetrics' ``MeanAveragePrecision`` with
the pycocotools backend; mIoU and pixel accuracy for segmentation. Checkpoints (``last.pth``, ``best.pth``) are
written atomically; ``metrics.csv`` has one row per evaluation. Every step reseeds the generators from
(seed, step, rank) and the data order depends on (seed, epoch) only, so a resumed run continues as the
uninterrupted one would have. Under torchrun the model is wrapped in DistributedDataParallel, every rank takes
its share of the data, and the metrics are summed over the ranks.
"""
import csv
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data.loader import ResumableSampler, derive_seed, match_channels, seed_all
from ..models._builder import get_pretrained_cfg
from ..train.checkpoint import checked_run_dir, load_training_state, restore_training_state, rng_state, save_atomic
from ..train.trainer import build_optimizer, setup_distributed
from .data import build_composed_datasets, collate_detection
from .detection import DETECTORS, build_detector
from .segmentation import build_segmenter, confusion_matrix, mean_iou

__all__ = ['TASKS', 'train_downstream', 'evaluate_detection', 'evaluate_segmentation', 'build_task_model']

TASKS = ('detection', 'segmentation')


# ---------------------------------------------------------------------------------------------------------
# Set-up

def _normalisation(config: Dict[str, Any], channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    d = config['data']
    if d['mean'] is not None:
        mean, std = tuple(d['mean']), tuple(d['std'])
    else:
        cfg = get_pretrained_cfg(config['model']['name'])
        mean, std = cfg.get('mean', (0.485, 0.456, 0.406)), cfg.get('std', (0.229, 0.224, 0.225))
    return match_channels(mean, std, channels)


def build_task_model(config: Dict[str, Any], num_classes: int) -> nn.Module:
    """The detector (``task: detection``) or segmenter (``task: segmentation``) the config describes;
    ``num_classes`` counts the background."""
    task, m, ds = config['task'], config['model'], config['downstream']
    channels = int(ds['channels'])
    mean, std = _normalisation(config, channels)
    kwargs = dict(m['kwargs'] or {})
    if m['drop_path_rate'] is not None:
        kwargs['drop_path_rate'] = m['drop_path_rate']
    backbone = dict(pretrained=m['pretrained'], checkpoint_path=m['checkpoint'], in_chans=channels,
                    model_kwargs=kwargs, fpn_channels=int(ds['fpn_channels']), image_mean=mean, image_std=std)
    if task == 'detection':
        if ds['detector'] not in DETECTORS:
            raise ValueError(f'downstream.detector must be one of {", ".join(DETECTORS)}, got {ds["detector"]!r}')
        return build_detector(m['name'], num_classes, kind=ds['detector'], image_size=int(ds['canvas_size']),
                              anchor_sizes=ds['anchor_sizes'], aspect_ratios=ds['aspect_ratios'],
                              box_head_dim=int(ds['box_head_dim']), mask_head_dim=int(ds['mask_head_dim']),
                              **backbone, **dict(ds['detector_kwargs'] or {}))
    if task == 'segmentation':
        return build_segmenter(m['name'], num_classes, head_channels=int(ds['seg_head_channels']), **backbone)
    raise ValueError(f'task must be one of {", ".join(TASKS)} here, got {task!r}')


def _to_device(targets: List[Dict[str, Any]], device: torch.device, keys: Tuple[str, ...]) -> List[Dict[str, Any]]:
    return [{k: t[k].to(device) for k in keys} for t in targets]


# ---------------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate_detection(model: nn.Module, loader, device: torch.device, masks: bool = False) -> Dict[str, float]:
    """COCO mAP (0.50:0.95), mAP@50, mAP@75 and mAR@100 of boxes (and masks): keys 'bbox_map', 'segm_map', ...

    Under torchrun every rank gathers all ranks' predictions and scores the whole set (torchmetrics' own
    synchronisation expects the same number of images per rank, which a split validation set does not give).
    """
    try:
        from torchmetrics.detection import MeanAveragePrecision
        import pycocotools  # noqa: F401  (the backend; torchmetrics imports it only when computing)
    except ImportError as e:
        raise RuntimeError(f'detection metrics need torchmetrics and pycocotools ({e}): '
                           f'pip install "mambazoo[detection]"') from None
    iou_types = ('bbox', 'segm') if masks else ('bbox',)
    metric = MeanAveragePrecision(iou_type=list(iou_types), backend='pycocotools', sync_on_compute=False)
    gathered: List[Tuple[List, List]] = []
    model.eval()
    for images, targets in loader:
        preds = model([im.to(device) for im in images])
        pred_rows, true_rows = [], []
        for p, t in zip(preds, targets):
            row = {'boxes': p['boxes'].cpu(), 'scores': p['scores'].cpu(), 'labels': p['labels'].cpu()}
            truth = {'boxes': t['boxes'], 'labels': t['labels']}
            if masks:
                row['masks'] = (p['masks'][:, 0] > 0.5).cpu()
                truth['masks'] = t['masks'].bool()
            pred_rows.append(row)
            true_rows.append(truth)
        gathered.append((pred_rows, true_rows))
    if dist.is_initialized():
        every_rank: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, gathered)
        gathered = [batch for rank_batches in every_rank for batch in rank_batches]
    for pred_rows, true_rows in gathered:
        metric.update(pred_rows, true_rows)
    scores = metric.compute()
    out = {}
    for iou_type in iou_types:
        for name in ('map', 'map_50', 'map_75', 'mar_100'):
            key = name if len(iou_types) == 1 else f'{iou_type}_{name}'
            out[f'{iou_type}_{name}'] = float(scores[key])
    return out


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, device: torch.device, num_classes: int,
                          ignore_index: int = 255) -> Dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU over a loader (confusion matrices summed over the ranks)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, targets in loader:
        logits = model(torch.stack(images).to(device))
        labels = torch.stack([t['semantic'] for t in targets]).to(device)
        confusion += confusion_matrix(logits.argmax(1), labels, num_classes, ignore_index)
    if dist.is_initialized():
        dist.all_reduce(confusion)
    return mean_iou(confusion.cpu())


# ---------------------------------------------------------------------------------------------------------
# Training

def _write_metrics(path: Path, history: List[Dict[str, float]]) -> None:
    fields: List[str] = []
    for row in history:
        fields += [k for k in row if k not in fields]
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)


def _training_batches(loader, sampler: ResumableSampler, start_step: int) -> Iterator[Tuple[List, List]]:
    """Batches for steps ``start_step``, ``start_step + 1``, ... over as many epochs as it takes; the batch of a
    given step is the same whether or not the run was resumed."""
    steps_per_epoch = len(loader)
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(skip * loader.batch_size)
        yield from loader
        epoch, skip = epoch + 1, 0


def train_downstream(config: Dict[str, Any], resume: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Train and evaluate the detector / segmenter of ``config`` (``task`` 'detection' or 'segmentation').

    Args:
        config: a config from ``mambazoo.train.load_config``.
        resume: a checkpoint path, or 'auto' for the run's last.pth (an error when there is none).
        overwrite: replace a run the output folder holds (otherwise such a folder is refused).
    Returns:
        {'task', 'final' (the last evaluation's figures), 'best', 'best_step', 'metric' (the one 'best' is
        judged by), 'history', 'output', 'seconds', 'rank', 'model'}.
    """
    task, ds, t_cfg, o_cfg, s_cfg = (config['task'], config['downstream'], config['train'], config['optim'],
                                     config['sched'])
    if task not in TASKS:
        raise ValueError(f'train_downstream runs task detection or segmentation, got {task!r}')
    steps, warmup = int(ds['steps']), int(ds['warmup_steps'])
    if steps < 1:
        raise ValueError(f'downstream.steps must be at least 1, got {steps}')
    if t_cfg['threads']:
        torch.set_num_threads(t_cfg['threads'])
    rank, world_size, device = setup_distributed(t_cfg['device'])
    is_main, seed = rank == 0, int(t_cfg['seed'])
    seed_all(derive_seed(seed, rank, 0xD37))
    out_dir = Path(t_cfg['output'])

    train_set, val_set, classes = build_composed_datasets(
        ds['source'], config['data']['path'], train_size=int(ds['train_size']), val_size=int(ds['val_size']),
        seed=seed, canvas_size=int(ds['canvas_size']), items=tuple(ds['items']), item_size=tuple(ds['item_size']),
        channels=int(ds['channels']))
    num_classes = len(classes) + 1  # + background
    model = build_task_model(config, num_classes)
    # The same guarantees as the classification trainer's: no run written over, room for the checkpoints.
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    resume_from = checked_run_dir(out_dir, resume, overwrite, 10 * state_bytes, is_main)
    model.to(device)
    with_masks = task == 'detection' and ds['detector'] == 'mask_rcnn'
    target_keys = ('boxes', 'labels', 'masks') if with_masks else ('boxes', 'labels')

    batch_size = int(config['data']['batch_size'])
    eval_bs = int(config['data']['eval_batch_size'] or batch_size)
    workers = int(config['data']['workers'])
    train_sampler = ResumableSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=train_sampler,
                                               num_workers=workers, drop_last=True, collate_fn=collate_detection)
    if len(train_loader) == 0:
        raise ValueError(f'downstream.train_size ({len(train_set)}) is smaller than one batch ({batch_size} x '
                         f'{world_size} processes)')
    val_sampler = ResumableSampler(len(val_set), shuffle=False, rank=rank, world_size=world_size, pad=False)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=eval_bs, sampler=val_sampler, num_workers=workers,
                                             collate_fn=collate_detection)

    from timm.scheduler import create_scheduler_v2
    optimizer = build_optimizer(model, o_cfg)
    # One scheduler "epoch" per optimizer step: detection schedules are counted in iterations.
    scheduler, _ = create_scheduler_v2(optimizer, sched=s_cfg['sched'], num_epochs=steps, warmup_epochs=warmup,
                                       warmup_lr=s_cfg['warmup_lr'], min_lr=s_cfg['min_lr'], step_on_epochs=False,
                                       updates_per_epoch=1)
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[t_cfg['amp_dtype']] if t_cfg['amp'] else None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    train_model = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    metric_name = 'miou' if task == 'segmentation' else ('segm_map' if with_masks else 'bbox_map')

    state: Dict[str, Any] = {'step': 0, 'best': -1.0, 'best_step': -1, 'history': [], 'loss_sum': 0.0,
                             'loss_count': 0}
    if resume_from is not None:
        ckpt = load_training_state(resume_from)
        if ckpt.get('task') != task:
            raise ValueError(f'{resume_from} is a {ckpt.get("task")!r} checkpoint, not {task!r}')
        restore_training_state(ckpt, state, model, optimizer, scheduler, scaler)
        if is_main:
            print(f'resumed from {resume_from} at step {state["step"]}')

    def checkpoint(path: Path, **extra: Any) -> None:
        if is_main:
            save_atomic({**extra, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                         'scheduler': scheduler.state_dict(),
                         'scaler': scaler.state_dict() if scaler is not None else None, 'rng': rng_state(),
                         **state, 'config': config, 'task': task, 'arch': config['model']['name'],
                         'num_classes': num_classes, 'classes': ['background'] + classes}, path)

    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        what = ds['detector'] if task == 'detection' else 'FPN segmenter'
        print(f'training {what} on {config["model"]["name"]} ({n_params / 1e6:.2f}M params) for {task}: '
              f'{ds["source"]} objects on {ds["canvas_size"]} px canvases ({len(train_set)} train / {len(val_set)} '
              f'val, {len(classes)} classes), {steps} steps x batch {batch_size} x {world_size} processes, '
              f'{device}, {torch.get_num_threads()} threads; output {out_dir}')

    def evaluate() -> Dict[str, Any]:
        if task == 'segmentation':
            return evaluate_segmentation(model, val_loader, device, num_classes)
        return evaluate_detection(model, val_loader, device, masks=with_masks)

    eval_interval = int(ds['eval_interval'] or steps)
    ckpt_interval = int(t_cfg['checkpoint_interval_steps'] or 0)
    log_interval = max(1, int(t_cfg['log_interval']))
    clip = o_cfg['clip_grad']
    t_start = time.perf_counter()
    t_log, seen_since_log = time.perf_counter(), 0
    batches = _training_batches(train_loader, train_sampler, state['step'])
    final: Dict[str, Any] = dict(state['history'][-1]) if state['history'] else {}
    while state['step'] < steps:
        step = state['step']
        train_model.train()
        images, targets = next(batches)
        images = [im.to(device) for im in images]
        seed_all(derive_seed(seed, step, rank))  # drop path, the RPN's and RoI heads' box sampling: fixed per step
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if task == 'detection':
                losses = train_model(images, _to_device(targets, device, target_keys))
                loss = sum(losses.values())
            else:
                logits = train_model(torch.stack(images))
                labels = torch.stack([t['semantic'] for t in targets]).to(device)
                losses = {'loss_ce': F.cross_entropy(logits.float(), labels, ignore_index=255)}
                loss = losses['loss_ce']
        if not torch.isfinite(loss):
            parts = ', '.join(f'{k} {v.item()}' for k, v in losses.items())
            raise FloatingPointError(f'loss is {loss.item()} at step {step} ({parts}): lower optim.lr or raise '
                                     f'downstream.warmup_steps')
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state['step'] = step = step + 1
        scheduler.step_update(num_updates=step)
        state['loss_sum'] += loss.item()
        state['loss_count'] += 1
        seen_since_log += len(images) * world_size
        if is_main and t_cfg['progress'] and (step % log_interval == 0 or step == steps):
            now = time.perf_counter()
            parts = ', '.join(f'{k} {v.item():.3f}' for k, v in losses.items())
            print(f'step {step}/{steps}: loss {loss.item():.4f} ({parts}), lr {optimizer.param_groups[0]["lr"]:.2e}, '
                  f'{seen_since_log / (now - t_log):.1f} img/s', flush=True)
            t_log, seen_since_log = now, 0
        if step % eval_interval == 0 or step == steps:
            figures = evaluate()
            row = {'step': step, 'train_loss': state['loss_sum'] / max(state['loss_count'], 1),
                   **{k: v for k, v in figures.items() if not isinstance(v, list)},
                   'lr': optimizer.param_groups[0]['lr'], 'elapsed_s': time.perf_counter() - t_start}
            state.update(loss_sum=0.0, loss_count=0)
            state['history'] = state['history'] + [row]
            score = row[metric_name]
            if is_main:
                shown = ', '.join(f'{k} {v:.4f}' for k, v in row.items() if k not in ('step', 'lr', 'elapsed_s'))
                print(f'eval at step {step}: {shown} ({row["elapsed_s"]:.0f} s)', flush=True)
                _write_metrics(out_dir / 'metrics.csv', state['history'])
            if not math.isnan(score) and score > state['best']:
                state.update(best=score, best_step=step)
                checkpoint(out_dir / 'best.pth', metrics=row)
            checkpoint(out_dir / 'last.pth')
            final = row
        elif ckpt_interval and step % ckpt_interval == 0:
            checkpoint(out_dir / 'last.pth')
    if world_size > 1:
        dist.barrier()
    seconds = time.perf_counter() - t_start
    if is_main:
        print(f'done: best {metric_name} {state["best"]:.4f} (step {state["best_step"]}); checkpoints '
              f'{out_dir / "best.pth"}, {out_dir / "last.pth"}; metrics {out_dir / "metrics.csv"}')
    return {'task': task, 'final': final, 'best': state['best'], 'best_step': state['best_step'],
            'metric': metric_name, 'history': state['history'], 'output': str(out_dir), 'seconds': seconds,
            'rank': rank, 'model': model}
