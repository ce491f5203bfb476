"""The training loop shared by every family: timm's optimizers, schedulers, mixup and EMA around our models.

    from mambazoo.train import load_config, train
    result = train(load_config('configs/fashion_mnist_cpu.yaml'))

Exact resume: every optimizer step reseeds all generators from (seed, epoch, step, rank), the data order and the
augmentations depend only on (seed, epoch, sample) (see ``mambazoo.data.loader``), and the checkpoint holds
everything that changes during training (weights, EMA, optimizer, scheduler, scaler, counters). A run killed
at any point and resumed from its last checkpoint therefore ends with the same weights, bit for bit on a CPU,
as a run that was never interrupted.
"""
import contextlib
import copy
import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..data.loader import SeededDataset, build_data, build_loader, derive_seed, seed_all
from ..models import create_model
from ..models._builder import get_pretrained_cfg
from ..models.model_file import RECORD_KEY, model_record, recorded_cfg
from .checkpoint import checked_run_dir, load_training_state, restore_training_state, rng_state, save_atomic

_logger = logging.getLogger(__name__)

__all__ = ['train', 'evaluate', 'setup_distributed', 'TrainResult']

TrainResult = Dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# Set-up

def setup_distributed(device_name: str) -> Tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed when launched by torchrun."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    use_cuda = device_name == 'cuda' or (device_name == 'auto' and torch.cuda.is_available())
    if use_cuda:
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    return rank, world_size, device


def _model_args(config: Dict[str, Any], num_classes: int, in_chans: int) -> Dict[str, Any]:
    """The arguments the model is built with beside its name (what its checkpoints record)."""
    m = config['model']
    kwargs = dict(m['kwargs'] or {}, num_classes=num_classes, in_chans=in_chans)
    if m['drop_path_rate'] is not None:
        kwargs['drop_path_rate'] = m['drop_path_rate']
    return kwargs


def _build_model(config: Dict[str, Any], num_classes: int, in_chans: int) -> nn.Module:
    m = config['model']
    return create_model(m['name'], pretrained=m['pretrained'], checkpoint_path=m['checkpoint'],
                        **_model_args(config, num_classes, in_chans))


