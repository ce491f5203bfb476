"""The isotropic Mamba/attention hybrid: configurations, shapes, the shared mixer, gradients, and real learning.

The learning check trains ``hybrid_tiny`` (the real configuration, at 64x64) on 16 photographs shipped with
scikit-image, one label each, and requires 100% accuracy: a model whose Mamba or attention path is broken
(no gradient, a frozen scan, a mixed-up token order) does not memorise them in the step budget.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mambazoo
from helpers import assert_every_parameter_has_a_gradient, images, model_factory, spy
from mambazoo.models import MambaHybrid
from mambazoo.ops import mamba_inner as mamba_inner_module
from mambazoo.models._blocks import Mamba
from mambazoo.models.hybrid import AttentionBlock, MambaBlock

# Exact parameter counts at the default 10 classes (224 position grid).
NUM_PARAMS = {'hybrid_tiny': 1_900_618, 'hybrid_small': 9_403_786}

# scikit-image's bundled photographs (no download): 16 different scenes, textures and documents.
PHOTOS = ('astronaut', 'brick', 'camera', 'chelsea', 'clock', 'coffee', 'coins', 'grass', 'gravel',
          'hubble_deep_field', 'immunohistochemistry', 'moon', 'page', 'retina', 'rocket', 'text')


# A narrow hybrid (2 Mamba + 2 attention blocks) for fast structural tests: tiny_model(seed=0, **overrides).
tiny_model = model_factory(MambaHybrid, dict(img_size=64, embed_dim=32, depth=4, num_heads=2, num_classes=10))


def photo_batch(size: int) -> torch.Tensor:
    """The 16 photographs, centre-cropped square, resized to ``size``, ImageNet-normalised: (16, 3, size, size)."""
    skdata = pytest.importorskip('skimage.data')
    batch = []
    for name in PHOTOS:
        img = torch.from_numpy(np.asarray(getattr(skdata, name)())).float() / 255.
        img = img[..., None].expand(*img.shape, 3) if img.dim() == 2 else img[..., :3]
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s].permute(2, 0, 1)
        batch.append(F.interpolate(img[None], size=(size, size), mode='bilinear', antialias=True)[0])
    x = torch.stack(batch)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------- configurations

@pytest.mark.parametrize('name', sorted(NUM_PARAMS))
def test_configurations(name):
    with torch.device('meta'):
        model = mambazoo.create_model(name)
    assert type(model) is MambaHybrid
    n = sum(p.numel() for p in model.parameters())
    assert n == NUM_PARAMS[name], f'{name}: {n} parameters'
    depth, dim, heads = {'hybrid_tiny': (6, 192, 6), 'hybrid_small': (8, 384, 8)}[name]
    kinds = [type(b) for b in model.blocks]
    assert kinds == [MambaBlock] * (depth // 2) + [AttentionBlock] * (depth // 2)
    assert model.num_classes == 10 and model.embed_dim == dim
    mixer = model.blocks[0].mixer
    assert type(mixer) is Mamba and not mixer.bidirectional  # the mixer shared with Vim, one direction
    assert (mixer.d_inner, mixer.d_state, mixer.d_conv, mixer.dt_rank) == (dim, 16, 4, math.ceil(dim / 16))
    assert mixer.in_proj.weight.shape == (2 * dim, dim)  # x and the gate z
    assert mixer.x_proj.weight.shape == (mixer.dt_rank + 32, dim)
    attn = model.blocks[-1].attn
    assert attn.num_heads == heads and attn.qkv.bias is not None
    assert model.blocks[-1].mlp.fc1.out_features == 4 * dim
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.patch_embed.patch_size == (16, 16)


def test_registered_everywhere():
    import timm
    assert mambazoo.list_models('hybrid*') == ['hybrid_nano', 'hybrid_small', 'hybrid_tiny']
    assert mambazoo.models.MambaHybrid is MambaHybrid
    assert timm.is_model('hybrid_tiny')
    assert mambazoo.create_model('hybrid_tiny', num_classes=1000).head.out_features == 1000
    with pytest.raises(mambazoo.CheckpointError, match='no official weights'):
        mambazoo.create_model('hybrid_tiny', pretrained=True)


@pytest.mark.parametrize('ratio, n_mamba', [(0., 0), (0.25, 1), (0.5, 2), (0.6, 2), (1., 4)])
def test_mamba_ratio(ratio, n_mamba):
    model = tiny_model(mamba_ratio=ratio)
    assert [isinstance(b, MambaBlock) for b in model.blocks] == [True] * n_mamba + [False] * (4 - n_mamba)


@pytest.mark.parametrize('kwargs', [dict(mamba_ratio=1.5), dict(num_heads=5), dict(global_pool='max')],
                         ids=['ratio', 'heads', 'pool'])
def test_bad_configuration_raises(kwargs):
    with pytest.raises(ValueError):
        tiny_model(**kwargs)


# ----------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize('size', [64, 32, 96, 224])
def test_square_inputs_any_size(size):
    model = tiny_model().eval()
    x = images(2, 3, size, size)
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
    g = size // 16
    assert tokens.shape == (2, g * g, 32)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert len(maps) == 4 and all(m.shape == (2, 32, g, g) for m in maps)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens.mean(1))


def test_position_embedding_interpolates_like_a_resampled_checkpoint(tmp_path):
    model = tiny_model().eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    path = tmp_path / 'hybrid64.pth'
    torch.save(model.state_dict(), path)
    resized = mambazoo.load_checkpoint(tiny_model(seed=5, img_size=128), path).eval()
    assert resized.pos_embed.shape == (1, 64, 32)
    x = images(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resized(x), rtol=1e-5, atol=1e-6)
        # The position embedding is used: shuffling it changes the output.
        shuffled = model.pos_embed[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))]
        model.pos_embed.copy_(shuffled)
        assert not torch.allclose(model(x), resized(x), atol=1e-4)


def test_surface():
    model = tiny_model().eval()
    x = images(2, 3, 64, 64)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    model.reset_classifier(0, global_pool='')
    with torch.no_grad():
        assert model(x).shape == (2, 16, 32)
    assert {'pos_embed', '*A_log'} <= model.no_weight_decay()
    feat = mambazoo.create_model('hybrid_tiny', embed_dim=32, num_heads=2, features_only=True, out_indices=(2, 5))
    with torch.no_grad():
        out = feat(images(1, 3, 64, 96))
    assert [o.shape for o in out] == [(1, 32, 4, 6)] * 2
    assert feat.feature_info.reduction() == [16, 16]


@pytest.mark.parametrize('shape, needle', [
    ((2, 3, 70, 64), 'divisible by the patch size 16; got (70, 64)'),
    ((2, 3, 8, 8), 'divisible by the patch size 16; got (8, 8)'),
    ((2, 1, 64, 64), 'expected images (B, 3, H, W), got shape (2, 1, 64, 64)'),
    ((3, 64, 64), 'expected images (B, 3, H, W), got shape (3, 64, 64)'),
], ids=['70x64', '8x8', '1ch', '3d'])
def test_bad_inputs_raise(shape, needle):
    model = tiny_model()
    with pytest.raises(ValueError) as info:
        model(torch.zeros(shape))
    assert needle in str(info.value)


# ------------------------------------------------------------------------------ the blocks do their work

def test_every_block_runs_its_operator(monkeypatch, set_policy):
    """Mamba blocks go through mambazoo's selective_scan (with the z gate), attention blocks through SDPA (the
    PyTorch path; float32 CPU inference runs the compiled mixer kernels instead, tested in tests/ops)."""
    set_policy(compiled_cpu=False)
    scans = spy(monkeypatch, mamba_inner_module, 'selective_scan', lambda *a, **k: k.get('z') is not None)
    sdpa = spy(monkeypatch, torch.nn.functional, 'scaled_dot_product_attention', lambda *a, **k: a[0].shape)
    model = tiny_model(mamba_ratio=0.75).eval()
    with torch.no_grad():
        model(images(2, 3, 64, 64))
    assert scans == [True] * 3
    assert sdpa == [(2, 2, 16, 16)]  # (B, heads, tokens, head_dim)


def test_mamba_block_is_causal_in_token_order():
    """A unidirectional scan: changing the last token leaves the earlier outputs of a Mamba block unchanged."""
    block = MambaBlock(32).eval()
    x = images(1, 10, 32)
    y = x.clone()
    y[:, -1] += 1.
    with torch.no_grad():
        a, b = block(x), block(y)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_gradients_flow_through_every_block():
    model = tiny_model().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = model(images(2, 3, 64, 64))
    (out * images(*out.shape, seed=3)).sum().backward()
    assert_every_parameter_has_a_gradient(model)
    for i in range(len(model.blocks)):
        assert any(n.startswith(f'blocks.{i}.') for n, _ in model.named_parameters())


def test_overfits_sixteen_real_images():
    """hybrid_tiny (1.9M params) memorises 16 different photographs with 16 labels: 100% in <= 150 steps."""
    torch.manual_seed(0)
    x = photo_batch(64)
    y = torch.arange(16)
    model = mambazoo.create_model('hybrid_tiny', num_classes=16, img_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.)
    model.eval()
    with torch.no_grad():
        start_acc = (model(x).argmax(1) == y).float().mean().item()
        start_loss = F.cross_entropy(model(x), y).item()
    assert start_acc <= 0.25
    model.train()
    for step in range(150):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 4:
            model.eval()
            with torch.no_grad():
                logits = model(x)
            model.train()
            if (logits.argmax(1) == y).all():
                break
    acc = (logits.argmax(1) == y).float().mean().item()
    assert acc == 1.0, f'accuracy {acc:.3f} after {step + 1} steps'
    assert F.cross_entropy(logits, y).item() < start_loss / 4
