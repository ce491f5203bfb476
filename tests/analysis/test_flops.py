"""FLOP counts: hand-computable layers, the papers' published tables, and meta-device counts equal to real ones."""
import pytest
import torch
from torch import nn

import mambazoo
from helpers import TINY_MAMBAVISION
from mambazoo.analysis.flops import (PUBLISHED_FLOPS, attention_flops, count_flops, count_model_flops,
                                     selective_scan_flops)


class _Attention(nn.Module):
    def forward(self, x):
        q, k, v = x[..., :4], x[..., 4:8], torch.cat([x, x[..., :2]], -1)[..., :6]
        return nn.functional.scaled_dot_product_attention(q, k, v)


def test_known_layers_count_their_multiply_adds():
    assert count_flops(nn.Linear(8, 16), inputs=torch.randn(4, 8)).total == 4 * 8 * 16
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    assert count_flops(conv, inputs=torch.randn(2, 3, 6, 6)).total == 2 * 5 * 6 * 6 * 3 * 3 * 3
    # LayerNorm with affine: 5 per element (fvcore's convention)
    assert count_flops(nn.LayerNorm(7), inputs=torch.randn(3, 7)).total == 5 * 3 * 7
    # Fused attention: the two products, (batch * heads) * L * S * (E + Ev); here S = L.
    count = count_flops(_Attention(), inputs=torch.randn(2, 3, 5, 8))
    assert attention_flops((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 6)) == 2 * 3 * 5 * 5 * (4 + 6)
    assert count.by_op == {'attention': 2 * 3 * 5 * 5 * (4 + 6)}
    assert selective_scan_flops(2, 3, 5, 4, with_d=True, with_z=True) == 9 * 2 * 5 * 3 * 4 + 2 * (2 * 3 * 5)


@pytest.mark.parametrize('name', sorted(PUBLISHED_FLOPS))
def test_published_figures(name):
    """Every published figure, counted on the meta device (each well under a second)."""
    published = PUBLISHED_FLOPS[name]
    count, params, _ = count_model_flops(name)
    ours = count.total_without(published.excludes) / 1e9
    assert published.matches(count), f'{name}: ours {ours:.3f}G vs published {published.gflops}G'
    # Within 3%, except where the paper's one decimal is coarser than that (MambaOut-femto: 1.156 prints as 1.2).
    assert abs(ours / published.gflops - 1) <= 0.03 or round(ours, 1) == published.gflops
    if name.startswith('mambavision'):
        assert count.by_op['attention'] > 0 and published.excludes == ('attention',)


@pytest.mark.parametrize('name, kwargs', [('mambavision_tiny', TINY_MAMBAVISION), ('hybrid_tiny', {})])
def test_meta_count_equals_real_count(name, kwargs):
    """The meta path must count what real tensors count, attention and scan included."""
    torch.manual_seed(0)
    real_model = mambazoo.create_model(name, **kwargs)
    real = count_flops(real_model, (3, 64, 64))
    meta, _, _ = count_model_flops(name, img_size=64, **kwargs)
    assert real.by_op == meta.by_op and real.total == meta.total
    assert real.by_op['attention'] > 0 and real.by_op['selective_scan'] > 0


def test_by_module_splits_the_total():
    model = mambazoo.create_model('mambavision_tiny', **TINY_MAMBAVISION)
    parts = ['patch_embed', 'levels.0', 'levels.1', 'levels.2', 'levels.3', 'norm', 'head']
    count = count_flops(model, (3, 64, 64), modules=parts)
    assert set(count.by_module) == set(parts)
    rest = count.total - sum(count.by_module.values())
    assert 0 <= rest <= count.by_op.get('mean', 0)  # only the pooling of the model's own forward is outside
    assert all(count.by_module[p] > 0 for p in parts)
    # the attention and the scan are attributed to the stages that run them (2 and 3)
    assert count.by_module['levels.2'] + count.by_module['levels.3'] > count.by_op['attention'] + count.by_op[
        'selective_scan']
    with pytest.raises(ValueError, match='no module named'):
        count_flops(model, (3, 64, 64), modules=['nope'])
