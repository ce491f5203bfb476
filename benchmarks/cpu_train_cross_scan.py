"""VMamba's cross selective scan in CPU training (issue 19): forward + backward of ``cross_selective_scan`` by the
compiled training path (``ops.cross_scan_grad``: the compiled forward keeping chunk-start states, then the compiled
backward) against the pure-PyTorch path it replaces (``scan_policy(compiled_cpu=False)``: time-major copies, the
chunked scan, whose backward is a PyTorch loop over time steps), at VMamba-T's four stage shapes for a 224-px
input, with 1 and 2 threads.

The shapes are read from ``vmamba_tiny`` itself (built on the meta device): per stage the map size, SS2D's
d_inner, dt_rank and d_state. Inputs as SS2D passes them: x a channels-last view of a channels-first map; dts, B
and C views of one x_proj output; D and delta_bias; softplus on. Every input is a leaf that requires a gradient;
one ``torch.autograd.grad`` of a fixed random cotangent per call. Medians of ``--repeats`` calls after warm-up;
ratio = PyTorch path / compiled (higher is better). The thread count is ``torch.set_num_threads`` (both paths; the
compiled kernels split calls by batch elements, else directions, between PyTorch's OpenMP threads).

    .venv/bin/python benchmarks/cpu_train_cross_scan.py [--threads 1 2] [--batches 8 1] [--repeats 5] [--match TEXT]
"""
import argparse
import os
import platform
from typing import Callable, List, Tuple

import torch

import mambazoo
from cpu_compile import median_ms  # this folder is on sys.path when the script runs
from mambazoo.ops import cross_selective_scan, scan_policy

IMAGE_SIZE = 224


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def stage_shapes(name: str = 'vmamba_tiny') -> List[Tuple[int, int, int, int]]:
    """(map side, d_inner, dt_rank, d_state) of each stage's SS2D at IMAGE_SIZE."""
    with torch.device('meta'):
        model = mambazoo.create_model(name)
    return [(IMAGE_SIZE // info['reduction'], layer.blocks[0].op.d_inner, layer.blocks[0].op.dt_rank,
             layer.blocks[0].op.d_state) for info, layer in zip(model.feature_info, model.layers)]


def cross_scan_case(batch: int, side: int, d: int, rank: int, n: int) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    x = leaf(batch, d, side, side)  # channels-first, as SS2D's conv writes it
    x_dbl = leaf(batch, side, side, 4, rank + 2 * n)
    dt_weight = leaf(4, d, rank, scale=rank ** -0.5)
    A = (-torch.exp(torch.randn(4 * d, n, generator=g) * 0.5)).requires_grad_()
    D, delta_bias = leaf(4 * d), leaf(4 * d, scale=0.5)
    leaves = [x, x_dbl, dt_weight, A, D, delta_bias]

    def call():
        dts, B, C = torch.split(x_dbl, [rank, n, n], dim=-1)
        return cross_selective_scan(x.permute(0, 2, 3, 1), dts, dt_weight, A, B, C, D, delta_bias=delta_bias,
                                    delta_softplus=True)

    with torch.no_grad():
        cotangent = torch.randn(call().shape, generator=g)

    def run():
        torch.autograd.grad(call(), leaves, cotangent)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--batches', type=int, nargs='+', default=[8, 1])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--match', metavar='TEXT', help='only the rows whose name contains TEXT')
    args = parser.parse_args()
    print(f'# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, mambazoo {mambazoo.__version__}; '
          f'float32 forward + backward, medians of {args.repeats}, load average {os.getloadavg()[0]:.2f}')
    print()
    header = ' | '.join(f'compiled ms, {t}T | PyTorch ms, {t}T | ratio, {t}T' for t in args.threads)
    print(f'| call | {header} |')
    print('|---|' + '---|' * (3 * len(args.threads)))
    for batch in args.batches:
        for stage, (side, d, rank, n) in enumerate(stage_shapes(), start=1):
            name = f'VMamba-T stage {stage} ({side}x{side}, d {d}, R {rank}, N {n}), b{batch}'
            if args.match and args.match not in name:
                continue
            run = cross_scan_case(batch, side, d, rank, n)
            cells = []
            for threads in args.threads:
                torch.set_num_threads(threads)
                compiled = median_ms(run, args.repeats, warmup=2)
                with scan_policy(compiled_cpu=False):
                    pytorch = median_ms(run, args.repeats, warmup=1)
                cells.append(f'{compiled:.2f} | {pytorch:.2f} | {pytorch / compiled:.1f}x')
            print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
