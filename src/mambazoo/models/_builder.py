"""What every family shares: the name registry, model building, and loading checkpoints from local files.

Names are registered twice: in our own registry (``create_model`` / ``list_models``, which also knows the
official names as aliases) and in timm's, so that ``timm.create_model(name)`` works after ``import mambazoo``.
timm's registry only gets names it does not already have (timm owns ``mambaout_*``).

Checkpoints are read from local files only, except ``pretrained=True``, which looks for the official file in
the local Hugging Face cache and downloads it only when a network is allowed (never with HF_HUB_OFFLINE=1).
"""
import argparse
import fnmatch
import json
import logging
import os
import pickle
import sys
import zipfile
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

_logger = logging.getLogger(__name__)

__all__ = [
    'register_model', 'register_alias', 'create_model', 'get_pretrained_cfg', 'list_models', 'is_model', 'resolve_name',
    'build_model', 'load_checkpoint', 'read_checkpoint', 'resolve_pretrained_file',
    'CheckpointError', 'CheckpointMismatchError',
]

_entrypoints: Dict[str, Callable[..., nn.Module]] = {}
_aliases: Dict[str, str] = {}
_family_of: Dict[str, str] = {}


# ---------------------------------------------------------------------------------------------------------
# Registry

def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entrypoint under its function name, here and (if timm lacks the name) in timm."""
    import timm.models
    name = fn.__name__
    _entrypoints[name] = fn
    _family_of[name] = fn.__module__.rsplit('.', 1)[-1]
    if not timm.models.is_model(name):
        timm.models.register_model(fn)
    return fn


def register_alias(alias: str, name: str) -> None:
    """Let ``create_model(alias)`` build ``name`` (used for the official repositories' names)."""
    _aliases[alias] = name


def resolve_name(name: str) -> str:
    """Our canonical name for ``name`` (an alias or a canonical name); raises with suggestions if unknown."""
    base = name.split('.', 1)[0]
    base = _aliases.get(base, base)
    if base not in _entrypoints:
        close = [n for n in list(_entrypoints) + list(_aliases) if base.lower()[:8] in n.lower()][:8]
        hint = f' Did you mean one of: {", ".join(close)}?' if close else ' See mambazoo.list_models().'
        raise ValueError(f'Unknown model {name!r}.{hint}')
    return base


def is_model(name: str) -> bool:
    try:
        resolve_name(name)
        return True
    except ValueError:
        return False


def list_models(pattern: str = '*', include_aliases: bool = False) -> List[str]:
    """Sorted model names matching a shell-style ``pattern`` (e.g. 'mambavision_*')."""
    names = list(_entrypoints) + (list(_aliases) if include_aliases else [])
    return sorted(n for n in names if fnmatch.fnmatchcase(n.lower(), pattern.lower()))


def get_pretrained_cfg(name: str) -> Dict[str, Any]:
    """The pretrained config (input size, crop, mean/std, ...) of a model name, without building the model."""
    canonical = resolve_name(name)
    module = sys.modules[_entrypoints[canonical].__module__]
    return dict(getattr(module, 'default_cfgs', {}).get(canonical, {}))


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint_path: Optional[Union[str, Path]] = None,
        **kwargs: Any,
) -> nn.Module:
    """Build a model by name (ours or an official alias).

    Args:
        name: a name from ``list_models()`` or an official alias such as 'mamba_vision_T'.
        pretrained: load the official weights from the local Hugging Face cache (downloads only when allowed).
        checkpoint_path: a local checkpoint (.pth/.pth.tar/.bin/.safetensors or a Hugging Face style folder).
        **kwargs: model arguments (num_classes, in_chans, drop_path_rate, features_only, out_indices, ...).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if checkpoint_path is not None:
        # A folder written by `mambazoo export --format folder` records the model's arguments in config.json
        # (the Hugging Face hub layout): they are the defaults here, explicit arguments still win.
        kwargs = {**_folder_model_args(Path(checkpoint_path)), **kwargs}
    return _entrypoints[resolve_name(name)](pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)


def _folder_model_args(path: Path) -> Dict[str, Any]:
    config = path / 'config.json'
    if not (path.is_dir() and config.is_file()):
        return {}
    try:
        model_args = json.loads(config.read_text()).get('model_args') or {}
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f'unreadable config.json in {path}: {e}') from e
    if not isinstance(model_args, dict):
        raise CheckpointError(f"config.json in {path}: 'model_args' must be a mapping, got {type(model_args).__name__}")
    return model_args


# ---------------------------------------------------------------------------------------------------------
# Building

def build_model(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        default_cfgs: Mapping[str, Any],
        checkpoint_path: Optional[Union[str, Path]] = None,
        features_only: bool = False,
        out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
        feature_norm: bool = False,
        output_fmt: str = 'NCHW',
        checkpoint_filter_fn: Optional[Callable[[Dict[str, Tensor], nn.Module], Dict[str, Tensor]]] = None,
        **kwargs: Any,
) -> nn.Module:
    """One builder for all families: timm's ``build_model_with_cfg`` (config, defaults), then our loader.

    Weights are loaded before any feature wrapper is put around the model, so checkpoints keep their keys.
    """
    from timm.models import build_model_with_cfg
    from timm.models._features import FeatureGetterNet

    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)  # timm.create_model passes these; our cfg comes from the family module
    pretrained_cfg = default_cfgs[variant]
    model = build_model_with_cfg(model_cls, variant, pretrained=False, pretrained_cfg=pretrained_cfg, **kwargs)
    if pretrained and checkpoint_path is None:
        checkpoint_path = resolve_pretrained_file(model.pretrained_cfg)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, filter_fn=checkpoint_filter_fn)
    if features_only:
        model = FeatureGetterNet(model, out_indices=out_indices, norm=feature_norm, output_fmt=output_fmt)
    return model


# ---------------------------------------------------------------------------------------------------------
# Checkpoints

class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or that does not hold a state dict."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose keys or shapes do not fit the model (e.g. another variant)."""

    def __init__(self, source: str, missing: List[str], unexpected: List[str],
                 mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def show(items: List[str]) -> str:
            return ', '.join(items[:12]) + (f', ... ({len(items)} in all)' if len(items) > 12 else '')
        parts = [f'checkpoint {source} does not fit the model:']
        if missing:
            parts.append(f'  missing keys ({len(missing)}): {show(missing)}')
        if unexpected:
            parts.append(f'  unexpected keys ({len(unexpected)}): {show(unexpected)}')
        if mismatched:
            parts.append(f'  shape mismatches ({len(mismatched)}): ' + show(
                [f'{k} checkpoint {list(a)} vs model {list(b)}' for k, a, b in mismatched]))
        parts.append('  Is it a checkpoint for another variant? Compare its keys with model.state_dict().')
        super().__init__('\n'.join(parts))


_WRAPPER_KEYS = ('state_dict', 'model', 'module')
_EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema')
_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin')


def _weights_file_in_folder(folder: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(list(folder.glob('*.safetensors')) + list(folder.glob('*.pth.tar')) + list(folder.glob('*.pth'))
                   + list(folder.glob('*.bin')))
    if not found:
        raise CheckpointError(f'no weights file in folder {folder} (looked for {", ".join(_WEIGHT_FILES)}, '
                              f'*.safetensors, *.pth.tar, *.pth, *.bin)')
    return found[0]


# Harmless types that training scripts pickle beside the weights (timm's train.py saves its argparse config).
_SAFE_CONFIG_GLOBALS = (argparse.Namespace, PosixPath, PurePosixPath)


def _load_file(path: Path, trusted: bool = False) -> Any:
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated / malformed headers
            raise CheckpointError(f'cannot read safetensors file {path}: {e}') from e
    try:
        if trusted:
            return torch.load(path, map_location='cpu', weights_only=False)
        with torch.serialization.safe_globals(list(_SAFE_CONFIG_GLOBALS)):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Unsupported global' in str(e):
            raise CheckpointError(
                f'{path} holds Python objects besides tensors and a training config, which could run code when '
                f'loaded ({str(e).splitlines()[-1] if str(e) else e}). If you trust the file, load it with '
                f'trusted=True.') from e
        raise CheckpointError(f'cannot read checkpoint {path} (corrupt, or not a PyTorch file): {e}') from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f'cannot read checkpoint {path} (truncated or not a PyTorch file?): {e}') from e


def read_checkpoint(
        source: Union[str, Path, Mapping[str, Tensor]],
        use_ema: bool = False,
        trusted: bool = False,
) -> Dict[str, Tensor]:
    """A plain ``{key: tensor}`` state dict from a file, a folder or a (possibly wrapped) dict.

    Understands the release formats: weights at the top level or under 'state_dict' / 'model'
    (EMA weights under 'state_dict_ema' / 'model_ema' when ``use_ema``), 'module.' prefixes from DDP,
    safetensors files and Hugging Face style folders. Pickled files are read with torch's safe unpickler
    (tensors, containers and an argparse training config); ``trusted=True`` allows any Python object.
    """
    if isinstance(source, Mapping):
        ckpt: Any = source
        where = 'state dict'
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            path = _weights_file_in_folder(path)
        if not path.is_file():
            raise CheckpointError(f'checkpoint file not found: {path}')
        ckpt = _load_file(path, trusted=trusted)
        where = str(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f'{where} holds a {type(ckpt).__name__}, not a state dict')
    if use_ema:
        ema_key = next((k for k in _EMA_KEYS if isinstance(ckpt.get(k), Mapping)), None)
        if ema_key is None:
            raise CheckpointError(f'{where} has no EMA weights (looked for {", ".join(_EMA_KEYS)})')
        ckpt = ckpt[ema_key]
    else:
        for key in _WRAPPER_KEYS:
            if isinstance(ckpt.get(key), Mapping):
                ckpt = ckpt[key]
                break
    state = {k[7:] if k.startswith('module.') else k: v for k, v in ckpt.items()}
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f'{where} is not a state dict: entries {not_tensors[:5]} are not tensors')
    if not state:
        raise CheckpointError(f'{where} holds an empty state dict')
    return state


