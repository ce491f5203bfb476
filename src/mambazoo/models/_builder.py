"""What every family shares: the name registry, model building, and loading checkpoints from local files.

Names are registered twice: in our own registry (``create_model`` / ``list_models``, which also knows the
official names as aliases) and in timm's, so that ``timm.create_model(name)`` works after ``import mambazoo``.
timm's registry only gets names it does not already have (timm owns ``mambaout_*``); the official names (aliases)
are registered there too, under the same rule.

Pretrained configs are timm's: each family's ``default_cfgs`` holds one cfg per ``name.tag`` (weights) as
``generate_default_cfgs`` groups them, and ``create_model('name.tag')`` builds with that tag's cfg (the first tag
with weights when no tag is given). Plain ``{name: cfg}`` or ``{name.tag: cfg}`` dicts are understood as well.

Checkpoints are read from local files only, except ``pretrained=True``, which looks for the official file in the
local caches (Hugging Face's, torch hub's ``checkpoints/``) and downloads it only when a network is allowed (never
with HF_HUB_OFFLINE=1).
"""
import argparse
import collections
import dataclasses
import fnmatch
import json
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from timm.models import generate_default_cfgs
from timm.models._pretrained import DefaultCfg, PretrainedCfg
from timm.models._registry import split_model_name_tag
from torch import Tensor, nn

_logger = logging.getLogger(__name__)

__all__ = [
    'register_model', 'register_alias', 'create_model', 'create_any_model', 'get_pretrained_cfg', 'list_models',
    'is_model', 'resolve_name', 'resolve_pretrained_cfg', 'generate_default_cfgs', 'build_model', 'load_checkpoint',
    'read_checkpoint', 'resolve_pretrained_file', 'torch_hub_checkpoint_file', 'CheckpointError',
    'CheckpointMismatchError',
]

_entrypoints: Dict[str, Callable[..., nn.Module]] = {}
_aliases: Dict[str, str] = {}
_family_of: Dict[str, str] = {}

# The feature wrapper our families default to: timm's FeatureGetterNet, which takes the maps from the model's
# forward_intermediates (each stage's blocks before its downsample, strides 4..32), where hooks on the stage modules
# would see the downsampled output. Families may override it through their feature_cfg.
_DEFAULT_FEATURE_CFG = dict(feature_cls='getter', out_indices=(0, 1, 2, 3))


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
    for alias, target in _aliases.items():  # official names declared before their model
        if target == name:
            _register_alias_in_timm(alias, name)
    return fn


def register_alias(alias: str, name: str) -> None:
    """Let ``create_model(alias)`` (and ``timm.create_model(alias)``, where timm lacks the name) build ``name``.

    Used for the official repositories' names; ``name`` may be registered before or after its aliases.
    """
    _aliases[alias] = name
    if name in _entrypoints:
        _register_alias_in_timm(alias, name)


def _register_alias_in_timm(alias: str, name: str) -> None:
    import timm.models
    if timm.models.is_model(alias):
        return
    target = _entrypoints[name]

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _entrypoints[name](pretrained=pretrained, **kwargs)

    # timm names the model after the function and files it under the function's module (the family), whose
    # __all__ it extends: the function is made an attribute of that module too (`from ... import mamba_vision_T`).
    entrypoint.__name__ = entrypoint.__qualname__ = alias
    entrypoint.__module__ = target.__module__
    entrypoint.__doc__ = f'{alias}: the official name of {name}.\n\n{target.__doc__ or ""}'
    setattr(sys.modules[target.__module__], alias, entrypoint)
    timm.models.register_model(entrypoint)


def resolve_name(name: str) -> str:
    """Our canonical name for ``name`` (an alias or a canonical name, a ``.tag`` ignored); raises if unknown."""
    base = split_model_name_tag(name)[0]
    base = _aliases.get(base, base)
    if base not in _entrypoints:
        close = [n for n in list(_entrypoints) + list(_aliases) if base.lower()[:8] in n.lower()][:8]
        hint = f' Did you mean one of: {", ".join(close)}?' if close else ' See mambazoo.list_models() (command line: mambazoo list).'
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


