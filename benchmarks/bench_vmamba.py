"""VMamba benchmark, CPU: VMamba-T throughput vs timm's Swin-T, and batch-1 latency vs timm's ConvNeXt-T.

Everything is measured side by side in one run, the two models of a row alternating repeat by repeat (so that
a noisy neighbour slows both alike); the table reports medians and ratios against the baseline of the same run.
Random weights, eval mode, no grad, float32, 224x224.

    .venv/bin/python benchmarks/bench_vmamba.py [--threads 2] [--repeats 7] [--batch 8]

Target of a later issue: VMamba-T batch-1 latency <= 1.5x convnext_tiny.
"""
import argparse
import os
import platform
import statistics
import time
from typing import Callable, List, Tuple

import timm
import torch

import mambazoo


def paired_medians(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int,
                   warmup: int = 2) -> Tuple[float, float]:
    """Median wall time of each of two callables, run alternately."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a: List[float] = []
    times_b: List[float] = []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--batch', type=int, default=8, help='batch for the throughput row')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, '
          f'timm {timm.__version__}, {torch.get_num_threads()} threads, float32, 224x224, '
          f'median of {args.repeats} (alternating)')

    torch.manual_seed(0)
    ours = mambazoo.create_model('vmamba_tiny').eval()
    swin = timm.create_model('swin_tiny_patch4_window7_224').eval()
    convnext = timm.create_model('convnext_tiny').eval()
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        x = torch.randn(args.batch, 3, 224, 224, generator=gen)
        t_base, t_ours = paired_medians(lambda: swin(x), lambda: ours(x), args.repeats)
        rows.append((f'throughput, batch {args.batch}', 'swin_tiny_patch4_window7_224', t_base, t_ours,
                     args.batch))
        x = torch.randn(1, 3, 224, 224, generator=gen)
        t_base, t_ours = paired_medians(lambda: convnext(x), lambda: ours(x), args.repeats)
        rows.append(('latency, batch 1', 'convnext_tiny', t_base, t_ours, 1))

    print('| measurement | baseline model | baseline | vmamba_tiny | time ratio (ours / baseline) | '
          'speed ratio (ours / baseline) |')
    print('|---|---|---|---|---|---|')
    for what, name, tb, to, batch in rows:
        if batch > 1:
            base_s, ours_s = f'{batch / tb:.1f} img/s', f'{batch / to:.1f} img/s'
        else:
            base_s, ours_s = f'{tb * 1e3:.1f} ms', f'{to * 1e3:.1f} ms'
        print(f'| {what} | {name} | {base_s} | {ours_s} | {to / tb:.2f} | {tb / to:.2f}x |')


if __name__ == '__main__':
    main()
