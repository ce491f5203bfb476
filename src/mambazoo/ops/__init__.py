"""Operators shared by the model families. Nothing here imports the models, the trainer or the CLI.

Every fused op picks its implementation in one place, ``policy.choose_implementation``, under one ``ScanPolicy``."""
from .cross_scan import (cross_merge, cross_merge_ref, cross_merge_time_major, cross_scan, cross_scan_index,
                         cross_scan_ref, cross_scan_time_major, cross_selective_scan)
from .mamba_inner import mamba_inner_conv, mamba_inner_conv_ref, mamba_inner_scan, mamba_inner_scan_ref
from .policy import (ScanPolicy, choose_implementation, get_scan_policy, policy_from_environment, scan_policy,
                     set_scan_policy)
from .scan_chunked import selective_scan_chunked
from .scan_numba import selective_scan_compiled
from .scan_reference import selective_scan_ref
from .scan_triton import cross_selective_scan_triton, selective_scan_triton
from .selective_scan import (SCAN_BACKENDS, get_scan_backend, register_scan_backend, resolve_scan_backend,
                             selective_scan, set_scan_backend)

__all__ = [
    'selective_scan', 'selective_scan_ref', 'selective_scan_chunked', 'selective_scan_compiled', 'selective_scan_triton',
    'mamba_inner_conv', 'mamba_inner_scan', 'mamba_inner_conv_ref', 'mamba_inner_scan_ref',
    'ScanPolicy', 'get_scan_policy', 'set_scan_policy', 'scan_policy', 'policy_from_environment',
    'choose_implementation',
    'set_scan_backend', 'get_scan_backend', 'resolve_scan_backend', 'register_scan_backend', 'SCAN_BACKENDS',
    'cross_scan', 'cross_merge', 'cross_scan_index', 'cross_scan_ref', 'cross_merge_ref',
    'cross_scan_time_major', 'cross_merge_time_major', 'cross_selective_scan', 'cross_selective_scan_triton',
]
