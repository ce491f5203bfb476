"""CPU training kernels (issue 19): forward + backward of the compiled training path (``scan_numba_grad``: the
training forward keeping chunk-start states, then the compiled backward) against the pure-PyTorch path it
replaces (``scan_policy(compiled_cpu=False)``: the chunked scan, whose backward is a PyTorch loop over time, and
F.conv1d), at the tiny models' shapes, with 1 and 2 threads.

Rows, float32, every input a leaf that requires a gradient, one ``torch.autograd.grad`` of a fixed random
cotangent per call:

* Vim-T's mixer ops (d 384, N 16, dt_rank 12, both branches, L 197): ``mamba_inner_conv`` and
  ``mamba_inner_scan`` as the block calls them (in_proj's batch-major output), and the whole ``Mamba`` layer
  (in_proj to out_proj, the GEMMs included);
* the hybrid-T mixer scan (d 192, one branch);
* MambaVision-T's stage-3 and stage-4 ``selective_scan`` (dim 160 / 320, N 8, no gate, delta_bias, B and C
  (batch, N, L) views of x_proj's output, u batch-major as the mixer's conv1d writes it);
* VMamba-T's ``cross_selective_scan`` (``cross_scan_grad``) at its four stage shapes for a 224-px input, read from
  ``vmamba_tiny`` on the meta device (map side, d_inner, dt_rank, d_state), the inputs as SS2D passes them (x a
  channels-last view of a channels-first map; dts, B and C views of one x_proj output; softplus on).

Medians of ``--repeats`` calls after warm-up; ratio = PyTorch path / compiled (higher is better). The thread count
is ``torch.set_num_threads`` (both paths; the compiled kernels split calls above ``MIN_PARALLEL_WORK`` between
PyTorch's OpenMP threads).

    .venv/bin/python benchmarks/cpu_train_kernels.py [--threads 1 2] [--batches 8 1] [--repeats 10] [--match TEXT]
"""
import argparse
import os
from typing import Callable, List, Tuple

import torch

import mambazoo
from cpu_compile import median_ms  # this folder is on sys.path when the script runs
from mambazoo.analysis.roofline import cpu_model
from mambazoo.models._blocks import Mamba
from mambazoo.ops import (cross_selective_scan, mamba_inner_conv, mamba_inner_scan, scan_policy,
                          selective_scan)

IMAGE_SIZE = 224  # VMamba-T's stage shapes are taken at this input size


def fwd_bwd(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor]) -> Callable[[], None]:
    """One forward and one backward (gradients of every leaf) per call."""
    with torch.no_grad():
        cotangent = torch.randn_like(fn())

    def run():
        torch.autograd.grad(fn(), leaves, cotangent)
    return run


def leaf(*shape, scale=1.0, generator=None) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).requires_grad_()


def mixer_inputs(batch: int, length: int, d: int, n: int, rank: int, branches: int):
    g = torch.Generator().manual_seed(0)
    xz = leaf(batch, length, 2 * d, generator=g)
    weight, bias = leaf(branches * d, 1, 4, scale=0.3, generator=g), leaf(branches * d, scale=0.1, generator=g)
    deltas = [leaf(batch, length, d, scale=0.5, generator=g) for _ in range(branches)]
    projections = [leaf(batch, length, rank + 2 * n, generator=g) for _ in range(branches)]
    A = (-torch.exp(torch.randn(branches * d, n, generator=g) * 0.5)).requires_grad_()
    D = leaf(branches * d, generator=g)
    with torch.no_grad():
        u = mamba_inner_conv(xz, weight, bias)
    return xz, weight, bias, deltas, projections, A, D, u.requires_grad_()


def mixer_conv_case(batch, length, d, n, rank, branches):
    xz, weight, bias, *_ = mixer_inputs(batch, length, d, n, rank, branches)
    return fwd_bwd(lambda: mamba_inner_conv(xz, weight, bias), [xz, weight, bias])


