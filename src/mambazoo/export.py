"""Export a model: ONNX, TorchScript, or a shareable folder (config.json + model.safetensors).

ONNX goes through torch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``, onnxscript): it exports
every family, while the older TorchScript-based exporter (``dynamo=False``) fails on two of them (it has no ONNX op
for Vim's ``aten::rms_norm`` before opset 23, and stops with an internal error on VMamba). TorchScript is
``torch.jit.trace`` (torch now warns that torch.jit is deprecated in favour of torch.export; it is still the format
many C++ and mobile runtimes load).

While a model is traced or exported, ``mambazoo.ops.selective_scan`` runs its loop-free backend ('parallel', a
log-depth associative scan), so the graphs hold O(log L) scan nodes instead of one group per time step.

The folder is what the Hugging Face hub holds for timm models, as timm's ``save_for_hf`` writes it: config.json
(architecture, num_classes, the model arguments under 'model_args', and a 'pretrained_cfg' with input size,
mean and std) beside model.safetensors. ``create_model(name, checkpoint_path=folder, **model_args)`` builds it
again (``load_from_folder`` does that from config.json alone).

``reference_image`` and the ``verify_*`` functions check an export on a real photograph (scikit-image's
astronaut), preprocessed as the model's pretrained config says.
"""
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ['export_onnx', 'export_torchscript', 'export_folder', 'load_from_folder', 'reference_image',
           'verify_onnx', 'verify_torchscript', 'verify_folder', 'resolve_input_size', 'DEFAULT_OPSET']

DEFAULT_OPSET = 18  # supported by every current ONNX Runtime; the exporter decomposes newer ops for it
INPUT_NAME, OUTPUT_NAME = 'image', 'logits'
# Weights past protobuf's 2 GB limit must live in an external data file beside the .onnx.
_ONNX_SINGLE_FILE_LIMIT = 1800 * 2 ** 20

PathLike = Union[str, Path]
ImageSize = Union[int, Sequence[int], None]


def resolve_input_size(model: nn.Module, img_size: ImageSize = None) -> Tuple[int, int, int]:
    """(channels, height, width) of the example input: ``img_size`` (int or (H, W)) or the pretrained input size."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    channels = int(getattr(model, 'in_chans', cfg.get('input_size', (3,))[0]))
    if img_size is None:
        height, width = cfg.get('input_size', (3, 224, 224))[-2:]
    elif isinstance(img_size, int):
        height = width = img_size
    else:
        if len(img_size) != 2:
            raise ValueError(f'img_size must be an int or (height, width), got {img_size!r}')
        height, width = img_size
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f'img_size must be positive, got {(height, width)}')
    return channels, int(height), int(width)


def _example_input(model: nn.Module, img_size: ImageSize, batch_size: int) -> Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    return torch.randn(batch_size, *resolve_input_size(model, img_size), device=device)


def _check_runs(model: nn.Module, x: Tensor) -> None:
    """Run the model once so that an unsupported input size fails with the model's own message, not the exporter's."""
    with torch.no_grad():
        model(x)


def export_onnx(
        model: nn.Module,
        path: PathLike,
        img_size: ImageSize = None,
        dynamic_batch: bool = False,
        opset: int = DEFAULT_OPSET,
        optimize: bool = True,
) -> Path:
    """Write ``model`` (put in eval mode) as an ONNX file with input 'image' (B, C, H, W) and output 'logits'.

    Args:
        img_size: the input height and width (int or (H, W)); the pretrained input size by default. The graph is
            specialised to it (token counts and scan lengths are fixed), only the batch can be dynamic.
        dynamic_batch: a symbolic batch dimension, so that one file serves any batch size.
        opset: ONNX opset version.
        optimize: run onnxscript's graph optimiser (constant folding, fusions) on the result.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    # Dynamic dimensions are traced from an example of size >= 2 (torch.export specialises sizes 0 and 1).
    x = _example_input(model, img_size, batch_size=2 if dynamic_batch else 1)
    _check_runs(model, x)
    dynamic_shapes = ({0: torch.export.Dim('batch')},) if dynamic_batch else None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], optimize=optimize,
                                    verbose=False)
    program.save(str(path), external_data=weight_bytes > _ONNX_SINGLE_FILE_LIMIT)
    return path


