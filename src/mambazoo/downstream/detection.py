"""torchvision's Faster R-CNN and Mask R-CNN on a mambazoo backbone with FPN.

    from mambazoo.downstream import build_detector
    model = build_detector('mambavision_tiny', num_classes=81, kind='mask_rcnn', image_size=800)  # COCO-like
    losses = model(images, targets)      # training: dict of losses
    predictions = model(images)          # eval: per image {'boxes', 'labels', 'scores'(, 'masks')}

Everything but the backbone is torchvision's (anchors, RPN, RoIAlign, box and mask heads, losses, the resizing
and normalising transform). The defaults of the head sizes are torchvision's; small images want smaller
anchors (torchvision's 32-512 suit ~800 px images; ``anchor_sizes`` scales them down).
"""
from typing import Any, Dict, Optional, Sequence

from torch import nn

from .backbones import build_backbone

__all__ = ['DETECTORS', 'build_detector']

DETECTORS = ('faster_rcnn', 'mask_rcnn')


def build_detector(
        backbone_name: str,
        num_classes: int,
        kind: str = 'faster_rcnn',
        image_size: int = 800,
        max_image_size: Optional[int] = None,
        fpn_channels: int = 256,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        box_head_dim: int = 1024,
        mask_head_dim: int = 256,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        in_chans: int = 3,
        model_kwargs: Optional[Dict[str, Any]] = None,
        **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision Faster R-CNN or Mask R-CNN whose backbone is mambazoo model ``backbone_name`` + FPN.

    Args:
        backbone_name: a mambazoo model name (any family; see ``build_backbone``).
        num_classes: number of classes including the background (COCO: 91 with torchvision's category ids).
        kind: 'faster_rcnn' or 'mask_rcnn'.
        image_size: shorter side images are resized to (torchvision's ``min_size``).
        max_image_size: cap of the longer side (default: ``image_size``, i.e. square inputs are not resized).
        fpn_channels: width of every FPN level.
        anchor_sizes: one anchor size per FPN level (strides 4, 8, 16, 32 and the extra pooled level 64).
        aspect_ratios: anchor aspect ratios (the same at every level).
        box_head_dim: hidden width of the two-layer box head (torchvision: 1024).
        mask_head_dim: width of the four mask-head convolutions (torchvision: 256).
        image_mean, image_std: normalisation (per input channel) applied inside the model, as torchvision's.
        pretrained, checkpoint_path, in_chans, model_kwargs: the backbone's weights and configuration.
        **detector_kwargs: further ``FasterRCNN`` / ``MaskRCNN`` arguments (rpn_*, box_* thresholds, sizes).
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    if kind not in DETECTORS:
        raise ValueError(f'unknown detector {kind!r}: choose one of {", ".join(DETECTORS)}')
    if num_classes < 2:
        raise ValueError(f'num_classes counts the background too: need at least 2, got {num_classes}')
    if len(anchor_sizes) != 5:
        raise ValueError(f'anchor_sizes needs one size per FPN level (5: strides 4-64), got {list(anchor_sizes)}')
    if len(image_mean) != in_chans or len(image_std) != in_chans:
        raise ValueError(f'image_mean / image_std need {in_chans} values (in_chans), got {list(image_mean)} / '
                         f'{list(image_std)}')
    backbone = build_backbone(backbone_name, fpn_channels=fpn_channels, pretrained=pretrained,
                              checkpoint_path=checkpoint_path, in_chans=in_chans, extra_pool=True,
                              model_kwargs=model_kwargs)
    levels = ['0', '1', '2', '3']  # RoIAlign from the strides 4-32 maps, as torchvision's FPN detectors
    common: Dict[str, Any] = dict(
        min_size=image_size, max_size=max_image_size or image_size,
        image_mean=list(image_mean), image_std=list(image_std),
        rpn_anchor_generator=AnchorGenerator(tuple((int(s),) for s in anchor_sizes),
                                             (tuple(float(r) for r in aspect_ratios),) * len(anchor_sizes)),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes),
    )
    common.update(detector_kwargs)
    if kind == 'faster_rcnn':
        return FasterRCNN(backbone, **common)
    return MaskRCNN(backbone,
                    mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
                    mask_head=MaskRCNNHeads(fpn_channels, (mask_head_dim,) * 4, 1),
                    mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes),
                    **common)
