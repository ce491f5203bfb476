"""CPU inference kernels (issue "CPU speed"): the numba-compiled scan, cross scan and Mamba mixer against the
pure-PyTorch paths they replace, at the shapes of the tiny models, all in one run.

Rows: one call of each model's largest kernel shapes, float32, no_grad, 2 threads by default:

* scan: ``selective_scan`` (chunked backend) with the compiled kernel, split between PyTorch's OpenMP threads;
  the same kernel on one thread (MAMBAZOO_SCAN_THREADS=1); the pure-PyTorch block loop (MAMBAZOO_NUMBA=0);
* cross scan: ``cross_selective_scan`` (VMamba's SS2D core) the same three ways;
* mixer: one whole Mamba mixer layer (``_blocks.Mamba``, in_proj to out_proj): the compiled conv1d + SiLU and
  two-direction scan around PyTorch's GEMMs vs the PyTorch path (flips and concatenations, ``selective_scan``).

Inputs time-major where the models hand them over time-major (Vim's and the hybrid's mixer, VMamba's tokens).
Each figure is the best of ``--rounds`` rounds, in which the three paths take turns, of the median of
``--repeats`` calls after warm-up (this VM's speed drifts by a third within minutes: one median after another
compared different moments); ratios are PyTorch path / compiled (higher is better). The one-thread
and PyTorch-path columns run under ``scan_policy(scan_threads=1)`` and ``scan_policy(compiled_cpu=False)`` (the
policy reads MAMBAZOO_SCAN_THREADS and MAMBAZOO_NUMBA once, at import: changing the environment per call would
change nothing).

Efficiency against the physical limit (``mambazoo.analysis.roofline``, measured at the start of the same run and
printed in the header): each call's state updates (batch * L * channels * N, every scan direction's channels
counted: Vim's 768 = 2 x 384, VMamba's 4 x d) per second, per core (split: divided by the threads the call uses,
the given ones where its work reaches ``scan_numba.MIN_PARALLEL_WORK``), beside the scan's per-core limit (the FMA
peak over the 20 vector instructions of one state update) and the fraction of it. The mixer rows are a whole layer
(GEMMs and conv included), so their rate is a lower bound on their scan's; the N = 1 cross scans do a softplus
and a step-size projection per update, about 3x the arithmetic the limit counts (see roofline's docstring). The
issue's targets: a scan >= 40% of the limit, and two threads >= 1.7x one wherever the work is large enough to
split (batch >= 2 or >= 768 channels): "NOT met" marks a split speed-up below that on such a call.

    .venv/bin/python benchmarks/cpu_kernels.py [--threads 2] [--repeats 10] [--rounds 5] [--batches 1 8] [--match TEXT]
"""
import argparse
import os
from dataclasses import dataclass
from typing import Callable, List

import torch

import mambazoo
from cpu_compile import best_of_rounds_ms  # this folder is on sys.path when the script runs
from mambazoo.analysis.roofline import measure_machine_limits
from mambazoo.models._blocks import Mamba
from mambazoo.ops import cross_selective_scan, scan_policy, selective_scan
from mambazoo.ops.scan_numba import MIN_PARALLEL_WORK

SPLIT_SPEEDUP_TARGET = 1.7
SCAN_FRACTION_TARGET = 0.4


@dataclass
class Case:
    name: str
    call: Callable[[], object]
    batch: int
    channels: int  # the kernel's channels, every direction's
    updates: int  # state updates per call: batch * L * channels * N
    whole_layer: bool = False  # a Mamba mixer layer: GEMMs and conv in the time too

    @property
    def splittable(self) -> bool:
        """Large enough to split, as the issue says: batch >= 2 or >= 768 channels."""
        return self.batch >= 2 or self.channels >= 768


def with_policy(fn: Callable[[], object], **changes) -> Callable[[], object]:
    def run():
        with scan_policy(**changes):
            return fn()
    return run


def scan_call(batch: int, dim: int, length: int, n: int, groups: int, time_major: bool):
    g = torch.Generator().manual_seed(0)

    def seq():
        x = torch.randn(length, batch, dim, generator=g)
        return x.permute(1, 2, 0) if time_major else x.permute(1, 2, 0).contiguous()

    u, delta, z = seq(), seq() * 0.5, seq()
    A = -torch.exp(torch.randn(dim, n, generator=g) * 0.5)
    B, C = (torch.randn(length, batch, groups, n, generator=g).permute(1, 2, 3, 0) for _ in range(2))
    D, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g) * 0.1
    return lambda: selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)


def cross_call(batch: int, height: int, width: int, d: int, rank: int, n: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, d, height, width, generator=g).permute(0, 2, 3, 1)
    dts = torch.randn(batch, height, width, 4, rank, generator=g) * 0.3
    dt_w = torch.randn(4, d, rank, generator=g) * 0.3
    A = -torch.exp(torch.randn(4 * d, n, generator=g) * 0.5)
    B, C = (torch.randn(batch, height, width, 4, n, generator=g) for _ in range(2))
    D, bias = torch.randn(4 * d, generator=g), torch.randn(4 * d, generator=g) * 0.1
    return lambda: cross_selective_scan(x, dts, dt_w, A, B, C, D, delta_bias=bias, delta_softplus=True)