def export_torchscript(model: nn.Module, path: PathLike, img_size: ImageSize = None, batch_size: int = 1) -> Path:
    """Write ``model`` (put in eval mode) as a traced TorchScript module (``torch.jit.load`` reads it back).

    The trace is specialised to ``img_size`` (the pretrained input size by default), like the ONNX export.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = _example_input(model, img_size, batch_size=batch_size)
    _check_runs(model, x)
    with torch.no_grad(), warnings.catch_warnings():
        # Shapes read as Python numbers become constants: expected, the trace is for one input size.
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        _ignore_jit_deprecation()
        # No check_trace: it traces again and compares with an eager run, where the scan takes its loop path (other
        # rounding); verify_torchscript makes that comparison with an explicit tolerance.
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def _ignore_jit_deprecation() -> None:
    """Inside a ``warnings.catch_warnings()`` block: silence torch's 'torch.jit.* is deprecated' FutureWarnings
    (the caller asked for TorchScript; the module docstring says it is deprecated)."""
    warnings.filterwarnings('ignore', message=r'`torch\.jit\.', category=FutureWarning)


def export_folder(
        model: nn.Module,
        folder: PathLike,
        model_name: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        img_size: ImageSize = None,
) -> Path:
    """Write ``model`` as a Hugging Face hub style folder: config.json (timm's ``save_config_for_hf``, as its
    ``save_for_hf`` writes it) + model.safetensors.

    Args:
        model_name: the registered name to build it again with (default: the pretrained config's architecture).
        model_args: the keyword arguments it was created with beyond the name (e.g. smaller depths), recorded in
            config.json's 'model_args' (with in_chans, num_classes and global_pool, which timm adds).
        img_size: the input size to record in 'pretrained_cfg' (default: the model's).
    """
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    from .models import resolve_name
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f'{folder} exists and is not a folder')
    cfg = getattr(model, 'pretrained_cfg', None)
    if not cfg:
        raise ValueError('the model has no pretrained_cfg: build it with mambazoo.create_model')
    name = resolve_name(model_name or cfg['architecture'])
    model_args = dict(model_args or {})
    for key in ('pretrained', 'checkpoint_path', 'features_only', 'out_indices'):
        model_args.pop(key, None)  # how a model was loaded or wrapped, not what it is
    data_config = {'input_size': resolve_input_size(model, img_size)} if img_size is not None else None
    try:
        json.dumps(model_args)
    except (TypeError, ValueError) as e:
        raise ValueError(f'model_args must be JSON serialisable (numbers, strings, lists, dicts): {e}') from e
    folder.mkdir(parents=True, exist_ok=True)
    # timm's save_for_hf would save model.state_dict() as is; safetensors refuses non-contiguous tensors (VMamba
    # has some) and tensors sharing memory, so the weights get their own contiguous copies here.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
              str(folder / 'model.safetensors'), metadata={'format': 'pt'})
    # model_config entries override what timm reads from the model (its pretrained config's architecture).
    save_config_for_hf(model, str(folder / 'config.json'), model_config={'architecture': name},
                       model_args=model_args, data_config=data_config)
    return folder


def load_from_folder(folder: PathLike, **overrides: Any) -> nn.Module:
    """The model of an ``export_folder`` folder: its config.json's architecture and model_args, its weights
    (in training mode, as ``create_model`` returns it)."""
    from .models import create_model
    config_path = Path(folder) / 'config.json'
    if not config_path.is_file():
        raise FileNotFoundError(f'{config_path} not found: not a folder written by export_folder / save_for_hf')
    config = json.loads(config_path.read_text())
    if 'architecture' not in config:
        raise ValueError(f'{config_path} has no "architecture" entry')
    kwargs = dict(config.get('model_args', {}), **overrides)
    return create_model(config['architecture'], checkpoint_path=folder, **kwargs)


def reference_image(model: nn.Module, img_size: ImageSize = None, photo: str = 'astronaut') -> Tensor:
    """A real photograph from scikit-image (``skimage.data.<photo>``) as a (1, C, H, W) batch, preprocessed as the
    model's pretrained config says (resize, center crop, mean/std) at ``img_size``."""
    import skimage.data
    from PIL import Image

    from .data.images import build_eval_transform
    channels, height, width = resolve_input_size(model, img_size)
    if channels not in (1, 3):
        raise ValueError(f'a photograph has 1 or 3 channels; the model takes {channels}')
    loader = getattr(skimage.data, photo, None)
    if loader is None:
        raise ValueError(f'skimage.data has no photograph {photo!r} (try astronaut or chelsea)')
    image = Image.fromarray(loader())
    transform = build_eval_transform(model, input_size=(channels, height, width))
    return transform(image).unsqueeze(0)


def _first_output(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def _pytorch_output(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    param = next(model.parameters(), None)
    with torch.no_grad():
        return _first_output(model(x if param is None else x.to(param.device))).float().cpu()


def verify_onnx(path: PathLike, model: nn.Module, x: Tensor) -> float:
    """Max abs difference between ONNX Runtime (CPU) running ``path`` on ``x`` and ``model`` in eval mode."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError('verifying an ONNX file needs onnxruntime (pip install onnxruntime)') from e
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    ort_out = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0]
    return (torch.from_numpy(ort_out).float() - _pytorch_output(model, x)).abs().max().item()


def verify_torchscript(path: PathLike, model: nn.Module, x: Tensor) -> float:
    """Max abs difference between the TorchScript module at ``path`` on ``x`` and ``model`` in eval mode."""
    with torch.no_grad(), warnings.catch_warnings():
        _ignore_jit_deprecation()
        loaded = torch.jit.load(str(path), map_location='cpu')
        out = _first_output(loaded(x.cpu())).float()
    return (out - _pytorch_output(model, x)).abs().max().item()


def verify_folder(folder: PathLike, model: nn.Module, x: Tensor) -> float:
    """Max abs difference between the model built again from ``folder`` and ``model``, on ``x``."""
    reloaded = load_from_folder(folder).to(next(model.parameters()).device)
    return (_pytorch_output(reloaded, x) - _pytorch_output(model, x)).abs().max().item()
