"""Dense tasks on mambazoo backbones: object detection (Faster / Mask R-CNN) and semantic segmentation (FPN).

The training entry point is ``mambazoo train --task detection|segmentation`` (``train_downstream``); see
docs/downstream.md.
"""
from .backbones import FeatureBackbone, MambaBackboneWithFPN, SimpleFeaturePyramid, build_backbone, is_isotropic
from .data import ComposedObjectsDataset, build_composed_datasets, collate_detection
from .detection import build_detector
from .segmentation import FPNSegmentationHead, SemanticSegmenter, build_segmenter, confusion_matrix, mean_iou

__all__ = [
    'FeatureBackbone', 'MambaBackboneWithFPN', 'SimpleFeaturePyramid', 'build_backbone', 'is_isotropic',
    'ComposedObjectsDataset', 'build_composed_datasets', 'collate_detection',
    'build_detector',
    'FPNSegmentationHead', 'SemanticSegmenter', 'build_segmenter', 'confusion_matrix', 'mean_iou',
]