def mixer_scan_case(batch, length, d, n, rank, branches):
    xz, _, _, deltas, projections, A, D, u = mixer_inputs(batch, length, d, n, rank, branches)
    return fwd_bwd(lambda: mamba_inner_scan(u, deltas, projections, xz, A, D, None, rank, branches == 2),
                   [u, *deltas, *projections, xz, A, D])


def mixer_layer_case(batch, length, d_model, expand, bimamba_type):
    torch.manual_seed(1)
    mixer = Mamba(d_model, expand=expand, bimamba_type=bimamba_type, if_divide_out=True)
    x = leaf(batch, length, d_model)
    return fwd_bwd(lambda: mixer(x), [x, *mixer.parameters()])


def selective_scan_case(batch, dim, length, n, rank):
    """MambaVision's call: u (batch, dim, L) batch-major, delta from dt_proj transposed, B and C views of x_proj."""
    g = torch.Generator().manual_seed(2)
    u, delta = leaf(batch, dim, length, generator=g), leaf(batch, length, dim, scale=0.5, generator=g)
    x_dbl = leaf(batch, length, rank + 2 * n, generator=g)
    A = (-torch.exp(torch.randn(dim, n, generator=g) * 0.5)).requires_grad_()
    D, bias = leaf(dim, generator=g), leaf(dim, scale=0.1, generator=g)

    def call():
        _, B, C = torch.split(x_dbl, [rank, n, n], dim=-1)
        return selective_scan(u, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
                              delta_bias=bias, delta_softplus=True)
    return fwd_bwd(call, [u, delta, x_dbl, A, D, bias])


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


def cases_for(batch: int) -> List[Tuple[str, Callable[[], Callable[[], None]]]]:
    return [
        (f'Vim-T mixer conv1d+SiLU, b{batch}', lambda: mixer_conv_case(batch, 197, 384, 16, 12, 2)),
        (f'Vim-T mixer scan (2 branches), b{batch}', lambda: mixer_scan_case(batch, 197, 384, 16, 12, 2)),
        (f'Vim-T mixer layer (GEMMs too), b{batch}', lambda: mixer_layer_case(batch, 197, 192, 2, 'v2')),
        (f'hybrid-T mixer scan (1 branch), b{batch}', lambda: mixer_scan_case(batch, 196, 192, 16, 12, 1)),
        (f'MambaVision-T stage-3 scan, b{batch}', lambda: selective_scan_case(batch, 160, 196, 8, 20)),
        (f'MambaVision-T stage-4 scan, b{batch}', lambda: selective_scan_case(batch, 320, 49, 8, 40)),
    ] + [(f'VMamba-T stage {stage} cross scan ({side}x{side}, d {d}, R {rank}, N {n}), b{batch}',
          lambda side=side, d=d, rank=rank, n=n: cross_scan_case(batch, side, d, rank, n))
         for stage, (side, d, rank, n) in enumerate(stage_shapes(), start=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--batches', type=int, nargs='+', default=[8, 1])
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--match', metavar='TEXT', help='only the rows whose name contains TEXT')
    args = parser.parse_args()
    print(f'# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, mambazoo {mambazoo.__version__}; '
          f'float32 forward + backward, medians of {args.repeats}, load average {os.getloadavg()[0]:.2f}')
    print()
    header = ' | '.join(f'compiled ms, {t}T | PyTorch ms, {t}T | ratio, {t}T' for t in args.threads)
    print(f'| call | {header} |')
    print('|---|' + '---|' * (3 * len(args.threads)))
    for batch in args.batches:
        for name, make in cases_for(batch):
            if args.match and args.match not in name:
                continue
            run = make()
            cells = []
            for threads in args.threads:
                torch.set_num_threads(threads)
                compiled = median_ms(run, args.repeats, warmup=2)
                with scan_policy(compiled_cpu=False):
                    pytorch = median_ms(run, args.repeats, warmup=2)
                cells.append(f'{compiled:.2f} | {pytorch:.2f} | {pytorch / compiled:.1f}x')
            print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
