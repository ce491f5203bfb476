"""Analysis tools over the models: FLOPs, speed and memory benchmarks, architecture summaries, effective receptive
fields, activation maps, and the headless plots that draw them (the ``mambazoo`` commands ``flops``, ``benchmark``,
``summary``, ``analyze erf|activations`` and ``show-data`` are thin layers over these)."""
from .activations import activation_maps, load_images, overlay_heatmap, save_activation_figure
from .benchmark import BenchmarkResult, benchmark_model, format_benchmark_table, run_benchmark
from .erf import compute_erf, erf_heatmap, high_contribution_area_ratio, save_erf_png
from .flops import PUBLISHED_FLOPS, FlopCount, count_flops, count_model_flops, selective_scan_flops
from .summary import format_summary, summarize

__all__ = [
    'FlopCount', 'count_flops', 'count_model_flops', 'selective_scan_flops', 'PUBLISHED_FLOPS',
    'BenchmarkResult', 'benchmark_model', 'run_benchmark', 'format_benchmark_table',
    'compute_erf', 'erf_heatmap', 'high_contribution_area_ratio', 'save_erf_png',
    'activation_maps', 'overlay_heatmap', 'load_images', 'save_activation_figure',
    'summarize', 'format_summary',
]
