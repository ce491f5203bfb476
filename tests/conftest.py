"""Shared test set-up: never touch the network; the fixtures shared by the test files.

Plain helpers (rel_err, images, perturb, golden-fixture loading through require_fixture ...) are in tests/helpers.py,
imported as ``from helpers import ...``: this file puts tests/ on sys.path for that, whatever pytest's import mode.
"""
import os
import sys
from pathlib import Path

import pytest

os.environ['HF_HUB_OFFLINE'] = '1'  # before anything imports huggingface_hub

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable must be set
    # before the kernels are defined (mambazoo imports them at their first use).
    os.environ.setdefault('TRITON_INTERPRET', '1')

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture
def set_policy(monkeypatch):
    """``set_policy(field=value, ...)`` changes the ops' policy (``mambazoo.ops.ScanPolicy``) for one test, restored
    after it (the policy reads the environment once, at import: monkeypatch.setenv would not reach it)."""
    import dataclasses

    from mambazoo.ops import policy

    def apply(**changes):
        monkeypatch.setattr(policy, '_policy', dataclasses.replace(policy.get_scan_policy(), **changes))
    return apply


@pytest.fixture
def auto_scan_backend():
    """The scan backend 'auto' (the dispatcher's own choice) whatever MAMBAZOO_SCAN says, restored afterwards."""
    from mambazoo.ops import get_scan_backend, set_scan_backend

    previous = get_scan_backend()
    set_scan_backend('auto')
    try:
        yield
    finally:
        set_scan_backend(previous)


class _RefuseDownload:
    """Stands in for a download function: records the call and fails the test."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        raise AssertionError(f'network download attempted: {args} {kwargs}')


@pytest.fixture
def no_downloads(monkeypatch, tmp_path):
    """No download and no user cache: HF_HUB_OFFLINE, empty Hugging Face and torch-hub caches in tmp_path, and both
    download functions replaced by a guard (yielded: its ``calls``), which must stay unused."""
    import huggingface_hub
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    # huggingface_hub reads these at import time, so the environment alone would not reach it.
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    hf_cache = tmp_path / 'default_hf_cache'
    hf_cache.mkdir()
    monkeypatch.setenv('HF_HUB_CACHE', str(hf_cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(hf_cache))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    guard = _RefuseDownload()
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', guard)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', guard)
    yield guard
    assert not guard.calls, 'a test tried to download'
