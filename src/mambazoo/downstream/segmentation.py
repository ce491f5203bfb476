"""Semantic segmentation on a mambazoo backbone: an FPN with Panoptic FPN's semantic head, and mIoU.

    from mambazoo.downstream import build_segmenter, confusion_matrix, mean_iou
    model = build_segmenter('vmamba_tiny', num_classes=150)
    logits = model(images)                   # (B, num_classes, H, W), images (B, C, H, W) in [0, 1]
    scores = mean_iou(confusion_matrix(logits.argmax(1), labels, 150))

The head is the semantic branch of Panoptic FPN (Kirillov et al. 2019): every FPN level goes through 3x3
conv + GroupNorm + ReLU blocks, each followed by a 2x upsampling, until it reaches stride 4; the levels are
summed, a 1x1 convolution gives the class logits, and a bilinear upsampling brings them to the input size.
"""
import math
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import PYRAMID_STRIDES, MambaBackboneWithFPN, build_backbone

__all__ = ['FPNSegmentationHead', 'SemanticSegmenter', 'build_segmenter', 'confusion_matrix', 'mean_iou']


def _conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.GroupNorm(math.gcd(32, out_channels), out_channels), nn.ReLU(inplace=True))


class FPNSegmentationHead(nn.Module):
    """Panoptic FPN's semantic branch: FPN maps (strides 4-32) -> class logits at stride 4.

    Args:
        in_channels: FPN width.
        num_classes: classes, background included.
        channels: width of the head's convolutions (Panoptic FPN: 128).
        strides: strides of the input maps, finest first (the first is the output stride).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128,
                 strides: Sequence[int] = PYRAMID_STRIDES):
        super().__init__()
        self.output_stride = strides[0]
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            ups = int(math.log2(stride // strides[0]))  # 2x upsamplings down to the output stride
            blocks = [_conv_gn_relu(in_channels, channels)]
            for i in range(ups):
                if i > 0:
                    blocks.append(_conv_gn_relu(channels, channels))
                blocks.append(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        if len(maps) != len(self.scale_heads):
            raise ValueError(f'expected {len(self.scale_heads)} maps (one per stride), got {len(maps)}')
        out = self.scale_heads[0](maps[0])
        for head, m in zip(self.scale_heads[1:], maps[1:]):
            # An odd-sized map upsampled by 2 is one pixel short: match the finest map's size exactly.
            out = out + F.interpolate(head(m), size=out.shape[-2:], mode='bilinear', align_corners=False)
        return self.classifier(out)


class SemanticSegmenter(nn.Module):
    """Backbone + FPN + ``FPNSegmentationHead``: images in [0, 1] -> logits at the input resolution.

    Normalisation happens inside (as torchvision's detectors do it), and inputs whose sides are not multiples
    of 32 are padded for the backbone and the logits cropped back.
    """

    def __init__(self, backbone: MambaBackboneWithFPN, num_classes: int, head_channels: int = 128,
                 image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 image_std: Sequence[float] = (0.229, 0.224, 0.225), size_divisible: int = 32):
        super().__init__()
        self.backbone = backbone
        self.head = FPNSegmentationHead(backbone.out_channels, num_classes, head_channels, backbone.strides)
        self.num_classes = num_classes
        self.size_divisible = size_divisible
        self.register_buffer('image_mean', torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer('image_std', torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != self.image_mean.shape[1]:
            raise ValueError(f'expected images (B, {self.image_mean.shape[1]}, H, W), got {tuple(images.shape)}')
        H, W = images.shape[-2:]
        x = (images - self.image_mean) / self.image_std
        d = self.size_divisible
        x = F.pad(x, (0, -W % d, 0, -H % d))
        maps = list(self.backbone(x).values())[:len(self.head.scale_heads)]
        logits = self.head(maps)
        logits = F.interpolate(logits, scale_factor=self.head.output_stride, mode='bilinear', align_corners=False)
        return logits[..., :H, :W]


def build_segmenter(backbone_name: str, num_classes: int, fpn_channels: int = 256, head_channels: int = 128,
                    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                    image_std: Sequence[float] = (0.229, 0.224, 0.225), pretrained: bool = False,
                    checkpoint_path: Optional[str] = None, in_chans: int = 3,
                    model_kwargs: Optional[Dict[str, Any]] = None) -> SemanticSegmenter:
    """A semantic segmenter on mambazoo model ``backbone_name`` (``num_classes`` including the background)."""
    if num_classes < 2:
        raise ValueError(f'num_classes must be at least 2, got {num_classes}')
    if len(image_mean) != in_chans or len(image_std) != in_chans:
        raise ValueError(f'image_mean / image_std need {in_chans} values (in_chans), got {list(image_mean)} / '
                         f'{list(image_std)}')
    backbone = build_backbone(backbone_name, fpn_channels=fpn_channels, pretrained=pretrained,
                              checkpoint_path=checkpoint_path, in_chans=in_chans, extra_pool=False,
                              model_kwargs=model_kwargs)
    return SemanticSegmenter(backbone, num_classes, head_channels, image_mean, image_std)


# ---------------------------------------------------------------------------------------------------------
# Metric

def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class.

    Pixels whose target is ``ignore_index`` are left out; any other target outside [0, num_classes) is an error.
    """
    if pred.shape != target.shape:
        raise ValueError(f'prediction and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}')
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f'target classes must be in [0, {num_classes}) or {ignore_index} (ignored), found '
                         f'{target.min().item()}..{target.max().item()}')
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f'predicted classes must be in [0, {num_classes}), found {pred.min().item()}..'
                         f'{pred.max().item()}')
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes,
                                                                                           num_classes)


def mean_iou(confusion: Tensor) -> Dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU from a confusion matrix (as mmsegmentation reports them).

    IoU of class c = TP / (TP + FP + FN). A class absent from both the targets and the predictions has no IoU
    (NaN) and is left out of the mean.
    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float('nan')))
    total = confusion.sum()
    return {'miou': float(iou.nanmean()) if (union > 0).any() else float('nan'),
            'pixel_acc': float(tp.sum() / total) if total > 0 else float('nan'),
            'iou': iou.tolist()}
