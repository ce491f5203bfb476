"""Vim benchmark, CPU: vim_tiny vs timm's deit_tiny_patch16_224, latency, throughput and peak memory.

Both models are measured side by side in one run, at 224x224 (batch 1 and 8) and 512x512 (batch 1); both are built
for the input size (img_size=..., random weights: speed does not depend on them). Timings alternate between the two
models so that load changes on a shared machine hit both alike; the table gives medians and the ratio vim / deit.
Peak memory is the growth of the process's resident set (VmHWM after a reset, over VmRSS before) during one forward
pass, measured in a fresh subprocess per case, after a warm-up pass and malloc_trim: the activations and workspace
of inference, not the weights. A later target (issue "Vim speed"): vim_tiny batch-1 latency <= 2x deit_tiny.

    .venv/bin/python benchmarks/bench_vim.py [--threads 2] [--repeats 7]
"""
import argparse
import ctypes
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import torch

CASES: List[Tuple[int, int]] = [(224, 1), (224, 8), (512, 1)]  # (input size, batch)
MODELS = ('deit_tiny_patch16_224', 'vim_tiny')


def build(name: str, size: int) -> torch.nn.Module:
    import timm
    import mambazoo
    torch.manual_seed(0)
    if name.startswith('vim'):
        return mambazoo.create_model(name, img_size=size).eval()
    return timm.create_model(name, img_size=size).eval()


def _status_bytes(key: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_memory_child(name: str, size: int, batch: int, threads: int) -> None:
    """Run in a subprocess: print the peak resident-set growth (bytes) of one forward pass as JSON."""
    torch.set_num_threads(threads)
    model = build(name, size)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        model(x)  # warm-up: thread pools, kernel caches
        try:
            ctypes.CDLL('libc.so.6').malloc_trim(0)  # give freed heap back, so the next pass must fault it in
        except OSError:
            pass
        before = _status_bytes('VmRSS:')
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM (the peak RSS) to the current RSS
        model(x)
        peak = _status_bytes('VmHWM:')
    print(json.dumps({'peak_bytes': peak - before}))


def peak_memory(name: str, size: int, batch: int, threads: int) -> float:
    """Peak RSS growth in MB during one forward pass, measured in a fresh process (NaN if unavailable)."""
    cmd = [sys.executable, __file__, '--memory-child', name, str(size), str(batch), str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])['peak_bytes'] / 2 ** 20
    except (IndexError, ValueError, KeyError):
        print(f'# memory of {name} at {size} batch {batch} not measured: {result.stderr[-300:]}', file=sys.stderr)
        return float('nan')


def latencies(models: Dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> Dict[str, float]:
    """Median seconds per forward pass of each model, timed alternately."""
    times: Dict[str, List[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(x)
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--memory-child', nargs=4, metavar=('MODEL', 'SIZE', 'BATCH', 'THREADS'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        name, size, batch, threads = args.memory_child
        measure_memory_child(name, int(size), int(batch), int(threads))
        return

    import timm
    torch.set_num_threads(args.threads)
    print(f'# {platform.processor() or platform.machine()}, torch {torch.__version__}, timm {timm.__version__}, '
          f'{torch.get_num_threads()} threads, float32, inference (no_grad), median of {args.repeats}')
    rows = []
    for size in sorted({s for s, _ in CASES}):
        models = {name: build(name, size) for name in MODELS}
        for case_size, batch in CASES:
            if case_size != size:
                continue
            x = torch.randn(batch, 3, size, size)
            lat = latencies(models, x, args.repeats)
            mem = {name: peak_memory(name, size, batch, args.threads) for name in MODELS}
            rows.append((size, batch, lat, mem))

    base, ours = MODELS
    print(f'| input | batch | {base} ms | vim_tiny ms | latency ratio | {base} img/s | vim_tiny img/s '
          f'| {base} peak MB | vim_tiny peak MB | memory ratio |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for size, batch, lat, mem in rows:
        print(f'| {size}x{size} | {batch} | {lat[base] * 1e3:.1f} | {lat[ours] * 1e3:.1f} '
              f'| {lat[ours] / lat[base]:.2f} | {batch / lat[base]:.1f} | {batch / lat[ours]:.1f} '
              f'| {mem[base]:.1f} | {mem[ours]:.1f} | {mem[ours] / mem[base]:.2f} |')


if __name__ == '__main__':
    main()
