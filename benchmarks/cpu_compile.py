"""torch.compile on a CPU (issue "CPU speed", its optional path): eager vs compiled latency, one run, side by side.

Each model (ours through ``mambazoo.create_model``, ``timm:NAME`` through timm; random weights, eval,
inference_mode, 224x224, float32) is timed eager, then compiled with the inductor backend (``fullgraph=True`` for
ours: the scan is a registered custom op, so nothing breaks the graph) and timed again; compile time is the first
compiled call. The compiled output is checked against eager. Median of ``--repeats`` calls after one warm-up.
``tune_cpu_allocator`` as in cpu_latency.py; OpenMP's wait policy is left at libgomp's default (run it idle).

    .venv/bin/python benchmarks/cpu_compile.py [--threads 2] [--batch 1] [--repeats 7] [MODEL ...]
"""
import argparse
import os
import platform
import statistics
import time

import timm
import torch

import mambazoo

DEFAULT_MODELS = ('mambavision_tiny', 'vmamba_tiny', 'vim_tiny', 'mambaout_tiny', 'hybrid_tiny',
                  'timm:convnext_tiny', 'timm:deit_tiny_patch16_224')


def best_of_rounds_ms(fns, repeats: int, rounds: int, warmup: int = 1) -> list:
    """For each of ``fns``: the least of ``rounds`` medians of ``repeats`` calls, the functions taking turns round
    by round. On a shared VM whose speed drifts by a third within minutes, medians taken one function after the
    other compare different moments; turns and the best round compare the same ones."""
    best = [float('inf')] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], median_ms(fn, repeats, warmup))
    return best


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of fn, in ms, after ``warmup`` calls (``best_of_rounds_ms``'s rounds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('models', nargs='*', default=DEFAULT_MODELS)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mambazoo.tune_cpu_allocator()
    print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, '
          f'batch {args.batch}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}')
    print('| model | eager ms | compiled ms | speed-up | compile s | max abs diff |')
    print('|---|---|---|---|---|---|')
    x = torch.randn(args.batch, 3, 224, 224)
    for name in args.models:
        ours = not name.startswith('timm:')
        model = (mambazoo.create_model(name) if ours else timm.create_model(name[5:])).eval()
        with torch.inference_mode():
            eager = median_ms(lambda: model(x), args.repeats)
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=ours)
            start = time.perf_counter()
            compiled(x)
            compile_s = time.perf_counter() - start
            fast = median_ms(lambda: compiled(x), args.repeats)
            diff = (compiled(x) - model(x)).abs().max().item()
        print(f'| {name} | {eager:.1f} | {fast:.1f} | {eager / fast:.2f}x | {compile_s:.0f} | {diff:.1e} |',
              flush=True)


if __name__ == '__main__':
    main()
