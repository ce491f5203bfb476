"""torchvision's Faster / Mask R-CNN on our backbones: losses and gradients in training, predictions in eval."""
import pytest
import torch

from mambazoo.downstream import build_composed_datasets, build_detector, collate_detection

SMALL = dict(dim=16, in_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2], window_size=[8, 8, 4, 2])
HEADS = dict(image_size=64, fpn_channels=16, anchor_sizes=(8, 16, 32, 64, 128), box_head_dim=32, mask_head_dim=8,
             rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, box_batch_size_per_image=32)


@pytest.fixture(scope='module')
def batch():
    train, _, _ = build_composed_datasets('digits', train_size=2, val_size=1, canvas_size=64, item_size=(16, 32))
    return collate_detection([train[0], train[1]])


@pytest.mark.parametrize('kind, backbone, kwargs', [
    ('faster_rcnn', 'mambavision_tiny', SMALL),
    ('mask_rcnn', 'mambavision_tiny', SMALL),
    ('faster_rcnn', 'vim_tiny', dict(embed_dim=32, depth=2)),   # through the simple feature pyramid
])
def test_train_and_eval_modes(batch, kind, backbone, kwargs):
    torch.manual_seed(0)
    model = build_detector(backbone, num_classes=11, kind=kind, model_kwargs=kwargs, **HEADS)
    images, targets = batch
    keys = ('boxes', 'labels', 'masks') if kind == 'mask_rcnn' else ('boxes', 'labels')
    model.train()
    losses = model(images, [{k: t[k] for k in keys} for t in targets])
    expected = {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert set(losses) == expected | ({'loss_mask'} if kind == 'mask_rcnn' else set())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    first = next(model.backbone.features.body.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0, 'gradients reach the first backbone layer'

    model.eval()
    with torch.no_grad():
        predictions = model(images)
    assert len(predictions) == 2
    for p in predictions:
        n = len(p['boxes'])
        assert p['boxes'].shape == (n, 4) and p['scores'].shape == (n,) and p['labels'].shape == (n,)
        assert n == 0 or ((p['labels'] >= 1) & (p['labels'] <= 10)).all()
        assert n == 0 or ((p['boxes'] >= 0) & (p['boxes'] <= 64)).all()
        if kind == 'mask_rcnn':
            assert p['masks'].shape == (n, 1, 64, 64)


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match='unknown detector'):
        build_detector('mambavision_tiny', 11, kind='yolo', model_kwargs=SMALL)
    with pytest.raises(ValueError, match='one size per FPN level'):
        build_detector('mambavision_tiny', 11, anchor_sizes=(16, 32), model_kwargs=SMALL)
    with pytest.raises(ValueError, match='background'):
        build_detector('mambavision_tiny', 1, model_kwargs=SMALL)
    with pytest.raises(ValueError, match='in_chans'):
        build_detector('mambavision_tiny', 11, in_chans=1, model_kwargs=SMALL)
