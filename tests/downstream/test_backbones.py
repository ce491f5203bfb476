"""Every family as a detection / segmentation backbone: maps at strides 4-32 with the right channels, and the
FPN on top (torchvision's backbone contract: ``out_channels`` and an OrderedDict of maps)."""
import pytest
import torch

import mambazoo
from mambazoo.downstream import FeatureBackbone, SimpleFeaturePyramid, build_backbone, is_isotropic

# Tiny configurations of every family (64 px inputs: MambaVision's windows cover its 4x4 / 2x2 maps).
TINY = {
    'mambavision_tiny': dict(dim=16, in_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2], window_size=[8, 8, 4, 2]),
    'vmamba_tiny': dict(dims=16, depths=[1, 1, 1, 1]),
    'mambaout_femto': dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    'vim_tiny': dict(embed_dim=32, depth=2),
    'hybrid_tiny': dict(embed_dim=32, depth=2, num_heads=2),
}
SIZE = 64


@pytest.mark.parametrize('name', sorted(TINY))
def test_feature_backbone_strides_and_channels(name):
    torch.manual_seed(0)
    features = FeatureBackbone(name, **TINY[name]).eval()
    with torch.no_grad():
        maps = features(torch.randn(2, 3, SIZE, SIZE))
    assert [tuple(m.shape[-2:]) for m in maps] == [(SIZE // s, SIZE // s) for s in (4, 8, 16, 32)]
    assert [m.shape[1] for m in maps] == features.out_channels
    assert all(m.shape[0] == 2 and torch.isfinite(m).all() for m in maps)
    if is_isotropic(name):
        # ViTDet's pyramid: each upsampling halves the width of the stride-16 map; pooling keeps it.
        dim = TINY[name]['embed_dim']
        assert features.out_channels == [dim // 4, dim // 2, dim, dim]
    else:
        # The stage widths timm's features API reports for the model itself.
        reference = mambazoo.create_model(name, features_only=True, **TINY[name])
        assert features.out_channels == reference.feature_info.channels()
        assert reference.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize('name', ['mambaout_femto', 'hybrid_tiny'])
def test_backbone_with_fpn_is_torchvision_shaped(name):
    backbone = build_backbone(name, fpn_channels=24, model_kwargs=TINY[name]).eval()
    assert backbone.out_channels == 24
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, SIZE, SIZE))
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [tuple(v.shape) for v in out.values()] == [(1, 24, SIZE // s, SIZE // s) for s in (4, 8, 16, 32, 64)]


@pytest.mark.parametrize('in_stride, grid', [(16, 4), (8, 8)])
def test_simple_feature_pyramid_scales(in_stride, grid):
    """From a map at stride 16 (Vim) or 8 (Vim's stride-8 variants) to strides 4, 8, 16, 32 of a 64 px image."""
    pyramid = SimpleFeaturePyramid(32, in_stride)
    maps = pyramid(torch.randn(1, 32, grid, grid))
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert [m.shape[1] for m in maps] == pyramid.out_channels
    identity = pyramid.strides.index(in_stride)
    assert len(pyramid.levels[identity]) == 0  # the input stride passes through untouched
    with pytest.raises(ValueError, match='powers of two'):
        SimpleFeaturePyramid(32, 16, strides=(4, 12))


def test_isotropic_families_by_name_and_alias():
    assert is_isotropic('vim_tiny') and is_isotropic('hybrid_small')
    assert not is_isotropic('mambavision_tiny') and not is_isotropic('vmamba_tiny')
    assert is_isotropic('vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2')
    with pytest.raises(ValueError, match='Unknown model'):
        is_isotropic('not_a_model')
    with pytest.raises(ValueError, match='fpn_channels'):
        build_backbone('mambaout_femto', fpn_channels=0, model_kwargs=TINY['mambaout_femto'])
