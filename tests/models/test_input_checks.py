"""What a model says about input it cannot take (issue 18): another dtype than its weights' is a clear ValueError
(autocast, which casts, and a model converted to that dtype both work), integer images likewise, and an empty batch
gives an empty output, in inference and through a backward pass."""
import pytest
import torch

import mambazoo
from mambazoo.ops import scan_policy

SMALL = ['hybrid_nano', 'mambaout_femto', 'mambavision_nano', 'vim_nano', 'vmamba_nano']


@pytest.fixture(scope='module', params=SMALL)
def model(request):
    torch.manual_seed(0)
    return request.param, mambazoo.create_model(request.param, num_classes=10).eval()


def test_another_dtype_is_a_clear_error(model):
    name, m = model
    with torch.no_grad():
        with pytest.raises(ValueError, match=r'float32 weights but the images are torch.float64: convert the images'):
            m(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
        with pytest.raises(ValueError, match=r'expected floating-point images, got torch.uint8'):
            m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert m(torch.zeros(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 10)


def test_a_model_in_float64_takes_float64(model):
    name, m = model
    double = mambazoo.create_model(name, num_classes=10).double().eval()
    with torch.no_grad():
        assert double(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize('compiled', [True, False])
def test_an_empty_batch_gives_an_empty_output(model, compiled):
    name, m = model
    with scan_policy(compiled_cpu=compiled), torch.no_grad():
        assert m(torch.zeros(0, 3, 32, 32)).shape == (0, 10)
    trained = mambazoo.create_model(name, num_classes=10).train()
    with scan_policy(compiled_cpu=compiled):
        out = trained(torch.zeros(0, 3, 32, 32))
        out.sum().backward()
    assert out.shape == (0, 10)
