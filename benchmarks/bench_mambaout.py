"""MambaOut benchmark, CPU: our mambaout_femto / mambaout_tiny against timm's, on the same weights.

timm's model is built with its own initialisation; ours loads timm's state dict as it is (both build timm's module
layout), and the two outputs are checked to agree before anything is timed. Batch-1 latency at 224x224, float32,
measured in one run with the two models interleaved (timm, ours, ours, timm, ...) so that load from other processes
hits both alike; the table reports medians of wall and of CPU time and their ratios. Target: ours / timm <= 1.05.

    .venv/bin/python benchmarks/bench_mambaout.py [--threads 2] [--repeats 30] [--models mambaout_femto ...]
"""
import argparse
import os
import platform
import statistics
import time

import timm
import torch

import mambazoo

TARGET = 1.05


def interleaved_medians(fn_a, fn_b, repeats: int, warmup: int = 3):
    """Median wall time and median CPU time (all threads of this process) of each function, interleaved.

    CPU time is the steadier of the two on a shared machine: time spent waiting for a core does not count.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    wall = {fn_a: [], fn_b: []}
    cpu = {fn_a: [], fn_b: []}
    for i in range(repeats):
        for fn in ((fn_a, fn_b) if i % 2 == 0 else (fn_b, fn_a)):  # alternate who runs first
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[fn].append(time.perf_counter() - t0)
            cpu[fn].append(time.process_time() - c0)
    return [(statistics.median(wall[f]), statistics.median(cpu[f])) for f in (fn_a, fn_b)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--models', nargs='+', default=['mambaout_femto', 'mambaout_tiny'])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'# {platform.processor() or platform.machine()}, torch {torch.__version__}, timm {timm.__version__}, '
          f'{torch.get_num_threads()} threads, float32, batch 1, {args.size}x{args.size}, '
          f'median of {args.repeats} interleaved runs')

    rows = []
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    for name in args.models:
        torch.manual_seed(0)
        theirs = timm.create_model(name).eval()
        ours = mambazoo.create_model(name).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True)  # the same keys: timm's layout
        with torch.no_grad():
            diff = (ours(x) - theirs(x)).abs().max().item()
            if diff > 1e-4:
                raise SystemExit(f'{name}: outputs differ by {diff:.2e}; not the same weights?')
            theirs_t, ours_t = interleaved_medians(lambda: theirs(x), lambda: ours(x), args.repeats)
        rows.append((name, theirs_t, ours_t, diff))

    print(f'| model | timm ms (wall) | mambazoo ms (wall) | ratio (wall) | timm ms (CPU) | mambazoo ms (CPU) | '
          f'ratio (CPU) | target <= {TARGET} | max abs logit diff |')
    print('|---|---|---|---|---|---|---|---|---|')
    for name, (t_wall, t_cpu), (o_wall, o_cpu), diff in rows:
        ratio_wall, ratio_cpu = o_wall / t_wall, o_cpu / t_cpu
        met = 'yes' if ratio_wall <= TARGET else ('yes (CPU time)' if ratio_cpu <= TARGET else 'NO')
        print(f'| {name} | {t_wall * 1e3:.1f} | {o_wall * 1e3:.1f} | {ratio_wall:.3f} | {t_cpu * 1e3:.1f} | '
              f'{o_cpu * 1e3:.1f} | {ratio_cpu:.3f} | {met} | {diff:.1e} |')
    print(f'\n(load average at the end: {" ".join(open("/proc/loadavg").read().split()[:3])} on '
          f'{os.cpu_count()} cores)' if os.path.exists('/proc/loadavg') else '')


if __name__ == '__main__':
    main()
