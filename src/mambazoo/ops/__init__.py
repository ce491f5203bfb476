"""Operators shared by the model families. Nothing here imports the models, the trainer or the CLI."""
from .scan_chunked import selective_scan_chunked
from .scan_reference import selective_scan_ref
from .selective_scan import SCAN_BACKENDS, get_scan_backend, selective_scan, set_scan_backend

__all__ = [
    'selective_scan', 'selective_scan_ref', 'selective_scan_chunked',
    'set_scan_backend', 'get_scan_backend', 'SCAN_BACKENDS',
]