def _criterion(config: Dict[str, Any], mixup_active: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    smoothing = config['loss']['label_smoothing']
    if mixup_active:
        return SoftTargetCrossEntropy()  # mixup already folds the label smoothing into its targets
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def _mixup(config: Dict[str, Any], num_classes: int):
    from timm.data import Mixup
    mx = config['data']['mixup']
    if mx['mixup_alpha'] <= 0 and mx['cutmix_alpha'] <= 0:
        return None
    return Mixup(mixup_alpha=mx['mixup_alpha'], cutmix_alpha=mx['cutmix_alpha'], prob=mx['prob'],
                 switch_prob=mx['switch_prob'], mode=mx['mode'],
                 label_smoothing=config['loss']['label_smoothing'], num_classes=num_classes)


def _fresh_sums() -> Dict[str, float]:
    """Running training loss / correct / seen counts of one epoch."""
    return {'loss': 0.0, 'correct': 0, 'seen': 0}


def build_optimizer(model: nn.Module, o_cfg: Dict[str, Any], **extra: Any) -> torch.optim.Optimizer:
    """timm's optimizer as ``config['optim']`` says, with torch's fused Adam/AdamW unless ``optim.fused`` is false
    (one kernel over every tensor instead of a dozen ops per tensor). Both trainers build theirs here."""
    from timm.optim import create_optimizer_v2
    kwargs = {k: o_cfg[k] for k in ('betas', 'eps') if o_cfg[k] is not None}
    fused = o_cfg['opt'] in ('adam', 'adamw') if o_cfg['fused'] is None else o_cfg['fused']
    if fused:
        kwargs['fused'] = True
    return create_optimizer_v2(model, opt=o_cfg['opt'], lr=o_cfg['lr'], weight_decay=o_cfg['weight_decay'],
                               momentum=o_cfg['momentum'], **kwargs, **extra)


def find_batch_size(step_fn, batch_size: int, accum_steps: int) -> Tuple[int, int]:
    """Shrink the per-step batch until ``step_fn(batch)`` runs without running out of memory, raising the
    accumulation so that the global batch (batch x accumulation) stays exactly the same.

    Each retry takes the largest divisor of the global batch that is at most half the failed batch.
    """
    global_batch = batch_size * accum_steps
    while True:
        try:
            step_fn(batch_size)
            return batch_size, accum_steps
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            smaller = max(d for d in range(1, batch_size // 2 + 1) if global_batch % d == 0)
            _logger.warning('out of memory at batch %d per step: trying %d with %dx accumulation',
                            batch_size, smaller, global_batch // smaller)
            batch_size, accum_steps = smaller, global_batch // smaller


# ---------------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             world_size: int = 1) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent), mean cross-entropy and images/s over a loader (summed over ranks)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    t0 = time.perf_counter()
    for batch in loader:
        if batch is None:  # every image of the batch was unreadable
            continue
        x, y = batch[0].to(device), batch[1].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[-1])
        top = out.topk(k, dim=-1).indices
        correct = top.eq(y[:, None])
        sums += torch.tensor([nn.functional.cross_entropy(out, y, reduction='sum').item(),
                              correct[:, 0].sum().item(), correct.any(dim=1).sum().item(), len(y)],
                             dtype=torch.float64)
    seconds = time.perf_counter() - t0
    if world_size > 1:
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1)
    return {'loss': loss / n, 'top1': 100 * top1 / n, 'top5': 100 * top5 / n, 'count': int(n),
            'images_per_s': n / seconds if seconds > 0 else 0.0}


# ---------------------------------------------------------------------------------------------------------
# Logging

class _RunLog:
    """CSV (always), TensorBoard and Weights & Biases (optional) on rank 0; PNG curves at the end."""

    def __init__(self, out_dir: Path, config: Dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.out_dir = out_dir
        self.history: List[Dict[str, float]] = []
        self.tb = self.wandb = None
        if not enabled:
            return
        t = config['train']
        if t['tensorboard']:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(out_dir / 'tensorboard'))
        if t['wandb']:
            try:
                import wandb
            except ImportError:
                raise RuntimeError('train.wandb is on but wandb is not installed: pip install "mambazoo[wandb]"')
            os.environ.setdefault('WANDB_MODE', 'offline')  # works without a network; `wandb sync` later
            self.wandb = wandb.init(project=t['wandb_project'], config=config, dir=str(out_dir))

    def step(self, global_step: int, values: Dict[str, float]) -> None:
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f'train_step/{k}', v, global_step)
        if self.wandb:
            self.wandb.log({f'step/{k}': v for k, v in values.items()}, step=global_step)

    def epoch(self, row: Dict[str, float], global_step: int) -> None:
        if not self.enabled:
            return
        self.history.append(row)
        path = self.out_dir / 'metrics.csv'
        with open(path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.history)
        if self.tb:
            for k, v in row.items():
                if k != 'epoch':
                    self.tb.add_scalar(f'epoch/{k}', v, row['epoch'])
            self.tb.flush()
        if self.wandb:
            self.wandb.log({f'epoch/{k}': v for k, v in row.items()}, step=global_step)

    def close(self, make_plots: bool) -> Optional[Path]:
        if not self.enabled:
            return None
        png = plot_history(self.history, self.out_dir / 'curves.png') if make_plots and self.history else None
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        return png


def plot_history(history: List[Dict[str, float]], path: Path) -> Path:
    """Loss, accuracy and learning rate per epoch, as one PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [h['epoch'] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [h['train_loss'] for h in history], 'o-', label='train')
    axes[0].plot(epochs, [h['val_loss'] for h in history], 'o-', label='val')
    axes[0].set_title('loss')
    axes[1].plot(epochs, [h['val_top1'] for h in history], 'o-', label='val top-1')
    if 'ema_top1' in history[0]:
        axes[1].plot(epochs, [h['ema_top1'] for h in history], 'o-', label='EMA val top-1')
    if not math.isnan(history[0].get('train_top1', float('nan'))):
        axes[1].plot(epochs, [h['train_top1'] for h in history], 'o-', label='train top-1')
    axes[1].set_title('accuracy (%)')
    axes[2].plot(epochs, [h['lr'] for h in history], 'o-')
    axes[2].set_title('learning rate (end of epoch)')
    for ax in axes:
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Training

def train(config: Dict[str, Any], resume: Optional[str] = None, overwrite: bool = False) -> TrainResult:
    """Train and validate as ``config`` says, then test the best checkpoint once where the data has a test set.

    ``resume``: a checkpoint path or 'auto' (the run's last.pth); ``overwrite``: replace a run the output folder
    holds (otherwise such a folder is refused: ``checkpoint.prepare_run_dir``)."""
    t_cfg, o_cfg, s_cfg = config['train'], config['optim'], config['sched']
    if t_cfg['threads']:
        torch.set_num_threads(t_cfg['threads'])
    rank, world_size, device = setup_distributed(t_cfg['device'])
    is_main = rank == 0
    seed = int(t_cfg['seed'])
    seed_all(derive_seed(seed, rank, 0xA11))
    out_dir = Path(t_cfg['output'])

    # Data first: the model's number of classes and input channels come from it.
    data = build_data(config, get_pretrained_cfg(config['model']['name']))
    model = _build_model(config, data.num_classes, data.in_chans)
    record = model_record(config['model']['name'], _model_args(config, data.num_classes, data.in_chans),
                          data.eval_config, data.classes if len(data.classes) == data.num_classes else None)
    model.pretrained_cfg = {**model.pretrained_cfg, **recorded_cfg(record)}  # what load_model will give it
    # Before the first step: the folder holds no other run, is writable, and has room for the checkpoints
    # (last, best and a temporary file, each the weights, the EMA copy and the optimizer's moments).
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    resume_from = checked_run_dir(out_dir, resume, overwrite, 12 * state_bytes, is_main)
    if t_cfg['grad_checkpointing']:
        model.set_grad_checkpointing(True)
    model.to(device)
    if t_cfg['channels_last']:
        model.to(memory_format=torch.channels_last)

    batch_size, accum = int(config['data']['batch_size']), int(o_cfg['accum_steps'])
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[t_cfg['amp_dtype']] if t_cfg['amp'] else None
    if t_cfg['oom_fallback'] and device.type == 'cuda':
        def probe(bs: int) -> None:
            x = torch.randn(bs, data.in_chans, config['data']['img_size'], config['data']['img_size'], device=device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(x).float().sum().backward()
            model.zero_grad(set_to_none=True)
        batch_size, accum = find_batch_size(probe, batch_size, accum)

    train_set = SeededDataset(data.train, seed)
    train_loader, train_sampler = build_loader(train_set, batch_size, True, seed, config['data']['workers'],
                                               rank, world_size, drop_last=True)
    eval_bs = config['data']['eval_batch_size'] or batch_size
    val_loader, _ = build_loader(data.val, eval_bs, False, seed, config['data']['workers'], rank, world_size,
                                 pad=False)

    steps_per_epoch = len(train_loader) // accum
    if t_cfg['max_steps_per_epoch']:
        steps_per_epoch = min(steps_per_epoch, int(t_cfg['max_steps_per_epoch']))
    if steps_per_epoch < 1:
        raise ValueError(f'the training set ({len(data.train)} images) is smaller than one step '
                         f'({batch_size} x {accum} x {world_size} processes)')

    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    optimizer = build_optimizer(model, o_cfg, layer_decay=o_cfg['layer_decay'])
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=s_cfg['sched'], num_epochs=s_cfg['epochs'], warmup_epochs=s_cfg['warmup_epochs'],
        warmup_lr=s_cfg['warmup_lr'], min_lr=s_cfg['min_lr'], cooldown_epochs=s_cfg['cooldown_epochs'],
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=config['ema']['decay'], use_warmup=config['ema']['warmup']) \
        if config['ema']['enabled'] else None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    mixup_fn = _mixup(config, data.num_classes)
    criterion = _criterion(config, mixup_fn is not None)
    train_model = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model

    # 'epoch_sums': the running training loss/accuracy of the current epoch, so a mid-epoch resume reports the
    # same epoch figures as an uninterrupted run.
    state = {'epoch': 0, 'step_in_epoch': 0, 'global_step': 0, 'best_top1': -1.0, 'best_epoch': -1, 'history': [],
             'epoch_sums': _fresh_sums(), 'best_weights': 'model'}
    if resume_from is not None:
        restore_training_state(resume_from, state, model, optimizer, scheduler, scaler,
                               ema.module if ema is not None else None)
        if is_main:
            print(f'resumed from {resume_from}: epoch {state["epoch"]}, step {state["step_in_epoch"]}, '
                  f'global step {state["global_step"]}')

    log = _RunLog(out_dir, config, enabled=is_main)
    log.history = list(state['history'])

    def checkpoint(path: Path, epoch: int, step_in_epoch: int, **extra: Any) -> None:
        if not is_main:
            return
        save_atomic({**extra,
            'model': model.state_dict(), 'ema': ema.module.state_dict() if ema is not None else None,
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'scaler': scaler.state_dict() if scaler is not None else None, 'rng': rng_state(),
            'epoch': epoch, 'step_in_epoch': step_in_epoch, 'global_step': state['global_step'],
            'best_top1': state['best_top1'], 'best_epoch': state['best_epoch'], 'history': log.history,
            'epoch_sums': dict(state['epoch_sums']), 'best_weights': state['best_weights'],
            RECORD_KEY: {**record, 'weights': state['best_weights'] if path.name == 'best.pth' else 'model'},
            'config': config,
        }, path)

    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f'training {config["model"]["name"]} ({n_params / 1e6:.2f}M params) on {config["data"]["name"]} '
              f'({len(data.train)} train / {len(data.val)} val: {data.val_source}'
              f'{f" / {len(data.test)} test" if data.test is not None else ""}, {data.num_classes} classes) for {num_epochs} epochs '
              f'x {steps_per_epoch} steps, batch {batch_size} x {accum} accum x {world_size} processes, '
              f'{device}, {torch.get_num_threads()} threads; output {out_dir}')

    interval = int(t_cfg['checkpoint_interval_steps'] or 0)
    t_start = time.perf_counter()
    final: Dict[str, float] = {}
    for epoch in range(state['epoch'], num_epochs):
        start_step = state['step_in_epoch'] if epoch == state['epoch'] else 0
        if start_step == 0:
            state['epoch_sums'] = _fresh_sums()
        train_set.set_epoch(epoch)
        train_sampler.set_epoch(epoch)
        train_sampler.set_start(start_step * batch_size * accum)
        train_model.train()
        stats = _train_epoch(train_model, model, train_loader, optimizer, scheduler, ema, scaler, criterion,
                             mixup_fn, config, device, amp_dtype, epoch, start_step, steps_per_epoch, accum,
                             seed, rank, state, log, is_main,
                             on_step=(lambda s: checkpoint(out_dir / 'last.pth', epoch, s))
                             if interval else None, interval=interval, augment=data.train_augment)
        metrics = evaluate(model, val_loader, device, amp_dtype, world_size)
        row = {'epoch': epoch + 1, 'train_loss': stats['loss'], 'train_top1': stats['top1'],
               'val_loss': metrics['loss'], 'val_top1': metrics['top1'], 'val_top5': metrics['top5'],
               'lr': optimizer.param_groups[0]['lr'], 'train_images_per_s': stats['images_per_s'],
               'elapsed_s': time.perf_counter() - t_start}
        score, weights = metrics['top1'], 'model'
        if ema is not None and config['ema']['eval']:
            ema_metrics = evaluate(ema.module, val_loader, device, amp_dtype, world_size)
            row.update(ema_top1=ema_metrics['top1'], ema_top5=ema_metrics['top5'])
            if ema_metrics['top1'] > score:
                score, weights = ema_metrics['top1'], 'ema'
        log.epoch(row, state['global_step'])
        if is_main:
            ema_note = f', EMA top-1 {row["ema_top1"]:.2f}%' if 'ema_top1' in row else ''
            print(f'epoch {epoch + 1}/{num_epochs}: train loss {stats["loss"]:.4f}, val loss {metrics["loss"]:.4f}, '
                  f'top-1 {metrics["top1"]:.2f}%, top-5 {metrics["top5"]:.2f}%{ema_note} '
                  f'({stats["images_per_s"]:.0f} img/s, {row["elapsed_s"]:.0f} s)')
        improved = score > state['best_top1']
        if improved:
            state.update(best_top1=score, best_epoch=epoch + 1, best_weights=weights)
        state.update(epoch=epoch + 1, step_in_epoch=0, epoch_sums=_fresh_sums())
        if improved:
            checkpoint(out_dir / 'best.pth', epoch + 1, 0, top1=score)  # the full state, like last.pth
        checkpoint(out_dir / 'last.pth', epoch + 1, 0)
        final = row
    png = log.close(t_cfg['plots'])
    if world_size > 1:
        dist.barrier()
    test = _test_best(model, out_dir / 'best.pth', data, config, device, amp_dtype, rank, world_size, is_main)
    result = {'final': final, 'best_top1': state['best_top1'], 'best_epoch': state['best_epoch'], 'rank': rank,
              'output': str(out_dir), 'plot': str(png) if png else None, 'test': test,
              'val_source': data.val_source, 'seconds': time.perf_counter() - t_start, 'model': model,
              'ema': ema.module if ema else None}
    if is_main:
        print(f'done: best val top-1 {state["best_top1"]:.2f}% (epoch {state["best_epoch"]}); checkpoints '
              f'{out_dir / "best.pth"}, {out_dir / "last.pth"}; metrics {out_dir / "metrics.csv"}'
              + (f'; curves {png}' if png else ''))
    return result


def _test_best(model: nn.Module, best: Path, data, config: Dict[str, Any], device: torch.device, amp_dtype,
               rank: int, world_size: int, is_main: bool) -> Optional[Dict[str, Any]]:
    """The test set's figures for best.pth's weights (the ones chosen on the validation set), evaluated once and
    written to test_metrics.json; None where the data has no test set apart from validation."""
    if data.test is None or not best.is_file():
        return None
    ckpt = load_training_state(best)
    weights = ckpt['ema'] if ckpt.get('best_weights') == 'ema' and ckpt.get('ema') is not None else ckpt['model']
    tested = copy.deepcopy(model)
    tested.load_state_dict(weights)
    eval_bs = config['data']['eval_batch_size'] or config['data']['batch_size']
    loader, _ = build_loader(data.test, eval_bs, False, 0, config['data']['workers'], rank, world_size, pad=False)
    metrics = evaluate(tested, loader, device, amp_dtype, world_size)
    result = {'top1': metrics['top1'], 'top5': metrics['top5'], 'loss': metrics['loss'], 'count': len(data.test),
              'checkpoint': str(best), 'epoch': ckpt.get('best_epoch'), 'weights': ckpt.get('best_weights', 'model')}
    if is_main:
        (best.parent / 'test_metrics.json').write_text(json.dumps(result, indent=2))
        print(f'test: top-1 {result["top1"]:.2f}%, top-5 {result["top5"]:.2f}% on {result["count"]} test images '
              f'(best.pth, epoch {result["epoch"]}, evaluated once)')
    return result


def _train_epoch(train_model, model, loader, optimizer, scheduler, ema, scaler, criterion, mixup_fn, config,
                 device, amp_dtype, epoch, start_step, steps_per_epoch, accum, seed, rank, state, log, is_main,
                 on_step=None, interval=0, augment=None) -> Dict[str, float]:
    o_cfg, t_cfg = config['optim'], config['train']
    progress = None
    if is_main and t_cfg['progress']:
        from tqdm import tqdm
        progress = tqdm(total=steps_per_epoch, initial=start_step, desc=f'epoch {epoch + 1}', leave=False,
                        dynamic_ncols=True)
    sums = state['epoch_sums']  # carried over a mid-epoch resume
    seen_before = sums['seen']
    t0 = time.perf_counter()
    batches = iter(loader)
    for step in range(start_step, steps_per_epoch):
        step_loss = 0.0
        for micro in range(accum):
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            if augment is not None:  # a batch of uint8 images: augmented here, by a generator fixed per step
                x = augment(x, torch.Generator().manual_seed(derive_seed(seed, epoch, step, micro, rank, 0xB47)))
            if t_cfg['channels_last']:
                x = x.contiguous(memory_format=torch.channels_last)
            seed_all(derive_seed(seed, epoch, step, micro, rank))  # dropout, drop path, mixup: fixed per step
            target = y
            if mixup_fn is not None:
                x, target = mixup_fn(x, y)
            sync = micro == accum - 1 or not isinstance(train_model, nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else train_model.no_sync()):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = train_model(x)
                    loss = criterion(out.float(), target) / accum
                if not torch.isfinite(loss):
                    raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch + 1}, step {step}: lower the '
                                             f'learning rate, or train in float32')
                (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.item()
            if mixup_fn is None:
                sums['correct'] += (out.argmax(-1) == y).sum().item()
            sums['seen'] += len(y)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if o_cfg['clip_grad']:
            from timm.utils import dispatch_clip_grad
            dispatch_clip_grad(model.parameters(), o_cfg['clip_grad'], mode=o_cfg['clip_mode'])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state['global_step'] += 1
        if ema is not None:
            ema.update(model, step=state['global_step'])
        scheduler.step_update(num_updates=state['global_step'])
        sums['loss'] += step_loss
        done = step + 1
        if progress is not None:
            progress.update(1)
        # Step logs (TensorBoard, W&B) do not depend on the progress bar being shown.
        if done % max(1, t_cfg['log_interval']) == 0 or step == steps_per_epoch - 1:
            ips = (sums['seen'] - seen_before) / (time.perf_counter() - t0)
            if progress is not None:
                postfix = {'loss': f'{sums["loss"] / done:.4f}', 'lr': f'{optimizer.param_groups[0]["lr"]:.2e}',
                           'img/s': f'{ips:.0f}'}
                if mixup_fn is None:
                    postfix['acc'] = f'{100 * sums["correct"] / max(sums["seen"], 1):.1f}'
                progress.set_postfix(postfix)
            log.step(state['global_step'], {'loss': step_loss, 'lr': optimizer.param_groups[0]['lr'],
                                            'images_per_s': ips})
        if on_step is not None and (step + 1) % interval == 0 and step + 1 < steps_per_epoch:
            on_step(step + 1)
    if progress is not None:
        progress.close()
    seconds = time.perf_counter() - t0
    images_per_s = (sums['seen'] - seen_before) / seconds if seconds > 0 else 0.0
    totals = torch.tensor([sums['loss'], sums['correct'], sums['seen']], dtype=torch.float64)
    if dist.is_initialized():  # average the figures over the ranks
        dist.all_reduce(totals)
        totals[0] /= dist.get_world_size()
        images_per_s *= dist.get_world_size()
    loss_sum, correct, seen = totals.tolist()
    return {'loss': loss_sum / steps_per_epoch,
            'top1': 100 * correct / seen if (mixup_fn is None and seen) else float('nan'),
            'images_per_s': images_per_s}