def load_checkpoint(
        model: nn.Module,
        source: Union[str, Path, Mapping[str, Tensor]],
        strict: bool = True,
        use_ema: bool = False,
        filter_fn: Optional[Callable[[Dict[str, Tensor], nn.Module], Dict[str, Tensor]]] = None,
        trusted: bool = False,
) -> nn.Module:
    """Load a checkpoint into ``model``; strict about keys and shapes, except a classifier of another size.

    A head trained for another number of classes is dropped with a warning (as timm does) and the model
    keeps its freshly initialised head. Anything else that differs raises ``CheckpointMismatchError``
    naming the keys. ``filter_fn`` converts other key layouts; by default the model family's
    ``checkpoint_filter_fn`` (a module-level function of the family file, as in timm).
    """
    state = read_checkpoint(source, use_ema=use_ema, trusted=trusted)
    if filter_fn is None:
        filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    head_names = _classifier_keys(model)
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    unexpected = [k for k in state if k not in own]
    # A classifier for another number of classes (or none at all) is dropped, as timm does.
    head_diff = {m[0] for m in mismatched} | set(unexpected)
    dropped = set()
    if head_diff and head_diff <= head_names:
        _logger.warning('the checkpoint classifier (%s) does not fit the model (num_classes=%s): not loaded',
                        ', '.join(sorted(head_diff)), getattr(model, 'num_classes', '?'))
        dropped = head_diff
        state = {k: v for k, v in state.items() if k not in dropped}
        mismatched, unexpected = [], []
    missing = [k for k in own if k not in state and not _is_optional_key(k) and k not in dropped]
    if not strict:
        state = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    elif missing or unexpected or mismatched:
        raise CheckpointMismatchError(str(source) if not isinstance(source, Mapping) else 'state dict',
                                      missing, unexpected, mismatched)
    model.load_state_dict(state, strict=False)
    return model