def _family_cfgs(canonical: str) -> Mapping[str, Any]:
    return getattr(sys.modules[_entrypoints[canonical].__module__], 'default_cfgs', {})


def get_pretrained_cfg(name: str) -> Dict[str, Any]:
    """The pretrained config (input size, crop, mean/std, weights, ...) of ``name`` or ``name.tag``, without
    building the model; ``{}`` for a model without one. An unknown tag raises ``ValueError`` naming the known ones."""
    canonical = resolve_name(name)
    cfgs = _family_cfgs(canonical)
    if _default_cfg(canonical, cfgs) is None:
        return {}
    return resolve_pretrained_cfg(canonical, cfgs, split_model_name_tag(name)[1] or None)


def _default_cfg(variant: str, default_cfgs: Mapping[str, Any]) -> Optional[DefaultCfg]:
    """``variant``'s tags and their cfgs from a family's ``default_cfgs``: the output of timm's
    ``generate_default_cfgs`` (``{name: DefaultCfg}``), or its input (``{name or name.tag: dict}``, where an
    untagged cfg may name its tag in a 'tag' entry)."""
    entry = default_cfgs.get(variant)
    if isinstance(entry, DefaultCfg):
        return entry
    raw: Dict[str, Any] = {}
    for key, cfg in default_cfgs.items():
        arch, tag = split_model_name_tag(key)
        if arch != variant:
            continue
        own_tag = cfg.get('tag') if isinstance(cfg, Mapping) else getattr(cfg, 'tag', None)
        raw[f'{arch}.{own_tag}' if not tag and own_tag else key] = cfg
    return generate_default_cfgs(raw)[variant] if raw else None


