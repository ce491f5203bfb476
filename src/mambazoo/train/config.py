"""Training configuration: YAML files over built-in defaults, with ``--set key.sub=value`` overrides.

A config is a nested dict; ``DEFAULTS`` lists every key the trainer reads (a YAML file or an override that
names an unknown key is an error, so a typo never silently trains with a default).
"""
import ast
import copy
import difflib
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import yaml

__all__ = ['DEFAULTS', 'load_config', 'apply_overrides', 'merge', 'ConfigError', 'check_config']


class ConfigError(ValueError):
    """A config that cannot train: an unknown key, a value of the wrong type or out of range, unreadable YAML."""

DEFAULTS: Dict[str, Any] = {
    'task': 'classification',      # classification | detection | segmentation (the last two: downstream.*)
    'model': {
        'name': 'mambavision_tiny',
        'kwargs': {},              # extra constructor arguments (e.g. dims, depths for a small config)
        'drop_path_rate': None,    # None: the model's default
        'pretrained': False,
        'checkpoint': None,        # initial weights (fine-tuning)
    },
    'data': {
        'name': 'fashion_mnist',   # fashion_mnist | digits | imagefolder | fake
        'path': None,              # dataset root (imagefolder: holds train/ and val/; fashion_mnist: IDX files)
        'train_split': 'train',
        'val_split': 'val',        # imagefolder: picks the best checkpoint (absent: images held out of train/)
        'test_split': 'test',      # imagefolder: evaluated once at the end, where the folder exists
        'holdout': 'auto',         # training images held out for validation where a set has no validation split
                                   # (Fashion-MNIST, digits): 'auto' = min(5000, a tenth); 0 = validate on test
        'img_size': 224,
        'in_chans': None,          # None: 1 for the grayscale sets, 3 otherwise
        'num_classes': None,       # None: from the dataset
        'fake_size': [512, 128],   # fake: train and val sizes
        'fake_classes': 10,
        'batch_size': 128,         # per process
        'eval_batch_size': None,
        'workers': 0,
        'mean': None,              # None: the model's config (grayscale sets: their own statistics)
        'std': None,
        'interpolation': 'bicubic',
        'crop_pct': None,
        'aug': {
            'scale': [0.08, 1.0],
            'ratio': [0.75, 1.3333333333333333],
            'hflip': 0.5,
            'vflip': 0.0,
            'color_jitter': 0.4,
            'auto_augment': None,  # e.g. rand-m9-mstd0.5-inc1
            're_prob': 0.0,
            're_mode': 'pixel',
            'train_interpolation': 'random',
            'batched': True,       # in-memory images (Fashion-MNIST, digits) with crop and flips only: augment
                                   # each batch at once (data.loader.BatchAugment); false: timm's per-image pipeline
        },
        'mixup': {
            'mixup_alpha': 0.0,
            'cutmix_alpha': 0.0,
            'prob': 1.0,
            'switch_prob': 0.5,
            'mode': 'batch',
        },
    },
    'optim': {
        'opt': 'adamw',
        'lr': 1e-3,
        'weight_decay': 0.05,
        'momentum': 0.9,
        'betas': None,
        'eps': None,
        'layer_decay': None,
        'clip_grad': None,
        'clip_mode': 'norm',
        'accum_steps': 1,
        'fused': None,             # None: torch's fused Adam/AdamW where opt is adam or adamw (one kernel for every
                                   # tensor; the main job's step 11 -> 4 ms on 2 cores); false: torch's default
    },
    'sched': {
        'sched': 'cosine',
        'epochs': 10,
        'warmup_epochs': 0.0,      # a number: 0.5 warms up over half an epoch
        'warmup_lr': 1e-6,
        'min_lr': 1e-5,
        'cooldown_epochs': 0,
    },
    'loss': {
        'label_smoothing': 0.0,
    },
    'ema': {
        'enabled': False,
        'decay': 0.9998,
        'warmup': False,
        'eval': True,              # also validate the EMA weights and pick 'best' from the better of the two
    },
    'train': {
        'seed': 0,
        'output': 'runs/default',
        'amp': False,
        'amp_dtype': 'bfloat16',   # bfloat16 | float16 (float16 uses a GradScaler)
        'channels_last': False,
        'grad_checkpointing': False,
        'checkpoint_interval_steps': 0,   # also save 'last' every N optimizer steps (0: at epoch ends only)
        'max_steps_per_epoch': None,      # cap an epoch (smoke tests)
        'log_interval': 20,
        'progress': True,
        'tensorboard': True,
        'wandb': False,
        'wandb_project': 'mambazoo',
        'plots': True,
        'threads': 0,              # torch CPU threads (0: torch's default)
        'device': 'auto',          # auto | cpu | cuda
        'oom_fallback': True,      # halve the per-step batch (and double accumulation) on out-of-memory
    },
    # task detection / segmentation (mambazoo.downstream; see docs/downstream.md)
    'downstream': {
        'detector': 'faster_rcnn',        # faster_rcnn | mask_rcnn
        'source': 'fashion_mnist',        # photos pasted on the canvases: fashion_mnist | digits
        'canvas_size': 128,
        'items': [1, 4],                  # objects per canvas (min, max)
        'item_size': [24, 64],            # object side in pixels (min, max)
        'train_size': 20000,              # canvases (each one composed on the fly from (seed, index))
        'val_size': 200,
        'channels': 3,                    # grey photos repeated to RGB for RGB backbones (1: grey)
        'fpn_channels': 64,
        'anchor_sizes': [16, 32, 64, 128, 256],   # one per FPN level (strides 4-64)
        'aspect_ratios': [0.5, 1.0, 2.0],
        'box_head_dim': 256,
        'mask_head_dim': 64,
        'seg_head_channels': 64,
        'detector_kwargs': {              # more torchvision FasterRCNN / MaskRCNN arguments; these suit a few
            'rpn_pre_nms_top_n_train': 600,   # objects per small image (torchvision's: 2000 / 2000 / 1000 /
            'rpn_post_nms_top_n_train': 300,  # 1000 / 512 / 100, for ~800 px COCO images)
            'rpn_pre_nms_top_n_test': 300,
            'rpn_post_nms_top_n_test': 100,
            'box_batch_size_per_image': 128,
            'box_detections_per_img': 50,
        },
        'steps': 300,                     # optimizer steps (the schedule counts steps, not epochs)
        'warmup_steps': 30,
        'eval_interval': 100,             # evaluate (and save last.pth) every N steps and at the end
    },
}


