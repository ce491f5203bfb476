"""Shared test set-up: never touch the network; golden fixtures live in ../shared/fixtures."""
import os
from pathlib import Path

import pytest

os.environ['HF_HUB_OFFLINE'] = '1'  # before anything imports huggingface_hub

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable must be set
    # before the kernels are defined (mambazoo imports them at their first use).
    os.environ.setdefault('TRITON_INTERPRET', '1')

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures'


@pytest.fixture(scope='session')
def shared_fixtures() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f'golden fixtures not found at {SHARED_FIXTURES} (../shared beside the project)')
    return SHARED_FIXTURES


@pytest.fixture
def set_policy(monkeypatch):
    """``set_policy(field=value, ...)`` changes the ops' policy (``mambazoo.ops.ScanPolicy``) for one test, restored
    after it (the policy reads the environment once, at import: monkeypatch.setenv would not reach it)."""
    import dataclasses

    from mambazoo.ops import policy

    def apply(**changes):
        monkeypatch.setattr(policy, '_policy', dataclasses.replace(policy.get_scan_policy(), **changes))
    return apply