def resolve_pretrained_cfg(
        variant: str,
        default_cfgs: Mapping[str, Any],
        pretrained_cfg: Optional[Union[str, Mapping[str, Any], PretrainedCfg]] = None,
        pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The pretrained cfg (a dict, as timm's ``model.pretrained_cfg``) ``variant`` is built with.

    Args:
        variant: our canonical model name.
        default_cfgs: the family's ``default_cfgs``.
        pretrained_cfg: a tag of ``variant`` (None: its default tag, the first with weights), or a whole cfg (a
            dict or timm ``PretrainedCfg``), as ``timm.create_model`` passes them.
        pretrained_cfg_overlay: entries that replace the cfg's (e.g. ``file=`` a local copy of the weights).
    Raises:
        ValueError: a tag ``variant`` does not have (the message names the known ones).
    """
    if isinstance(pretrained_cfg, PretrainedCfg):
        cfg = pretrained_cfg
    elif isinstance(pretrained_cfg, Mapping):
        cfg = PretrainedCfg(**pretrained_cfg)
    else:
        default = _default_cfg(variant, default_cfgs)
        tag = pretrained_cfg or None
        if default is None:
            if tag is not None:
                raise ValueError(f'Unknown pretrained tag {tag!r} for {variant}: it has no pretrained tags.')
            cfg = PretrainedCfg()  # as timm for a model without a cfg: the defaults (224 px, ImageNet mean/std)
        else:
            if tag is not None and tag not in default.cfgs:
                known = [t for t in default.tags if t]
                have = f'its tags are {", ".join(known)}' if known else 'it has no pretrained tags'
                raise ValueError(f'Unknown pretrained tag {tag!r} for {variant}: {have}.')
            tag = default.tags[0] if tag is None else tag
            cfg = default.cfgs[tag]
            if cfg.hf_hub_id == 'timm/':  # timm's shorthand: the hub repository named after the model and tag
                cfg = dataclasses.replace(cfg, hf_hub_id=f'timm/{variant}.{tag}' if tag else f'timm/{variant}')
            cfg = dataclasses.replace(cfg, architecture=variant, tag=tag or None)
    overlay = dict(pretrained_cfg_overlay or {})
    if not cfg.architecture:
        overlay.setdefault('architecture', variant)
    return dataclasses.replace(cfg, **overlay).to_dict()


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint_path: Optional[Union[str, Path]] = None,
        trusted: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """Build a model by name (ours or an official alias), optionally with a pretrained tag (``name.tag``).

    Unlike ``timm.create_model``, arguments whose value is None are passed on as they are: ``layer_scale=None``
    switches MambaVision's layer scale off. Leave out the arguments you do not set.

    Args:
        name: a name from ``list_models()`` or an official alias such as 'mamba_vision_T', with an optional tag
            ('mambavision_tiny.in1k'); an unknown tag raises ``ValueError`` naming the known ones.
        pretrained: load the official weights from the local caches (downloads only when allowed).
        checkpoint_path: a local checkpoint (.pth/.pth.tar/.bin/.safetensors or a Hugging Face style folder). A
            checkpoint written by ``mambazoo train`` or a folder written by ``export --format folder`` records the
            model's arguments and evaluation config (``models.model_file``): they are the defaults here (explicit
            arguments win); ``mambazoo.load_model(path)`` needs no name at all.
        trusted: allow a pickled checkpoint to hold any Python object (unpickling it could run code).
        **kwargs: model arguments (num_classes, in_chans, drop_path_rate, ...), timm's feature arguments
            (features_only, out_indices, feature_cls, feature_cfg) and pretrained_cfg / pretrained_cfg_overlay.
    """
    if checkpoint_path is not None and not isinstance(checkpoint_path, Mapping):
        from .model_file import build_recorded, open_model_file
        record, checkpoint_path = open_model_file(checkpoint_path, trusted=trusted)
        if record is not None and resolve_name(name) == resolve_name(record['name']):
            return build_recorded({**record, 'name': name}, checkpoint_path, kwargs)
    return create_model_unrecorded(name, pretrained, checkpoint_path, **kwargs)


def create_model_unrecorded(name: str, pretrained: bool = False,
                            checkpoint_path: Optional[Union[str, Path, Mapping[str, Tensor]]] = None,
                            **kwargs: Any) -> nn.Module:
    """``create_model`` without reading a record: exactly the given arguments (the checkpoint a file, a folder or
    loaded contents)."""
    tag = split_model_name_tag(name)[1]
    if tag and kwargs.get('pretrained_cfg') is None:
        kwargs['pretrained_cfg'] = tag  # as timm: an explicit pretrained_cfg wins over the name's tag
    return _entrypoints[resolve_name(name)](pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)


def create_any_model(name: str, img_size: Optional[int] = None, device: Any = 'cpu', **kwargs: Any) -> nn.Module:
    """A registered mambazoo model, else a timm model, randomly initialised, built for ``img_size`` where the
    architecture takes one (position embeddings); ``device`` 'meta' builds shapes only.

    For the tools that put ours beside timm's (benchmarks, FLOP counts): one call for either library's names.
    """
    import timm
    if is_model(name):
        build: Callable[..., nn.Module] = create_model
    elif timm.is_model(name):
        build = timm.create_model
    else:
        raise ValueError(f'unknown model {name!r}: neither a mambazoo model (`mambazoo list`) nor a timm model')
    with torch.device(device):
        if img_size:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings('ignore', message='.*ignores unknown arguments.*')
                    return build(name, pretrained=False, img_size=img_size, **kwargs)
            except TypeError:
                pass  # a constructor without img_size (CNNs): any input size works
        return build(name, pretrained=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Building

def build_model(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        default_cfgs: Mapping[str, Any],
        checkpoint_path: Optional[Union[str, Path]] = None,
        checkpoint_filter_fn: Optional[Callable[[Dict[str, Tensor], nn.Module], Dict[str, Tensor]]] = None,
        pretrained_cfg: Optional[Union[str, Mapping[str, Any], PretrainedCfg]] = None,
        pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        feature_cfg: Optional[Mapping[str, Any]] = None,
        feature_norm: Optional[bool] = None,
        output_fmt: Optional[str] = None,
        **kwargs: Any,
) -> nn.Module:
    """One builder for all families: timm's ``build_model_with_cfg`` (cfg, defaults, feature wrapper), our loader.

    The weights (``checkpoint_path``, else with ``pretrained`` the official file) are loaded into the bare model as
    soon as it is constructed, inside timm's builder, so checkpoints keep their keys; timm then puts its feature
    wrapper around it for ``features_only=True`` and sets ``pretrained_cfg`` / ``default_cfg`` on whatever it
    returns, exactly as for timm's own models.

    Args:
        model_cls: the family's model class (or any callable taking the model arguments).
        variant: our canonical name.
        pretrained: load the official weights of the cfg (see ``resolve_pretrained_file``).
        default_cfgs: the family's ``default_cfgs``.
        checkpoint_path: a local checkpoint; wins over ``pretrained``.
        checkpoint_filter_fn: converts other key layouts (the family's ``checkpoint_filter_fn``).
        pretrained_cfg, pretrained_cfg_overlay: a tag or a whole cfg, and entries replacing the cfg's (timm's).
        cache_dir: where the official weights are cached (Hugging Face cache / torch hub checkpoints folder).
        feature_cfg: the family's defaults for the feature wrapper (timm's: feature_cls, out_indices, norm, ...);
            explicit ``out_indices`` / ``feature_cls`` arguments win, as in timm.
        feature_norm, output_fmt: shorthands for ``feature_cfg`` 'norm' / 'output_fmt' (used with features_only).
        **kwargs: model arguments and timm's (features_only, out_indices, feature_cls, pretrained_model_args, ...).
    """
    from timm.models import build_model_with_cfg

    cfg = resolve_pretrained_cfg(variant, default_cfgs, pretrained_cfg, pretrained_cfg_overlay)
    source: Optional[Union[str, Path]] = checkpoint_path
    if source is None and pretrained:
        source = resolve_pretrained_file(cfg, cache_dir=cache_dir)
    feature_cfg = {**_DEFAULT_FEATURE_CFG, **(feature_cfg or {})}
    if feature_norm is not None:
        feature_cfg['norm'] = feature_norm
    if output_fmt is not None:
        feature_cfg['output_fmt'] = output_fmt
    if not kwargs.get('features_only', False):
        for key in ('out_indices', 'feature_cls'):  # feature arguments without features_only select nothing
            kwargs.pop(key, None)

    def construct(**model_kwargs: Any) -> nn.Module:
        model = model_cls(**model_kwargs)
        if source is not None:
            model.pretrained_cfg = cfg  # names the classifier, which load_checkpoint may drop
            load_checkpoint(model, source, filter_fn=checkpoint_filter_fn)
        return model

    return build_model_with_cfg(construct, variant, pretrained=False, pretrained_cfg=cfg, feature_cfg=feature_cfg,
                                cache_dir=cache_dir, **kwargs)


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


class _YacsConfigAsDict(dict):
    """Stands in for yacs' ``CfgNode`` (a dict subclass): VMamba's release files pickle their training config as one
    beside the weights. Unpickled as a plain OrderedDict (the one dict type torch's safe loader builds with
    attributes), so those files load without yacs and without running any code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return collections.OrderedDict()


