"""Every family's tiny model on a GPU: the float32 eval forward on CUDA (the Triton scan, dispatched by 'auto')
equals the CPU forward (the chunked scan), and a bf16 autocast training step runs with finite loss and gradients.

Random initialisation from a fixed seed (no weights needed), batch 2 at 224 x 224. TF32 is off (conftest.py), so
both devices compute in true float32: the forward agrees to ~1e-6 per layer, 1e-4 at the output is the bound.
"""
import pytest
import torch
import torch.nn.functional as F

import mambazoo
from test_selective_scan import assert_rel_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

FAMILIES = ('mambavision_tiny', 'vim_tiny', 'vmamba_tiny', 'mambaout_tiny', 'hybrid_tiny')
WITHOUT_SCAN = {'mambaout_tiny'}  # MambaOut is the gated-CNN control: no state space model
REL_TOL = 1e-4


def build(name, seed=0):
    torch.manual_seed(seed)
    return mambazoo.create_model(name)


def images(seed=1):
    return torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(seed))


def rel_err(got, expected):
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    return ((got - expected).norm() / expected.norm()).item()


def features_and_logits(model, x):
    features = model.forward_features(x)
    return features, model.forward_head(features)


@pytest.mark.parametrize('name', FAMILIES)
def test_eval_forward_on_cuda_equals_cpu(name, poisoned_outputs):
    model = build(name).eval()
    x = images()
    with torch.no_grad():
        features_cpu, logits_cpu = features_and_logits(model, x)
        assert poisoned_outputs['calls'] == 0  # the CPU runs the chunked scan, not the Triton kernels
        model.cuda()
        features_gpu, logits_gpu = features_and_logits(model, x.cuda())
    torch.cuda.synchronize()
    if name not in WITHOUT_SCAN:
        assert poisoned_outputs['calls'] > 0, 'the CUDA forward did not run the Triton scan'
    assert logits_cpu.std() > 0, 'degenerate logits: the comparison would be vacuous'
    for what, got, expected in (('features', features_gpu, features_cpu), ('logits', logits_gpu, logits_cpu)):
        assert got.is_cuda and got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.isfinite(got).all(), f'{name} {what}: non-finite values on CUDA'
        err = rel_err(got, expected)
        assert err <= REL_TOL, f'{name} {what}: ||cuda - cpu|| / ||cpu|| = {err:.3g} > {REL_TOL:g}'
        assert_rel_close(got.cpu(), expected, 10 * REL_TOL, f'{name} {what}')  # no single element far off


@pytest.mark.parametrize('name', FAMILIES)
def test_bf16_autocast_training_step(name, poisoned_outputs):
    model = build(name).cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = images(seed=2).cuda()
    target = torch.randint(0, model.num_classes, (2,), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), target)
    loss.backward()
    torch.cuda.synchronize()
    if name not in WITHOUT_SCAN:
        assert poisoned_outputs['calls'] > 0, 'the CUDA training step did not run the Triton scan'
    assert torch.isfinite(loss), f'{name}: loss {loss.item()}'
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if p.grad is None]
    assert not missing, f'{name}: no gradient for {missing[:5]} ({len(missing)} parameters)'
    bad = [n for n, p in named if not torch.isfinite(p.grad).all()]
    assert not bad, f'{name}: non-finite gradients in {bad[:5]} ({len(bad)} parameters)'
    # the scan's own parameters (A_log / A_logs) learn: its backward ran
    scan_params = [(n, p) for n, p in named if 'A_log' in n]
    assert (name in WITHOUT_SCAN) or scan_params, f'{name}: no A_log parameter found'
    assert all(p.grad.abs().max() > 0 for _, p in scan_params), f'{name}: a zero A_log gradient'
    optimizer.step()
    assert all(torch.isfinite(p).all() for _, p in named), f'{name}: non-finite parameters after the step'
