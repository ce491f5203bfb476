"""Model families. Importing this registers every model (ours and in timm)."""
from ._builder import (CheckpointError, CheckpointMismatchError, create_any_model, create_model, get_pretrained_cfg,
                       is_model, list_models, load_checkpoint, read_checkpoint, resolve_name)
from .mambavision import MambaVision
from .vmamba import VSSM
from .mambaout import MambaOut
from .vim import VisionMamba
from .hybrid import MambaHybrid
from .model_file import load_model, read_model_record

__all__ = [
    'MambaVision',
    'VSSM',
    'MambaOut',
    'VisionMamba',
    'MambaHybrid',
    'create_model', 'create_any_model', 'get_pretrained_cfg', 'list_models', 'is_model', 'resolve_name',
    'load_checkpoint', 'read_checkpoint', 'CheckpointError', 'CheckpointMismatchError', 'load_model', 'read_model_record',
]