FREE_FORM = ('model.kwargs', 'downstream.detector_kwargs')


def merge(base: Dict[str, Any], update: Dict[str, Any], where: str = '') -> Dict[str, Any]:
    """Recursively update a copy of ``base``; unknown keys are errors (except inside free-form dicts)."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = f'{where}.{key}' if where else key
        if where in FREE_FORM:  # constructor arguments: any key
            out[key] = value
        elif key not in out:
            close = difflib.get_close_matches(str(key), list(out), n=3, cutoff=0.6)
            hint = f'did you mean {" or ".join(repr(f"{where}.{c}" if where else c) for c in close)}? ' if close else ''
            raise ConfigError(f'unknown config key {path!r}; {hint}known keys here: {", ".join(sorted(out))}')
        elif isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f'config key {path!r} must be a mapping (its keys: {", ".join(sorted(out[key]))}), '
                                  f'got {value!r}')
            out[key] = merge(out[key], value, path)
        else:
            out[key] = value
    return out


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 (no dot) as a string; accept it as a float, as YAML 1.2 and Python do."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$''', re.X),
    list('-+0123456789.'))


def _yaml_load(text_or_stream: Any) -> Any:
    return yaml.load(text_or_stream, Loader=_Loader)


def _parse_value(text: str) -> Any:
    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def apply_overrides(config: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML: 0.1, true, [1, 2], null)."""
    config = copy.deepcopy(config)
    for item in overrides or []:
        key, sep, text = item.partition('=')
        if not sep or not key.strip():
            raise ConfigError(f'--set expects key=value (e.g. sched.epochs=5), got {item!r}')
        parts = key.strip().split('.')
        update: Dict[str, Any] = {}
        node = update
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(text)
        config = merge(config, update)
    return config


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """DEFAULTS, then the YAML file (if any), then the overrides; checked (``check_config``)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f'config file not found: {path}' + (' (a folder)' if path.is_dir() else ''))
        try:
            with open(path) as f:
                loaded = _yaml_load(f) or {}
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
            raise ConfigError(f'{path}: invalid YAML{where}: {e.problem or e.context}') from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f'{path}: not a readable YAML file ({e})') from None
        if not isinstance(loaded, dict):
            raise ConfigError(f'{path}: a config file must hold a mapping at the top level')
        config = merge(config, loaded)
    return check_config(apply_overrides(config, overrides))


# Value ranges the trainer needs: (key, test, what the value must be).
_RANGES = (
    ('optim.lr', lambda v: v > 0, 'a positive number'),
    ('optim.weight_decay', lambda v: v >= 0, 'a number >= 0'),
    ('optim.accum_steps', lambda v: v >= 1, 'an integer >= 1'),
    ('sched.epochs', lambda v: v >= 1, 'an integer >= 1'),
    ('sched.warmup_epochs', lambda v: v >= 0, 'a number >= 0'),
    ('data.batch_size', lambda v: v >= 1, 'an integer >= 1'),
    ('data.img_size', lambda v: v >= 1, 'an integer >= 1'),
    ('data.workers', lambda v: v >= 0, 'an integer >= 0'),
    ('train.threads', lambda v: v >= 0, 'an integer >= 0 (0: torch\'s default)'),
    ('train.checkpoint_interval_steps', lambda v: v >= 0, 'an integer >= 0'),
)


_CHECKED_APART = ('data.holdout',)  # 'auto' or a count: check_config tests it


def _type_name(value: Any) -> str:
    return {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string', list: 'a list'}.get(
        type(value), type(value).__name__)


def _check_types(config: Dict[str, Any], defaults: Dict[str, Any], where: str = '') -> None:
    for key, default in defaults.items():
        path = f'{where}.{key}' if where else key
        value = config.get(key)
        if path in FREE_FORM or path in _CHECKED_APART or default is None or value is None:
            continue  # free-form, or optional (None: the model's or the data's default)
        if isinstance(default, dict):
            _check_types(value, default, path)
            continue
        ok = (isinstance(value, bool) if isinstance(default, bool)
              else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
              else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
              else isinstance(value, (list, tuple)) if isinstance(default, list)
              else isinstance(value, type(default)))
        if not ok:
            raise ConfigError(f'config key {path!r} must be {_type_name(default)}, got {value!r}')


def check_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Raise ConfigError naming the first key whose value has the wrong type or is out of range; returns config."""
    _check_types(config, DEFAULTS)
    for path, test, expected in _RANGES:
        node: Any = config
        for part in path.split('.'):
            node = node[part]
        if node is not None and not test(node):
            raise ConfigError(f'config key {path!r} must be {expected}, got {node!r}')
    holdout = config['data']['holdout']
    if not (holdout == 'auto' or (isinstance(holdout, int) and not isinstance(holdout, bool) and holdout >= 0)):
        raise ConfigError(f"config key 'data.holdout' must be 'auto' or an integer >= 0, got {holdout!r}")
    return config
