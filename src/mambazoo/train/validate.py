"""Validation of a trained or official model on a dataset, with the model's own evaluation transform."""
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..data.datasets import SafeImageFolder, load_digits, load_fashion_mnist
from ..data.images import build_eval_transform, eval_data_config
from ..data.loader import build_loader
from ..models import create_model, load_checkpoint
from ..models.model_file import model_from_file, open_model_file
from ..runtime import optimize_for_cpu
from .trainer import evaluate

__all__ = ['validate', 'evaluation_dataset']


def evaluation_dataset(data: Union[str, Path], split: Optional[str] = None):
    """The images ``validate`` evaluates on: Fashion-MNIST's or digits' test split, or an ImageFolder (its
    ``split`` folder, default ``val/``, where there is one; else the root's class folders)."""
    if str(data) == 'fashion_mnist':
        return load_fashion_mnist(None, 'test')
    if str(data) == 'digits':
        return load_digits('val')
    root = Path(data)
    root = root / (split or 'val') if (root / (split or 'val')).is_dir() else root
    return SafeImageFolder(root, substitute=False)


def validate(
        model_name: Optional[str] = None,
        checkpoint: Optional[Union[str, Path]] = None,
        data: Union[str, Path] = 'fashion_mnist',
        batch_size: int = 128,
        workers: int = 0,
        img_size: Optional[int] = None,
        crop_pct: Optional[float] = None,
        device: str = 'cpu',
        use_ema: Optional[bool] = None,
        split: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        trusted: bool = False,
) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy, loss and images/s.

    Args:
        model_name: the architecture; not needed for a checkpoint that records its model (``mambazoo train``'s,
            an exported folder), which is then rebuilt with its arguments, class names and evaluation transform.
        checkpoint: weights (any format ``load_checkpoint`` reads).
        data: 'fashion_mnist', 'digits', or an ImageFolder root (uses its ``val/`` folder when there is one).
        use_ema: the EMA weights of a training checkpoint (None: the ones its record names).
        img_size, crop_pct: replace the model's evaluation size and crop.
        trusted: allow a pickled checkpoint to hold any Python object.
    """
    if batch_size < 1:
        raise ValueError(f'batch size must be at least 1, got {batch_size}')
    if model_name is None and checkpoint is None:
        raise ValueError('name the model (--model NAME) or a trained model file (--checkpoint PATH)')
    record, source = open_model_file(checkpoint, trusted=trusted) if checkpoint is not None else (None, None)
    dataset = evaluation_dataset(data, split)
    if record is not None and (model_name is None or _same_name(model_name, record)):
        model = model_from_file(record, source, checkpoint, use_ema, model_kwargs)
        model_name = record['name']
    elif model_name is None:
        raise ValueError(f'name the model (--model NAME): {checkpoint} does not record which model it holds')
    else:
        grayscale = str(data) in ('fashion_mnist', 'digits')
        kwargs = {'num_classes': len(dataset.classes), 'in_chans': 1 if grayscale else 3, **(model_kwargs or {})}
        model = create_model(model_name, **kwargs)
        if checkpoint is not None:
            load_checkpoint(model, source, use_ema=bool(use_ema))  # the file's contents, read once above
    cfg = eval_data_config(model, img_size, crop_pct)
    dataset.transform = build_eval_transform(model, img_size, crop_pct)
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


def _same_name(name: str, record: Dict[str, Any]) -> bool:
    from ..models import resolve_name
    return resolve_name(name) == resolve_name(record['name'])
