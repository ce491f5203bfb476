"""Cross scan / cross merge: the fast ops against explicit index permutations, adjointness, and gradients.

The four directions are written out here by hand (nested loops over the grid), independently of
``cross_scan_index``; the reference functions built on that index are then checked against the fast ops.
"""
import pytest
import torch

from mambazoo.ops import (cross_merge, cross_merge_ref, cross_merge_time_major, cross_scan, cross_scan_index,
                          cross_scan_ref, cross_scan_time_major)

SHAPES = [(1, 1, 1, 1), (2, 3, 4, 4), (2, 3, 4, 5), (1, 2, 5, 3), (2, 1, 1, 7), (1, 2, 6, 1), (2, 5, 7, 9)]


def shape_id(shape):
    return 'x'.join(map(str, shape))


def explicit_orders(height: int, width: int):
    """The four traversals as lists of (h, w), written out loop by loop."""
    row = [(h, w) for h in range(height) for w in range(width)]
    col = [(h, w) for w in range(width) for h in range(height)]
    return [row, col, row[::-1], col[::-1]]


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize('hw', [(1, 1), (3, 3), (2, 5), (5, 2), (4, 7)], ids=lambda hw: f'{hw[0]}x{hw[1]}')
def test_index_is_the_explicit_permutations(hw):
    H, W = hw
    index = cross_scan_index(H, W)
    assert index.shape == (4, H * W) and index.dtype == torch.long
    for k, order in enumerate(explicit_orders(H, W)):
        assert index[k].tolist() == [h * W + w for h, w in order], f'direction {k}'
        assert sorted(index[k].tolist()) == list(range(H * W)), f'direction {k} is not a permutation'


@pytest.mark.parametrize('shape', SHAPES, ids=shape_id)
def test_cross_scan_reads_the_map_in_the_four_orders(shape):
    B, C, H, W = shape
    x = randn(*shape)
    xs = cross_scan(x)
    assert xs.shape == (B, 4, C, H * W) and xs.is_contiguous()
    for k, order in enumerate(explicit_orders(H, W)):
        want = torch.stack([x[:, :, h, w] for h, w in order], dim=-1)
        assert torch.equal(xs[:, k], want), f'direction {k}'
    assert torch.equal(xs, cross_scan_ref(x))


@pytest.mark.parametrize('shape', SHAPES, ids=shape_id)
def test_cross_merge_puts_tokens_back_and_sums(shape):
    B, C, H, W = shape
    ys = randn(B, 4, C, H * W, seed=1)
    got = cross_merge(ys, H, W)
    assert got.shape == (B, C, H, W)
    want = torch.zeros(B, C, H, W, dtype=ys.dtype)
    for k, order in enumerate(explicit_orders(H, W)):
        for l, (h, w) in enumerate(order):
            want[:, :, h, w] += ys[:, k, :, l]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cross_merge_ref(ys, H, W), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('shape', SHAPES, ids=shape_id)
def test_merge_is_the_adjoint_of_scan(shape):
    B, C, H, W = shape
    x, ys = randn(*shape, seed=2), randn(B, 4, C, H * W, seed=3)
    lhs = (cross_scan(x) * ys).sum()
    rhs = (x * cross_merge(ys, H, W)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cross_merge(cross_scan(x), H, W), 4 * x, rtol=0, atol=0)


