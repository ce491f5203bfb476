"""Training runs that are never lost: checkpoints never half-written, run folders never written over.

``save_atomic`` writes to a temporary file in the same folder, fsyncs it, renames it over the target (an atomic
operation on POSIX file systems) and fsyncs the folder: a process killed at any moment leaves either the old
checkpoint or the new one, whole. Temporary files a killed save left behind are removed at the next save; a save
that fails (a full disk) raises ``CheckpointSaveError`` naming the file system and its free space.

``prepare_run_dir`` runs before the first training step (the classification and the detection/segmentation
trainers both call it): a folder that holds a run is refused unless the run is resumed or ``overwrite`` is asked
for, a resume without a checkpoint is an error, and the folder must be writable with room for the checkpoints.
"""
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

__all__ = ['save_atomic', 'load_training_state', 'rng_state', 'set_rng_state', 'prepare_run_dir', 'RunDirError',
           'CheckpointSaveError', 'RUN_FILES', 'restore_training_state',
           'checked_run_dir']

# What a run writes into its folder; any of them there means the folder holds a run.
RUN_FILES = ('last.pth', 'best.pth', 'metrics.csv', 'test_metrics.json', 'curves.png', 'tensorboard')


class RunDirError(ValueError):
    """A run folder that cannot be used as asked: it holds a run, it is a file, or it cannot be written."""


class CheckpointSaveError(OSError):
    """A checkpoint that could not be written (the message names the file system and its free space)."""


def _free_space(folder: Path) -> str:
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return 'unknown free space'
    return f'{usage.free / 2**20:,.0f} MB free of {usage.total / 2**20:,.0f} MB'


def remove_stale_temporaries(folder: Path, name: str = '*') -> None:
    """Delete the temporary files that saves killed mid-write left in ``folder`` (``.NAME.*.tmp``)."""
    for tmp in folder.glob(f'.{name}.*.tmp'):
        try:
            tmp.unlink()
        except OSError:
            pass


def prepare_run_dir(out_dir: Union[str, Path], resume: Optional[str], overwrite: bool,
                    needed_bytes: int = 0) -> Optional[Path]:
    """Check the run folder before the first step; returns the checkpoint to resume from (None: a new run).

    Args:
        resume: None (a new run), 'auto' (the folder's last.pth) or a checkpoint path; a missing checkpoint is an
            error either way.
        overwrite: replace the run the folder holds (its files are deleted) instead of refusing.
        needed_bytes: free space the checkpoints need (refused when the file system has less).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f'the output {out_dir} is a file, not a folder: choose another --output')
    if resume:
        path = out_dir / 'last.pth' if resume == 'auto' else Path(resume)
        if not path.is_file():
            raise RunDirError(f'nothing to resume: no checkpoint at {path} (leave out --resume to start a new run)')
    else:
        path = None
        held = [name for name in RUN_FILES if (out_dir / name).exists()]
        if held and not overwrite:
            raise RunDirError(f'{out_dir} already holds a run ({", ".join(held)}): pass --resume to continue it, '
                              f'--overwrite to replace it, or choose another --output')
        for name in held:
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir) as probe:
            probe.write(b'0')
    except OSError as e:
        raise RunDirError(f'cannot write to the run folder {out_dir}: {e.strerror or e}') from None
    free = shutil.disk_usage(out_dir).free
    if needed_bytes and free < needed_bytes:
        raise RunDirError(f'not enough space for the checkpoints in {out_dir}: they need about '
                          f'{needed_bytes / 2**20:,.0f} MB, the file system has {_free_space(out_dir)}')
    remove_stale_temporaries(out_dir)
    return path


def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise CheckpointSaveError(f'cannot write the checkpoint {path} ({_free_space(path.parent)} on that file '
                                  f'system): {str(e).splitlines()[0] if str(e) else type(e).__name__}') from e
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


def checked_run_dir(out_dir: Union[str, Path], resume: Optional[str], overwrite: bool, needed_bytes: int,
                    is_main: bool) -> Optional[Path]:
    """``prepare_run_dir`` on the main process (the one that writes); the other processes of a torchrun job only
    learn the checkpoint to resume from."""
    if is_main:
        return prepare_run_dir(out_dir, resume, overwrite, needed_bytes)
    return (Path(out_dir) / 'last.pth' if resume == 'auto' else Path(resume)) if resume else None


def restore_training_state(source: Union[str, Path, Dict[str, Any]], state: Dict[str, Any], model, optimizer,
                           scheduler, scaler=None, ema=None) -> Dict[str, Any]:
    """Load a training checkpoint (a path, or its loaded contents) into the model, optimizer, scheduler, scaler and
    EMA, and its counters into ``state`` (the keys ``state`` has); returns the checkpoint. Both trainers resume
    through it."""
    ckpt = source if isinstance(source, dict) else load_training_state(source)
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['scheduler'])
    if ema is not None and ckpt.get('ema') is not None:
        ema.load_state_dict(ckpt['ema'])
    if scaler is not None and ckpt.get('scaler') is not None:
        scaler.load_state_dict(ckpt['scaler'])
    state.update({k: ckpt[k] for k in state if k in ckpt})
    return ckpt


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
