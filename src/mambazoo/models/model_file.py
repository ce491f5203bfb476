"""A self-describing model file: what a trained checkpoint records about its model, and ``load_model``.

Every checkpoint ``mambazoo train`` writes (last.pth, best.pth) holds, beside the weights, a record under
``RECORD_KEY``, plain data that torch's safe loader reads:

    name            the registered model name (``create_model``'s first argument)
    args            the other arguments it was built with (num_classes, in_chans, a small config's depths, ...)
    pretrained_cfg  what describes this model rather than its family's release: input_size (its channels and the
                    size it was trained at), mean, std, interpolation, crop_pct, crop_mode (its evaluation
                    transform), num_classes and label_names (its class names)
    mambazoo_version

``load_model(path)`` builds the model from that alone and loads its weights. The ``pretrained_cfg`` entries are
laid over the family's cfg on ``model.pretrained_cfg`` (with no hub id, url or tag: the weights are the file's), where
timm's ``resolve_data_config``, so ``data.images.build_eval_transform``, and ``predict.class_names`` find them; every
command then preprocesses and labels as the training run did. ``create_model(name, checkpoint_path=path)`` takes
the recorded arguments as its defaults too.

Also read: folders written by ``export --format folder`` (timm's hub layout: config.json with 'architecture',
'model_args', 'pretrained_cfg', 'label_names'), checkpoints of earlier trainer versions ('arch', 'config',
'classes' beside the weights), and official release files that name their model (VMamba's yacs config, timm's
'arch'), which then build with their family's published cfg.
"""
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from ._builder import CheckpointError, _load_file, read_checkpoint, resolve_name

__all__ = ['RECORD_KEY', 'model_record', 'read_model_record', 'open_model_file', 'load_model', 'model_from_file',
           'recorded_cfg']

RECORD_KEY = 'mambazoo_model'
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
# How a model was loaded or wrapped, not what it is: never recorded.
_NOT_RECORDED = ('pretrained', 'checkpoint_path', 'features_only', 'out_indices', 'feature_cls', 'feature_cfg',
                 'pretrained_cfg', 'pretrained_cfg_overlay', 'trusted')

PathLike = Union[str, Path]


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what JSON and torch's safe loader both keep."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_record(name: str, model_args: Mapping[str, Any], data_config: Mapping[str, Any],
                 class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The record of a model built by ``create_model(name, **model_args)`` and evaluated with ``data_config`` (timm's
    keys: input_size, interpolation, mean, std, crop_pct, crop_mode); ``class_names`` in class-index order."""
    from .. import __version__
    args = {k: v for k, v in model_args.items() if k not in _NOT_RECORDED}
    cfg = {k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None}
    if args.get('num_classes') is not None:
        cfg['num_classes'] = args['num_classes']
    if class_names is not None:
        cfg['label_names'] = [str(c) for c in class_names]
    return _plain({'name': resolve_name(name), 'args': args, 'pretrained_cfg': cfg, 'mambazoo_version': __version__})


def recorded_cfg(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The pretrained_cfg entries a record lays over its family's cfg (tuples where timm keeps tuples); none for
    an official release file, whose family cfg is its own."""
    if record.get('release'):
        return {}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in (record.get('pretrained_cfg') or {}).items()}
    return {**cfg, 'hf_hub_id': None, 'url': None, 'tag': None}  # these weights are the file's, not a release's


