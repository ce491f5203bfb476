"""Training and validation: one loop for every family (timm's optimizers, schedulers, mixup, EMA)."""
from .config import DEFAULTS, apply_overrides, load_config
from .trainer import evaluate, train

__all__ = ['train', 'evaluate', 'load_config', 'apply_overrides', 'DEFAULTS']
