"""Analysis tools over the models: FLOPs, speed and memory benchmarks, the machine's measured limits (roofline),
architecture summaries, effective receptive fields, activation maps, and the headless plots that draw them (the
``mambazoo`` commands ``flops``, ``benchmark``, ``summary``, ``analyze erf|activations`` and ``show-data`` are thin
layers over these)."""
from .activations import activation_maps, load_images, overlay_heatmap, save_activation_figure
from .benchmark import BenchmarkResult, benchmark_model, format_benchmark_table, measure_training_step, run_benchmark
from .erf import compute_erf, erf_heatmap, high_contribution_area_ratio, save_erf_png
from .flops import PUBLISHED_FLOPS, FlopCount, count_flops, count_model_flops, selective_scan_flops
from .roofline import MachineLimits, measure_machine_limits
from .summary import format_summary, summarize

__all__ = [
    'FlopCount', 'count_flops', 'count_model_flops', 'selective_scan_flops', 'PUBLISHED_FLOPS',
    'BenchmarkResult', 'benchmark_model', 'measure_training_step', 'run_benchmark', 'format_benchmark_table',
    'MachineLimits', 'measure_machine_limits',
    'compute_erf', 'erf_heatmap', 'high_contribution_area_ratio', 'save_erf_png',
    'activation_maps', 'overlay_heatmap', 'load_images', 'save_activation_figure',
    'summarize', 'format_summary',
]