# Harmless types that training scripts pickle beside the weights: timm's train.py its argparse config, VMamba its
# yacs config.
_SAFE_CONFIG_GLOBALS = (argparse.Namespace, PosixPath, PurePosixPath, (_YacsConfigAsDict, 'yacs.config.CfgNode'))


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
        refused = re.search(r'(?:Unsupported global: GLOBAL|global) ([\w.]+)', str(e))
        if refused or 'Unsupported global' in str(e) or 'not an allowed global' in str(e):
            what = f'a pickled {refused.group(1)} object' if refused else 'pickled Python objects'
            raise CheckpointError(
                f'{path} holds {what} besides the weights, which the safe loader (torch.load weights_only) refuses (unpickling it could '
                f'run code). If you trust the file, load it with trusted=True (command line: --trusted).') from e
        raise CheckpointError(f'cannot read checkpoint {path} (corrupt, or not a PyTorch file): '
                              f'{str(e).splitlines()[-1] if str(e) else e}') from e
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
        where = str(getattr(source, 'path', 'state dict'))  # loaded contents may remember their file
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
        raise CheckpointMismatchError(str(getattr(source, 'path', 'state dict')) if isinstance(source, Mapping)
                                      else str(source),
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


def _offline() -> bool:
    """HF_HUB_OFFLINE set (in the environment, or as huggingface_hub read it at import): no download at all."""
    if os.environ.get('HF_HUB_OFFLINE', '0').strip().lower() not in ('0', '', 'false', 'no', 'off'):
        return True
    constants = sys.modules.get('huggingface_hub.constants')
    return bool(getattr(constants, 'HF_HUB_OFFLINE', False))


def torch_hub_checkpoint_file(url: str, cache_dir: Optional[Union[str, Path]] = None,
                              filename: Optional[str] = None) -> Path:
    """Where a weights ``url`` is cached, as timm and torch.hub keep it: ``<cache_dir or torch.hub.get_dir()/
    checkpoints>/<filename or the url's file name>`` (torch.hub.get_dir() follows TORCH_HOME)."""
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / 'checkpoints'
    return folder / (filename or os.path.basename(urlparse(url).path))


def resolve_pretrained_file(pretrained_cfg: Mapping[str, Any], cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The local file of an official checkpoint, as timm finds it: ``file`` in the cfg; else the Hugging Face cache
    (``hf_hub_id`` / ``hf_hub_filename``); else torch hub's checkpoint cache (``url``, see
    ``torch_hub_checkpoint_file``).

    Nothing cached: downloads (huggingface_hub first, then ``torch.hub.download_url_to_file`` into the cache)
    unless HF_HUB_OFFLINE is set; offline or without a network, a ``CheckpointError`` says where to put the file.
    """
    if pretrained_cfg.get('file'):
        return Path(pretrained_cfg['file'])
    repo_id = pretrained_cfg.get('hf_hub_id')
    filename = pretrained_cfg.get('hf_hub_filename') or ('model.safetensors' if repo_id else None)
    url = pretrained_cfg.get('url') or None
    url_file = None
    if url:
        url, url_name = url if isinstance(url, (list, tuple)) else (url, None)  # timm's (url, file name) form
        url_file = torch_hub_checkpoint_file(url, cache_dir, url_name)
    if not repo_id and not url:
        raise CheckpointError(f'no official weights are known for {pretrained_cfg.get("architecture")}')
    if repo_id:
        import huggingface_hub
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str) and os.path.isfile(cached):
            return Path(cached)
    if url_file is not None and url_file.is_file():
        return url_file
    if _offline():
        places = []
        if repo_id:
            places.append(f'the Hugging Face cache (huggingface-cli download {repo_id} {filename})')
        if url_file is not None:
            places.append(f'{url_file} (downloaded from {url})')
        raise CheckpointError(
            f'official weights of {pretrained_cfg.get("architecture")} are not cached and HF_HUB_OFFLINE is set. '
            f'Put them in {" or ".join(places)}, or pass checkpoint_path=/path/to/the/file.')
    errors = []
    if repo_id:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir))
        except Exception as e:  # no network, no such repository or file, ...
            errors.append(f'{repo_id}/{filename}: {e}')
    if url_file is not None:
        try:
            url_file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(url_file))  # writes a temporary file, moved when complete
            return url_file
        except Exception as e:  # URLError without a network, HTTP errors, ...
            errors.append(f'{url}: {e}')
        raise CheckpointError(f'could not fetch {"; ".join(errors)}. Download the file to {url_file} or pass '
                              f'checkpoint_path=/path/to/{url_file.name}.')
    raise CheckpointError(f'could not fetch {"; ".join(errors)}. Pass checkpoint_path= to load a local copy.')


def state_dict_key_diff(keys_a: Iterable[str], keys_b: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Keys only in a, keys only in b (sorted): for comparing a model with an official key list."""
    a, b = set(keys_a), set(keys_b)
    return sorted(a - b), sorted(b - a)
