"""Analysis tools over the models: FLOPs (more to come: throughput, effective receptive fields, activation maps)."""
from .flops import FlopCount, count_flops, selective_scan_flops

__all__ = ['FlopCount', 'count_flops', 'selective_scan_flops']
