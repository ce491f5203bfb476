"""Fixtures of the op tests."""
import dataclasses

import pytest

from mambazoo.ops import policy


@pytest.fixture
def set_policy(monkeypatch):
    """``set_policy(field=value, ...)`` changes the ops' policy for one test (restored after it)."""
    def apply(**changes):
        monkeypatch.setattr(policy, '_policy', dataclasses.replace(policy.get_scan_policy(), **changes))
    return apply
