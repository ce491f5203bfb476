"""Validation of a trained or official model on a dataset, with the model's own evaluation transform."""
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..data.datasets import SafeImageFolder, load_digits, load_fashion_mnist
from ..data.loader import build_loader, match_channels, with_mode
from ..models import create_model, read_checkpoint
from ..runtime import optimize_for_cpu
from .trainer import evaluate

__all__ = ['validate']


def _eval_transform(model, in_chans: int, img_size: Optional[int], crop_pct: Optional[float],
                    mean=None, std=None, interpolation: Optional[str] = None):
    """The model's evaluation transform (resize by crop_pct, center crop, its mean/std), resolved by timm."""
    from timm.data import create_transform, resolve_data_config
    args: Dict[str, Any] = {}
    if img_size:
        args['input_size'] = (in_chans, img_size, img_size)
    if crop_pct:
        args['crop_pct'] = crop_pct
    if mean is not None:
        args['mean'], args['std'] = tuple(mean), tuple(std)
    if interpolation:
        args['interpolation'] = interpolation
    cfg = resolve_data_config(args, model=model)
    cfg['input_size'] = (in_chans,) + tuple(cfg['input_size'][1:])
    cfg['mean'], cfg['std'] = match_channels(cfg['mean'], cfg['std'], in_chans)
    return create_transform(**cfg, is_training=False), cfg


def validate(
        model_name: Optional[str] = None,
        checkpoint: Optional[Union[str, Path]] = None,
        data: Union[str, Path] = 'fashion_mnist',
        batch_size: int = 128,
        workers: int = 0,
        img_size: Optional[int] = None,
        crop_pct: Optional[float] = None,
        device: str = 'cpu',
        use_ema: bool = False,
        split: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy, loss and images/s.

    Args:
        model_name: the architecture; taken from the checkpoint (``arch``) when it was written by our trainer.
        checkpoint: weights (any format ``load_checkpoint`` reads); our training checkpoints also carry the
            number of classes, input channels, image size and normalisation they were trained with.
        data: 'fashion_mnist', 'digits', or an ImageFolder root (uses its ``val/`` folder when there is one).
        use_ema: evaluate the EMA weights of the checkpoint.
    """
    raw = None
    if checkpoint is not None and Path(checkpoint).is_file() and not str(checkpoint).endswith('.safetensors'):
        try:
            raw = torch.load(checkpoint, map_location='cpu', weights_only=True)
        except Exception:  # read_checkpoint below reports what is wrong with the file
            raw = None
    meta: Dict[str, Any] = raw if isinstance(raw, dict) and 'config' in raw else {}  # written by our trainer
    model_name = model_name or meta.get('arch')
    if not model_name:
        raise ValueError('name the model (--model): the checkpoint does not record its architecture')
    train_cfg = (meta.get('config') or {})
    kwargs = dict((train_cfg.get('model') or {}).get('kwargs') or {}, **(model_kwargs or {}))
    in_chans = meta.get('in_chans') or (1 if str(data) in ('fashion_mnist', 'digits') else 3)
    data_cfg = train_cfg.get('data') or {}
    img_size = img_size or data_cfg.get('img_size')
    crop_pct = crop_pct or data_cfg.get('crop_pct')

    num_classes = meta.get('num_classes')
    if str(data) == 'fashion_mnist':
        dataset = load_fashion_mnist(data_cfg.get('path'), 'test')
    elif str(data) == 'digits':
        dataset = load_digits('val')
    else:
        root = Path(data)
        root = root / (split or 'val') if (root / (split or 'val')).is_dir() else root
        dataset = SafeImageFolder(root, substitute=False)
    num_classes = num_classes or len(dataset.classes)
    model = create_model(model_name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if checkpoint is not None:
        from ..models import load_checkpoint
        load_checkpoint(model, read_checkpoint(meta or checkpoint, use_ema=use_ema))
    mean, std = data_cfg.get('mean'), data_cfg.get('std')
    if mean is None and str(data) in ('fashion_mnist', 'digits'):
        from ..data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    # A checkpoint of our trainer is evaluated exactly as the trainer did; otherwise the family's own transform.
    transform, cfg = _eval_transform(model, in_chans, img_size, crop_pct, mean, std, data_cfg.get('interpolation'))
    dataset.transform = with_mode(transform, in_chans)
    loader, _ = build_loader(dataset, batch_size, False, 0, workers, pad=False)
    dev = torch.device(device)
    if dev.type == 'cpu':
        optimize_for_cpu(model)  # the machine's faster GEMM for the linear layers (same results)
    metrics = evaluate(model.to(dev), loader, dev)
    metrics.update(model=model_name, checkpoint=str(checkpoint) if checkpoint else None, data=str(data),
                   transform={k: cfg[k] for k in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std')})
    bad = sorted(getattr(dataset, 'bad_files', []))
    if bad:
        metrics['skipped_files'] = bad
    return metrics
