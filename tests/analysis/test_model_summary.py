"""The architecture table: stages in order, every parameter and FLOP accounted for."""
import torch

import mambazoo
from helpers import TINY_MAMBAVISION
from mambazoo.analysis.flops import count_flops
from mambazoo.analysis.summary import format_summary, summarize


def _meta(name, **kwargs):
    with torch.device('meta'):
        return mambazoo.create_model(name, **kwargs)


def test_mambavision_rows_add_up():
    model = _meta('mambavision_tiny', **TINY_MAMBAVISION)
    summary = summarize(model, (3, 64, 64), name='small')
    names = [r.name for r in summary.rows]
    assert names == ['patch_embed', 'levels.0', 'levels.1', 'levels.2', 'levels.3', 'norm', 'head']
    assert [r.is_stage for r in summary.rows] == [False, True, True, True, True, False, False]
    assert summary.rows[3].block_type == '1x MambaVisionBlock(MambaVisionMixer), 1x MambaVisionBlock(Attention) ' \
                                        '+ downsample'
    # each stage ends with its downsample (stages 0-2), the last keeps its resolution
    assert [r.output_shape for r in summary.rows[1:5]] == [(1, 16, 8, 8), (1, 32, 4, 4), (1, 64, 2, 2),
                                                           (1, 64, 2, 2)]
    assert summary.output_shape == (1, 1000)
    assert sum(r.params for r in summary.rows) == summary.total_params == sum(p.numel() for p in model.parameters())
    assert summary.total_flops == count_flops(model, (3, 64, 64)).total
    assert 0 <= summary.total_flops - sum(r.flops for r in summary.rows) < 1000  # the pooling only
    table = format_summary(summary)
    assert table.splitlines()[0] == 'small, input 1x3x64x64' and '**total**' in table and 'levels.2 | 2 |' in table


def test_mambaout_rows_follow_the_forward_order():
    summary = summarize(_meta('mambaout_femto', dims=[8, 16, 24, 32], depths=[1, 2, 1, 1]), (3, 64, 64))
    assert [r.name for r in summary.rows] == ['stem', 'stages.0', 'stages.1', 'stages.2', 'stages.3', 'head']
    assert summary.rows[2].block_type == '2x GatedCNNBlock + downsample'
    assert all(r.flops > 0 for r in summary.rows if r.is_stage)


def test_head_called_through_its_children_is_still_counted():
    # VMamba's forward_head runs the classifier's parts one by one, never the container itself.
    summary = summarize(_meta('vmamba_tiny', dims=8, depths=[1, 1, 1, 1]), (3, 64, 64))
    classifier = next(r for r in summary.rows if r.name == 'classifier')
    assert classifier.output_shape == (1, 1000) and classifier.flops > 0
