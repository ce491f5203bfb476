"""A Gradio web demo: upload an image, see the model's top-k classes and a stage's activation map over the image.

``predict_image`` does the work and needs no browser; ``build_demo`` wraps it in a ``gr.Blocks`` page and
``launch`` serves that page on this machine only (no share link, no telemetry). The CLI's ``mambazoo demo`` is a
thin layer over ``mambazoo.load_model`` (or ``create_model``), ``build_demo`` and ``launch``.
"""
import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw
from torch import nn

from .data.images import build_eval_transform, eval_data_config, to_rgb
from .predict import class_names

__all__ = ['predict_image', 'build_demo', 'launch']


def _model_view_box(size: Tuple[int, int], data_cfg: Dict[str, Any]) -> Tuple[int, int, int, int]:
    """The part of a (W, H) image that the evaluation transform keeps, as a PIL box (left, top, right, bottom).

    timm's 'center' mode scales the shorter side to ``input / crop_pct`` and crops the centre; 'squash' scales
    each side to that and crops the centre. Other modes (borders added) are drawn over the whole image.
    """
    width, height = size
    crop_h, crop_w = data_cfg['input_size'][1:]
    crop_pct = data_cfg.get('crop_pct') or 0.875
    mode = data_cfg.get('crop_mode') or 'center'
    if mode == 'center' and crop_h == crop_w:
        side = crop_w * min(width, height) / math.floor(crop_w / crop_pct)
        box_w, box_h = min(side, width), min(side, height)
    elif mode == 'squash':
        box_w = width * crop_w / math.floor(crop_w / crop_pct)
        box_h = height * crop_h / math.floor(crop_h / crop_pct)
    else:
        return 0, 0, width, height
    left, top = round((width - box_w) / 2), round((height - box_h) / 2)
    return left, top, left + round(box_w), top + round(box_h)


@torch.no_grad()
def predict_image(
        model: nn.Module,
        image: Image.Image,
        topk: int = 5,
        labels: Optional[Sequence[str]] = None,
        stage: int = -1,
        alpha: float = 0.5,
) -> Tuple[Dict[str, float], Image.Image]:
    """The ``topk`` classes of ``image`` with their probabilities, best first, and the activation map of stage
    ``stage`` over the image.

    The overlay has the size of ``image``: the map covers the part the model sees (the evaluation crop, outlined
    when it is not the whole image); the rest is left as it is. Labels repeated in ``labels`` get their index
    appended so that every class keeps its own entry.
    """
    from .analysis.activations import activation_maps, overlay_heatmap
    if image is None:
        raise ValueError('no image: upload one first')
    if not isinstance(image, Image.Image):
        raise TypeError(f'expected a PIL image, got {type(image).__name__}')
    num_classes = getattr(model, 'num_classes', 0)
    if not num_classes:
        raise ValueError('the model has no classifier (num_classes is 0): nothing to predict')
    if topk < 1:
        raise ValueError(f'topk must be at least 1, got {topk}')
    labels = list(labels) if labels is not None else class_names(model)
    if len(labels) != num_classes:
        raise ValueError(f'{len(labels)} class names for a model with {num_classes} classes')

    model.eval()
    data_cfg = eval_data_config(model)
    rgb = to_rgb(image)
    x = build_eval_transform(model)(rgb)
    x = x.unsqueeze(0).to(next(model.parameters()).device)
    logits = model(x)
    if not torch.isfinite(logits).all():
        raise ValueError('the model produced non-finite logits (NaN/inf) for this image')
    values, indices = logits.float().softmax(dim=-1)[0].topk(min(topk, num_classes))
    top: Dict[str, float] = {}
    for value, index in zip(values.tolist(), indices.tolist()):
        top[labels[index] if labels[index] not in top else f'{labels[index]} ({index})'] = value

    heatmap = activation_maps(model, x, indices=stage)[0][0]
    box = _model_view_box(rgb.size, data_cfg)
    overlay = rgb.copy()
    overlay.paste(overlay_heatmap(rgb.crop(box), heatmap, alpha=alpha), box[:2])
    if box != (0, 0, *rgb.size):
        ImageDraw.Draw(overlay).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255))
    return top, overlay


def _import_gradio():
    # Before gradio is imported: no version check or usage reports (the demo runs offline).
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
    try:
        import gradio as gr
    except ImportError:
        raise ImportError('the demo needs gradio: pip install "mambazoo[demo]"') from None
    return gr


def build_demo(model: nn.Module, class_names: Optional[Sequence[str]] = None, topk: int = 5,
               title: Optional[str] = None):
    """A ``gr.Blocks`` page: image upload and a button; the top-``topk`` classes and a stage's activation map.

    Element ids for scripts and browser tests: ``input-image``, ``stage``, ``submit``, ``predictions``,
    ``activation-map``.
    """
    if not getattr(model, 'num_classes', 0):
        raise ValueError('the demo needs a model with a classifier (num_classes > 0)')
    gr = _import_gradio()
    model.eval()
    labels = list(class_names) if class_names is not None else None
    num_stages = len(getattr(model, 'feature_info', [])) or 1
    stages = [f'stage {i}' for i in range(num_stages)]
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    title = title or f'mambazoo: {name}'

    def classify(image: Optional[Image.Image], stage: str):
        if image is None:
            raise gr.Error('Upload an image first.')
        try:
            return predict_image(model, image, topk=topk, labels=labels, stage=stages.index(stage))
        except ValueError as e:
            raise gr.Error(str(e)) from e

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f'## {title}\nUpload an image to see the top-{topk} classes and where the chosen stage '
                    f'responds (mean |activation| per position, over the part of the image the model sees).')
        with gr.Row():
            with gr.Column():
                image = gr.Image(type='pil', image_mode='RGB', sources=['upload', 'clipboard'], label='Image',
                                 elem_id='input-image')
                stage = gr.Dropdown(stages, value=stages[-1], label='Activation map of', elem_id='stage')
                submit = gr.Button('Classify', variant='primary', elem_id='submit')
            with gr.Column():
                predictions = gr.Label(num_top_classes=topk, label=f'Top-{topk}', elem_id='predictions')
                activation = gr.Image(type='pil', label='Activation map', interactive=False,
                                      buttons=['download', 'fullscreen'], elem_id='activation-map')
        submit.click(classify, inputs=[image, stage], outputs=[predictions, activation])
    return demo


def launch(demo, host: str = '127.0.0.1', port: Optional[int] = None, block: bool = True) -> str:
    """Serve ``demo`` at ``http://host:port`` (never a public share link) and return that URL.

    ``block=False`` returns at once with the server running in a background thread (``demo.close()`` stops it).
    """
    _import_gradio()
    _, local_url, _ = demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True,
                                  quiet=True, show_error=True, ssr_mode=False, mcp_server=False, pwa=False,
                                  enable_monitoring=False)
    if block:
        print(f'mambazoo demo running at {local_url} (Ctrl+C to stop)', flush=True)
        demo.block_thread()
    return local_url
