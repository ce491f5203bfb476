"""Images in: reading a file safely, and the one evaluation transform every command uses.

``load_image`` turns any readable file into an RGB PIL image or raises ``ImageLoadError`` with the reason (not an
image, truncated, larger than the pixel limit, a folder). ``eval_data_config`` / ``build_eval_transform`` are the
model's evaluation preprocessing (resize by crop_pct, center crop, mean/std) as timm resolves it from the model's
``pretrained_cfg``: for an official model its published config, for a model loaded from a training checkpoint the
config it was trained and validated with (``models.model_file`` puts it there). ``predict``, ``validate``, the
demo, the analysis tools and ``export --verify`` all call these two.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch import nn

__all__ = ['ImageLoadError', 'load_image', 'to_rgb', 'model_in_chans', 'eval_data_config', 'build_eval_transform',
           'eval_transform_of', 'match_channels', 'with_mode']


class ImageLoadError(ValueError):
    """A file that is not a usable image (not an image, truncated, too large, unsupported mode)."""


def load_image(path: Union[str, Path]) -> Image.Image:
    """An RGB PIL image from ``path``; raises ImageLoadError with the reason for anything unusable.

    Images of more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's decompression-bomb limit, 179 million
    by default) are refused before they are decoded; raise that attribute to read larger ones."""
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(f'{path}: a folder, not an image file (name the files, e.g. {path}/*.png)')
    if not path.is_file():
        raise ImageLoadError(f'{path}: no such file')
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in the transform
            return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f'{path}: too large to decode safely ({e}; the limit is 2 x PIL.Image.MAX_IMAGE_PIXELS '
                             f'= {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels)') from None
    except UnidentifiedImageError:
        raise ImageLoadError(f'{path}: not an image file (PIL cannot identify it)') from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f'{path}: cannot decode the image ({e})') from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any PIL mode: 16-bit and float images stretched to 8 bits, transparency over white."""
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
        # 16-bit / float images: stretch to 8 bits first (PIL's RGB conversion would clip them).
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        img = Image.fromarray(a.round().astype(np.uint8), mode='L')
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))  # transparent pixels -> white
        return Image.alpha_composite(background, rgba).convert('RGB')
    if img.mode not in ('RGB', 'L', 'P', 'CMYK', 'YCbCr', '1', 'LAB', 'HSV'):
        raise ImageLoadError(f'unsupported image mode {img.mode!r}')
    return img.convert('RGB')


def match_channels(mean, std, in_chans: int):
    """Normalisation statistics for ``in_chans`` channels (RGB statistics averaged for grayscale, and back)."""
    mean, std = tuple(mean), tuple(std)
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return mean, std


class _ConvertMode:
    """PIL mode conversion as a picklable transform (loader workers pickle the dataset)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)


def with_mode(transform, in_chans: int):
    """Prefix ``transform`` with a conversion to grayscale (1 channel) or RGB (3), whatever the source images."""
    from torchvision import transforms
    return transforms.Compose([_ConvertMode('L' if in_chans == 1 else 'RGB'), transform])


def model_in_chans(model: nn.Module) -> int:
    """The input channels ``model`` was built with (its ``in_chans``; else its pretrained config's; else 3)."""
    inner = getattr(model, 'model', model)  # timm's feature wrappers keep the model's attributes on it or inside
    chans = getattr(model, 'in_chans', None) or getattr(inner, 'in_chans', None)
    return int(chans or (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3,))[0])


def eval_data_config(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                     **overrides: Any) -> Dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for evaluating ``model``:
    its pretrained config, with ``img_size`` (square), ``crop_pct`` and other entries (mean, std, interpolation)
    given here winning; the channels are the model's own, the statistics matched to them."""
    from timm.data import resolve_data_config
    chans = model_in_chans(model)
    args: Dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if img_size:
        args['input_size'] = (chans, img_size, img_size)
    if crop_pct:
        args['crop_pct'] = crop_pct
    for key in ('mean', 'std'):
        if key in args:
            args[key] = tuple(args[key])
    cfg = resolve_data_config({k: v for k, v in args.items() if k not in ('mean', 'std')}, model=model)
    cfg.update({k: args[k] for k in ('mean', 'std') if k in args})
    cfg['input_size'] = (chans,) + tuple(cfg['input_size'][1:])
    cfg['mean'], cfg['std'] = match_channels(cfg['mean'], cfg['std'], chans)
    return cfg


def eval_transform_of(cfg: Dict[str, Any]):
    """The evaluation transform of a data config (timm's keys): a PIL image of any mode to a normalised (C, H, W)
    tensor with ``input_size``'s channels. The trainer's validation and every command build theirs here."""
    from timm.data import create_transform
    return with_mode(create_transform(**cfg, is_training=False), cfg['input_size'][0])


def build_eval_transform(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                         **overrides: Any):
    """The evaluation transform of ``eval_data_config`` (same arguments)."""
    return eval_transform_of(eval_data_config(model, img_size, crop_pct, **overrides))
