"""Operators shared by the model families. Nothing here imports the models, the trainer or the CLI."""
from .cross_scan import (cross_merge, cross_merge_ref, cross_merge_time_major, cross_scan, cross_scan_index,
                         cross_scan_ref, cross_scan_time_major, cross_selective_scan)
from .scan_chunked import selective_scan_chunked
from .scan_reference import selective_scan_ref
from .scan_triton import cross_selective_scan_triton, selective_scan_triton
from .selective_scan import SCAN_BACKENDS, get_scan_backend, resolve_scan_backend, selective_scan, set_scan_backend

__all__ = [
    'selective_scan', 'selective_scan_ref', 'selective_scan_chunked', 'selective_scan_triton',
    'set_scan_backend', 'get_scan_backend', 'resolve_scan_backend', 'SCAN_BACKENDS',
    'cross_scan', 'cross_merge', 'cross_scan_index', 'cross_scan_ref', 'cross_merge_ref',
    'cross_scan_time_major', 'cross_merge_time_major', 'cross_selective_scan', 'cross_selective_scan_triton',
]