@pytest.mark.parametrize('shape', [(2, 3, 4, 5), (1, 2, 3, 3), (1, 1, 1, 4)], ids=shape_id)
def test_gradcheck(shape):
    B, C, H, W = shape
    x = randn(*shape, seed=4).requires_grad_()
    ys = randn(B, 4, C, H * W, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(cross_scan, (x,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, H, W), (ys,))


@pytest.mark.parametrize('shape', [(2, 3, 4, 5), (2, 2, 6, 3)], ids=shape_id)
def test_gradients_equal_the_reference(shape):
    """Backward of the fast ops == autograd through the gather / scatter-add definitions."""
    B, C, H, W = shape
    up_scan, up_merge = randn(B, 4, C, H * W, seed=6), randn(B, C, H, W, seed=7)
    grads = []
    for scan, merge in ((cross_scan, cross_merge), (cross_scan_ref, cross_merge_ref)):
        x = randn(*shape, seed=8).requires_grad_()
        ys = randn(B, 4, C, H * W, seed=9).requires_grad_()
        ((scan(x) * up_scan).sum() + (merge(ys, H, W) * up_merge).sum()).backward()
        grads.append((x.grad, ys.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    x = randn(2, 5, 3, 4).permute(0, 1, 3, 2)  # (2, 5, 4, 3), transposed strides
    assert not x.is_contiguous()
    assert torch.equal(cross_scan(x), cross_scan_ref(x.contiguous()))
    x_cl = randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert torch.equal(cross_scan(x_cl), cross_scan_ref(x_cl.contiguous()))
    ys = randn(2, 3, 4, 12).transpose(1, 2)  # (2, 4, 3, 12), non-contiguous
    torch.testing.assert_close(cross_merge(ys, 3, 4), cross_merge_ref(ys.contiguous(), 3, 4), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_is_kept(dtype):
    x = randn(1, 2, 3, 4, dtype=dtype)
    xs = cross_scan(x)
    assert xs.dtype == dtype and torch.equal(xs, cross_scan_ref(x))
    assert cross_merge(xs, 3, 4).dtype == dtype


@pytest.mark.parametrize('call, shape, needle', [
    (lambda t: cross_scan(t), (2, 3, 4), 'cross_scan expects a map (B, C, H, W)'),
    (lambda t: cross_merge(t, 3, 4), (2, 3, 2, 12), 'cross_merge expects (B, 4, C, H*W)'),
    (lambda t: cross_merge(t, 3, 4), (2, 4, 2, 11), 'for a 3x4 map'),
    (lambda t: cross_merge(t, 3, 4), (4, 2, 12), 'cross_merge expects'),
], ids=['scan-3d', 'merge-3-directions', 'merge-wrong-length', 'merge-3d'])
def test_bad_shapes_raise(call, shape, needle):
    with pytest.raises(ValueError) as info:
        call(torch.zeros(shape))
    assert needle in str(info.value) and str(tuple(shape)) in str(info.value)


# ------------------------------------------------------------------ time-major variants (channels-last maps)

@pytest.mark.parametrize('shape', [(1, 3, 4, 5), (2, 5, 3, 7), (3, 2, 1, 1)])
def test_time_major_scan_is_the_reference_transposed(shape):
    x = torch.randn(shape, dtype=torch.float64)  # (B, C, H, W)
    got = cross_scan_time_major(x.permute(0, 2, 3, 1))  # from (B, H, W, C)
    assert got.is_contiguous() and got.shape == (shape[2] * shape[3], shape[0], 4, shape[1])
    torch.testing.assert_close(got, cross_scan_ref(x).permute(3, 0, 1, 2), rtol=0, atol=0)


@pytest.mark.parametrize('shape', [(1, 3, 4, 5), (2, 5, 3, 7)])
def test_time_major_scan_of_per_direction_input_takes_each_direction_its_slice(shape):
    B, C, H, W = shape
    x = torch.randn(B, H, W, 4, C, dtype=torch.float64)
    got = cross_scan_time_major(x)
    for k in range(4):
        expected = cross_scan_ref(x[..., k, :].permute(0, 3, 1, 2))[:, k]  # (B, C, L)
        torch.testing.assert_close(got[:, :, k], expected.permute(2, 0, 1), rtol=0, atol=0)


@pytest.mark.parametrize('shape', [(1, 3, 4, 5), (2, 5, 3, 7)])
def test_time_major_merge_is_the_reference_and_the_adjoint(shape):
    B, C, H, W = shape
    ys = torch.randn(H * W, B, 4, C, dtype=torch.float64)
    got = cross_merge_time_major(ys, H, W)
    assert got.shape == (B, H, W, C)
    torch.testing.assert_close(got, cross_merge_ref(ys.permute(1, 2, 3, 0), H, W).permute(0, 2, 3, 1),
                               rtol=1e-12, atol=1e-12)
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    # <scan(x), ys> == <x, merge(ys)>
    torch.testing.assert_close((cross_scan_time_major(x) * ys).sum(), (x * got).sum(), rtol=1e-12, atol=0)


def test_time_major_gradcheck():
    x = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cross_scan_time_major, (x,))
    ys = torch.randn(6, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cross_merge_time_major(t, 2, 3), (ys,))


def test_time_major_bad_shapes_raise():
    with pytest.raises(ValueError, match='cross_scan_time_major'):
        cross_scan_time_major(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match='cross_merge_time_major'):
        cross_merge_time_major(torch.zeros(5, 1, 4, 2), 2, 3)