def _legacy_record(ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """The record of a checkpoint written before records: the trainer's 'arch', 'config', 'in_chans', 'classes'."""
    from ..data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from ..data.images import match_channels
    config = ckpt.get('config') or {}
    data = config.get('data') or {}
    model_cfg = config.get('model') or {}
    in_chans = int(ckpt.get('in_chans') or 3)
    args = dict(model_cfg.get('kwargs') or {}, num_classes=ckpt.get('num_classes'), in_chans=in_chans)
    if data.get('mean') is not None:
        mean, std = data['mean'], data['std']
    elif data.get('name', 'fashion_mnist') in ('fashion_mnist', 'digits'):
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    else:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    mean, std = match_channels(mean, std, in_chans)
    size = data.get('img_size') or 224
    data_config = {'input_size': (in_chans, size, size), 'mean': mean, 'std': std, 'crop_mode': 'center',
                   'crop_pct': data.get('crop_pct') or 0.875, 'interpolation': data.get('interpolation') or 'bicubic'}
    classes = ckpt.get('classes')
    return model_record(ckpt['arch'], {k: v for k, v in args.items() if v is not None}, data_config,
                        classes if classes and len(classes) == ckpt.get('num_classes') else None)


def _release_record(ckpt: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The model of an official release file, where it names one we register: VMamba's pickle their yacs config
    (MODEL.NAME, e.g. 'vssm1_tiny_0230s', an alias of ours; MODEL.NUM_CLASSES), timm's train.py saves 'arch'."""
    from ._builder import is_model
    config, classes = ckpt.get('config'), None
    if isinstance(config, Mapping) and isinstance(config.get('MODEL'), Mapping):
        name, classes = config['MODEL'].get('NAME'), config['MODEL'].get('NUM_CLASSES')
    else:
        name = ckpt.get('arch')
    if not (isinstance(name, str) and is_model(name)):
        return None
    args = {'num_classes': classes} if isinstance(classes, int) and not isinstance(classes, bool) else {}
    return {'name': resolve_name(name), 'args': args, 'pretrained_cfg': {}, 'release': True}


def _record_in(ckpt: Any, where: str) -> Optional[Dict[str, Any]]:
    """The record held by a loaded checkpoint, or made from what an earlier trainer or an official release saved
    beside the weights (None if there is nothing to go by)."""
    if not isinstance(ckpt, Mapping):
        return None
    record = ckpt.get(RECORD_KEY)
    if record is None and isinstance(ckpt.get('arch'), str) and isinstance(ckpt.get('config'), Mapping) \
            and 'model' in ckpt.get('config', {}):
        record = _legacy_record(ckpt)
    if record is None:
        record = _release_record(ckpt)
    if record is None:
        return None
    if not (isinstance(record, Mapping) and isinstance(record.get('name'), str)
            and isinstance(record.get('args', {}), Mapping)):
        raise CheckpointError(f'{where}: its model record is malformed (expected a name and arguments)')
    return dict(record)


def _folder_record(folder: Path) -> Optional[Dict[str, Any]]:
    """The record of an exported folder's config.json (None without one)."""
    import json
    path = folder / 'config.json'
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f'unreadable config.json in {folder}: {e}') from e
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        return None
    args = config.get('model_args') or {}
    if not isinstance(args, dict):
        raise CheckpointError(f"config.json in {folder}: 'model_args' must be a mapping, got {type(args).__name__}")
    saved = config.get('pretrained_cfg') or {}
    cfg = {k: v for k, v in saved.items() if k in DATA_CONFIG_KEYS}
    if config.get('num_classes') is not None:
        cfg['num_classes'] = config['num_classes']
    labels = config.get('label_names') or saved.get('label_names')  # timm keeps them in either place
    if labels:
        cfg['label_names'] = list(labels.values()) if isinstance(labels, dict) else list(labels)
    return {'name': config['architecture'], 'args': args, 'pretrained_cfg': cfg}


def open_model_file(path: PathLike, trusted: bool = False) -> Tuple[Optional[Dict[str, Any]], Union[Path, Mapping]]:
    """Read a checkpoint file or folder once: its record (None if it has none) and what to load the weights from
    (the loaded contents of a file, or the folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _folder_record(path), path
    if not path.is_file():
        raise CheckpointError(f'checkpoint file not found: {path}')
    ckpt = _load_file(path, trusted=trusted)
    return _record_in(ckpt, str(path)), _Contents(ckpt, path) if isinstance(ckpt, Mapping) else ckpt


class _Contents(dict):
    """A loaded checkpoint that remembers its file, for error messages."""

    def __init__(self, ckpt: Mapping, path: Path):
        super().__init__(ckpt)
        self.path = path

    def __str__(self) -> str:
        return str(self.path)


def read_model_record(path: PathLike, trusted: bool = False) -> Optional[Dict[str, Any]]:
    """The record of a checkpoint file or exported folder, or None when it does not describe its model."""
    return open_model_file(path, trusted)[0]


def load_model(path: PathLike, use_ema: Optional[bool] = None, trusted: bool = False, **overrides: Any) -> nn.Module:
    """The model saved at ``path`` (a checkpoint written by ``mambazoo train``, or a folder written by ``export
    --format folder``), built from its record and loaded with its weights, in eval mode.

    ``use_ema``: the EMA weights (True) or the trained ones (False) of a training checkpoint; None: the ones its
    record names (best.pth: those that won on the validation set). ``trusted``: allow a pickled file to hold any Python
    object (it could run code while loading). ``overrides``: model arguments that replace the recorded ones (e.g.
    ``drop_path_rate`` for fine-tuning).
    """
    record, source = open_model_file(path, trusted)
    if record is None:
        raise CheckpointError(
            f'{path} does not record which model it holds (only checkpoints written by `mambazoo train` and folders '
            f'written by `mambazoo export --format folder` do): name the architecture, e.g. '
            f'create_model(NAME, checkpoint_path={str(path)!r}) or --model NAME')
    return model_from_file(record, source, path, use_ema, overrides)


def model_from_file(record: Mapping[str, Any], source: Union[Path, Mapping], path: PathLike,
                    use_ema: Optional[bool] = None, overrides: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """``load_model`` of a file already opened (``open_model_file``'s record and weights source): nothing is read
    again."""
    if use_ema is None:
        use_ema = record.get('weights') == 'ema'
    state: Union[Path, Mapping[str, Tensor]] = source
    if use_ema or isinstance(source, Mapping):
        state = _Contents(read_checkpoint(source, use_ema=use_ema), Path(path))
    return build_recorded(record, state, overrides or {}).eval()


def build_recorded(record: Mapping[str, Any], weights: Union[Path, Mapping[str, Tensor], None],
                   overrides: Mapping[str, Any]) -> nn.Module:
    """``create_model`` of a record: its name and arguments (``overrides`` winning), its cfg entries, ``weights``."""
    from ._builder import create_model_unrecorded
    kwargs = {**record.get('args', {}), **overrides}
    overlay = {**recorded_cfg(record), **(kwargs.pop('pretrained_cfg_overlay', None) or {})}
    return create_model_unrecorded(record['name'], checkpoint_path=weights, pretrained_cfg_overlay=overlay, **kwargs)
