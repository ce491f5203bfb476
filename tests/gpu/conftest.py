"""Shared set-up of the GPU suite (tests/gpu): everything here is skipped where ``torch.cuda.is_available()`` is False.

* tests/ops is put on ``sys.path`` so that the test files share ``tests/ops/test_selective_scan.py``'s helpers
  (``make_inputs``, ``assert_rel_close``, ``NAMES``): one definition of the inputs and of "close" for the CPU, the
  interpreter and the GPU suites. (tests/ops is a plain folder, not a package; pytest puts it on the path only while
  it collects that folder.)
* Every buffer a Triton kernel must fill is NaN-poisoned (``scan_triton._output_like`` / ``_output`` replaced),
  so an element a kernel forgets to write fails the comparison; the fixture also counts the allocations, which
  tells a test whether the Triton scan ran at all.
* TF32 is off (matmuls and cuDNN convolutions in true float32) and the scan backend is 'auto', restored afterwards.
"""
import sys
from pathlib import Path

import pytest
import torch

_OPS_TESTS = str(Path(__file__).resolve().parents[1] / 'ops')
if _OPS_TESTS not in sys.path:
    sys.path.insert(0, _OPS_TESTS)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN. Returns a dict whose 'calls' counts the poisoned buffers handed out."""
    from mambazoo.ops import scan_triton

    record = {'calls': 0}

    def poisoned(allocate):
        def allocate_poisoned(*args, **kwargs):  # whatever the allocator's signature: its buffer, NaN-filled
            record['calls'] += 1
            return allocate(*args, **kwargs).fill_(float('nan'))
        return allocate_poisoned

    for name in ('_output_like', '_output'):
        monkeypatch.setattr(scan_triton, name, poisoned(getattr(scan_triton, name)))
    return record


@pytest.fixture(autouse=True)
def true_float32():
    """No TF32 anywhere (cuDNN allows it by default): float32 on the GPU is then comparable with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _dispatch_on_auto(auto_scan_backend):
    """The dispatcher's choice is what the tests check: 'auto' whatever MAMBAZOO_SCAN says (tests/conftest.py)."""
    yield
