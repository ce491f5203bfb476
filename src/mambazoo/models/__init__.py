"""Model families. Importing this registers every model (ours and in timm)."""
from ._builder import (CheckpointError, CheckpointMismatchError, create_model, is_model, list_models,
                       load_checkpoint, read_checkpoint, resolve_name)
from .mambavision import MambaVision

__all__ = [
    'MambaVision',
    'create_model', 'list_models', 'is_model', 'resolve_name', 'load_checkpoint', 'read_checkpoint',
    'CheckpointError', 'CheckpointMismatchError',
]
