"""Training checkpoints that are never half-written.

``save_atomic`` writes to a temporary file in the same folder, fsyncs it, renames it over the target (an atomic
operation on POSIX file systems) and fsyncs the folder: a process killed at any moment leaves either the old
checkpoint or the new one, whole.
"""
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

__all__ = ['save_atomic', 'load_training_state', 'rng_state', 'set_rng_state']


def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_training_state(path: Union[str, Path]) -> Dict[str, Any]:
    """A checkpoint written by the trainer (only tensors, numbers, strings and containers: torch's safe loader)."""
    return torch.load(path, map_location='cpu', weights_only=True)


def rng_state() -> Dict[str, Any]:
    """Generator states in types torch's safe loader accepts (the NumPy key array becomes a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'numpy': (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
