"""mambazoo: Mamba-family vision backbones behind one API, on a pure-PyTorch selective scan.

    import mambazoo
    model = mambazoo.create_model('mambavision_tiny', checkpoint_path='mambavision_tiny_1k.pth.tar')
    model = mambazoo.load_model('runs/main/best.pth')   # a model trained by `mambazoo train`, from its file alone
"""
from .models import (CheckpointError, CheckpointMismatchError, create_model, get_pretrained_cfg, is_model,
                     list_models, load_checkpoint, load_model, read_checkpoint)
from .ops import selective_scan
from .runtime import optimize_for_cpu, tune_cpu_allocator

__version__ = '0.1.0'

__all__ = [
    'create_model', 'load_model', 'get_pretrained_cfg', 'list_models', 'is_model', 'load_checkpoint', 'read_checkpoint',
    'selective_scan', 'tune_cpu_allocator', 'optimize_for_cpu',
    'CheckpointError', 'CheckpointMismatchError', '__version__',
]