def mixer_call(batch: int, length: int, d_model: int, expand: int, bimamba_type: str):
    torch.manual_seed(2)
    mixer = Mamba(d_model, expand=expand, bimamba_type=bimamba_type, if_divide_out=True).eval()
    x = torch.randn(batch, length, d_model)
    return lambda: mixer(x)


def cases_for(batch: int) -> List[Case]:
    """The tiny models' largest kernel shapes at ``batch``."""
    def scan(name, dim, length, n, groups, time_major):
        return Case(name, scan_call(batch, dim, length, n, groups, time_major), batch, dim, batch * length * dim * n)

    def cross(name, height, width, d, rank, n):
        return Case(name, cross_call(batch, height, width, d, rank, n), batch, 4 * d,
                    batch * height * width * 4 * d * n)

    def mixer(name, length, d_model, expand, bimamba_type, n=16):
        channels = (2 if bimamba_type == 'v2' else 1) * expand * d_model
        return Case(name, mixer_call(batch, length, d_model, expand, bimamba_type), batch, channels,
                    batch * length * channels * n, whole_layer=True)

    return [
        scan(f'Vim-T scan (both directions), b{batch}', 768, 197, 16, 2, True),
        scan(f'hybrid-T scan, b{batch}', 192, 196, 16, 1, True),
        scan(f'MambaVision-T stage-3 scan, b{batch}', 160, 196, 8, 1, False),
        cross(f'VMamba-T stage-1 cross scan, b{batch}', 56, 56, 96, 6, 1),
        cross(f'VMamba-T stage-3 cross scan, b{batch}', 14, 14, 384, 24, 1),
        mixer(f'Vim-T mixer layer, b{batch}', 197, 192, 2, 'v2'),
        mixer(f'hybrid-T mixer layer, b{batch}', 196, 192, 1, 'none'),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=10, help='calls per round (their median)')
    parser.add_argument('--rounds', type=int, default=5,
                        help='rounds in which the three paths take turns (each figure: its best round)')
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--match', metavar='TEXT', help='only the calls whose name contains TEXT (e.g. "scan,")')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    limits = measure_machine_limits(args.threads)
    print(f'# {limits.cpu_model}, {os.cpu_count()} CPUs, torch {torch.__version__}, mambazoo {mambazoo.__version__}, '
          f'{args.threads} threads, float32 no_grad, best of {args.rounds} rounds of {args.repeats} calls '
          f'(their median), the paths taking turns')
    for line in limits.describe():
        print(f'# {line}')
    limit = limits.scan_updates_per_s_per_core
    cases = [case for b in args.batches for case in cases_for(b) if not args.match or args.match in case.name]
    print()
    print('| call | compiled, split ms | compiled, 1 thread ms | PyTorch path ms | PyTorch / compiled | split speed-up '
          '| M state updates | G updates/s per core, 1 thread | of the limit | G updates/s per core, split '
          '| of the limit | split target |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    with torch.inference_mode():
        for case in cases:
            split, single, pytorch = best_of_rounds_ms(
                [case.call, with_policy(case.call, scan_threads=1), with_policy(case.call, compiled_cpu=False)],
                args.repeats, args.rounds, warmup=3)
            threads = args.threads if case.updates >= MIN_PARALLEL_WORK else 1
            rate_single = case.updates / (single / 1e3)
            rate_split = case.updates / (split / 1e3) / threads
            speedup = single / split
            if not case.splittable or args.threads < 2:
                verdict = '- (too small to split)' if args.threads >= 2 else '-'
            else:
                verdict = 'met' if speedup >= SPLIT_SPEEDUP_TARGET else f'NOT met (< {SPLIT_SPEEDUP_TARGET:g}x)'
            layer = ' (whole layer)' if case.whole_layer else ''
            print(f'| {case.name} | {split:.3f} | {single:.3f} | {pytorch:.3f} | {pytorch / split:.1f}x | '
                  f'{speedup:.2f}x | {case.updates / 1e6:.1f} | {rate_single / 1e9:.2f}{layer} | '
                  f'{rate_single / limit:.0%} | {rate_split / 1e9:.2f}{layer} | {rate_split / limit:.0%} | {verdict} |',
                  flush=True)
    print()
    print(f'# limit: {limit / 1e9:.2f} G state updates/s per core (FMA peak / {limits.scan_ops_per_update}); the '
          f'issue asks >= {SCAN_FRACTION_TARGET:.0%} of it of the scans and >= {SPLIT_SPEEDUP_TARGET:g}x from two '
          f'threads where batch >= 2 or >= 768 channels')


if __name__ == '__main__':
    main()
