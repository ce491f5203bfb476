"""The FPN semantic segmenter's output shape, and mIoU against hand-computed and torchmetrics' figures."""
import math

import pytest
import torch

from mambazoo.downstream import FPNSegmentationHead, build_segmenter, confusion_matrix, mean_iou

SMALL = dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1])


@pytest.mark.parametrize('height, width', [(64, 64), (64, 80), (50, 70)])
def test_segmenter_gives_logits_at_input_size(height, width):
    model = build_segmenter('mambaout_femto', num_classes=5, fpn_channels=16, head_channels=16,
                            model_kwargs=SMALL)
    logits = model(torch.rand(2, 3, height, width))
    assert logits.shape == (2, 5, height, width)
    logits.mean().backward()
    assert next(model.backbone.parameters()).grad is not None


def test_head_upsamples_every_level_to_stride_4():
    head = FPNSegmentationHead(8, num_classes=3, channels=8)
    # Panoptic FPN: stride 4 -> one conv; 8 -> conv + up; 16 -> 2 x (conv + up); 32 -> 3 x (conv + up).
    assert [sum(isinstance(m, torch.nn.Upsample) for m in h) for h in head.scale_heads] == [0, 1, 2, 3]
    out = head([torch.randn(1, 8, 16 // 2 ** i, 16 // 2 ** i) for i in range(4)])
    assert out.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match='one per stride'):
        head([torch.randn(1, 8, 16, 16)])


def test_mean_iou_on_a_hand_computed_case():
    pred = torch.tensor([[0, 0, 1], [1, 2, 2], [3, 3, 1]])
    target = torch.tensor([[0, 1, 1], [1, 2, 0], [255, 255, 255]])  # last row ignored
    conf = confusion_matrix(pred, target, num_classes=4)
    # (true, predicted) pairs: (0,0) (1,0) (1,1) (1,1) (2,2) (0,2)
    assert conf.tolist() == [[1, 0, 1, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    scores = mean_iou(conf)
    # IoU = TP / (TP + FP + FN): class 0: 1 / (1 + 1 + 1); class 1: 2 / (2 + 0 + 1); class 2: 1 / (1 + 1 + 0);
    # class 3 never occurs (its predictions sit on ignored pixels): no IoU, left out of the mean.
    assert scores['iou'][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(scores['iou'][3])
    assert scores['miou'] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores['pixel_acc'] == pytest.approx(4 / 6)


def test_mean_iou_agrees_with_torchmetrics():
    pytest.importorskip('torchmetrics')
    from torchmetrics.classification import MulticlassJaccardIndex
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (4, 20, 20), generator=g)
    pred = torch.where(torch.rand(4, 20, 20, generator=g) < 0.6, target, torch.randint(0, 6, (4, 20, 20), generator=g))
    reference = MulticlassJaccardIndex(num_classes=6, average='macro')(pred, target)
    assert mean_iou(confusion_matrix(pred, target, 6))['miou'] == pytest.approx(reference.item(), abs=1e-6)


def test_bad_labels_are_reported():
    with pytest.raises(ValueError, match='target classes'):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), num_classes=3)
    with pytest.raises(ValueError, match='predicted classes'):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), num_classes=3)
    with pytest.raises(ValueError, match='shapes differ'):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(4), num_classes=3)