def _is_optional_key(key: str) -> bool:
    # Checkpoints saved before BatchNorm tracked batches lack this counter; it does not affect the output.
    return key.endswith('num_batches_tracked')


def _classifier_keys(model: nn.Module) -> set:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier = cfg.get('classifier', 'head')
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    return {f'{n}.{p}' for n in names for p in ('weight', 'bias')}


def resolve_pretrained_file(pretrained_cfg: Mapping[str, Any], cache_dir: Optional[str] = None) -> Path:
    """The local file of an official checkpoint: ``file`` in the cfg, else the Hugging Face cache.

    Downloads (through huggingface_hub) only when the cache lacks the file and HF_HUB_OFFLINE is not set.
    """
    if pretrained_cfg.get('file'):
        return Path(pretrained_cfg['file'])
    repo_id, filename = pretrained_cfg.get('hf_hub_id'), pretrained_cfg.get('hf_hub_filename')
    if not repo_id or not filename:
        raise CheckpointError(f'no official weights are known for {pretrained_cfg.get("architecture")}')
    import huggingface_hub
    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    if isinstance(cached, str) and os.path.isfile(cached):
        return Path(cached)
    if os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', '', 'false', 'False'):
        raise CheckpointError(
            f'official weights {repo_id}/{filename} are not in the local Hugging Face cache and HF_HUB_OFFLINE '
            f'is set. Download them once (huggingface-cli download {repo_id} {filename}) or pass '
            f'checkpoint_path=/path/to/{filename}.')
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir))
    except Exception as e:
        raise CheckpointError(f'could not fetch {repo_id}/{filename}: {e}. Pass checkpoint_path= to load a '
                              f'local copy.') from e


def state_dict_key_diff(keys_a: Iterable[str], keys_b: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Keys only in a, keys only in b (sorted): for comparing a model with an official key list."""
    a, b = set(keys_a), set(keys_b)
    return sorted(a - b), sorted(b - a)
