"""CPU inference kernels (issue "CPU speed"): the numba-compiled scan, cross scan and Mamba mixer against the
pure-PyTorch paths they replace, at the shapes of the tiny models, all in one run.

Rows: one call of each model's largest kernel shapes, float32, no_grad, 2 threads by default:

* scan: ``selective_scan`` (chunked backend) with the compiled kernel, split between PyTorch's OpenMP threads;
  the same kernel on one thread (MAMBAZOO_SCAN_THREADS=1); the pure-PyTorch block loop (MAMBAZOO_NUMBA=0);
* cross scan: ``cross_selective_scan`` (VMamba's SS2D core) the same three ways;
* mixer: one whole Mamba mixer layer (``_blocks.Mamba``, in_proj to out_proj): the compiled conv1d + SiLU and
  two-direction scan around PyTorch's GEMMs vs the PyTorch path (flips and concatenations, ``selective_scan``).

Inputs time-major where the models hand them over time-major (Vim's and the hybrid's mixer, VMamba's tokens).
Medians of ``--repeats`` calls after warm-up; ratios are PyTorch path / compiled (higher is better).

    .venv/bin/python benchmarks/cpu_kernels.py [--threads 2] [--repeats 30]
"""
import argparse
import os
import platform
from typing import Callable, Dict

import torch

import mambazoo
from cpu_compile import median_ms  # this folder is on sys.path when the script runs
from mambazoo.models._blocks import Mamba
from mambazoo.ops import cross_selective_scan, selective_scan


def with_env(env: Dict[str, str], fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, '
          f'mambazoo {mambazoo.__version__}, {args.threads} threads, float32 no_grad, medians of {args.repeats}')
    cases = []
    for b in (1, 8):
        cases += [
            (f'Vim-T scan (both directions), b{b}', scan_call(b, 768, 197, 16, 2, True)),
            (f'hybrid-T scan, b{b}', scan_call(b, 192, 196, 16, 1, True)),
            (f'MambaVision-T stage-3 scan, b{b}', scan_call(b, 160, 196, 8, 1, False)),
            (f'VMamba-T stage-1 cross scan, b{b}', cross_call(b, 56, 56, 96, 6, 1)),
            (f'VMamba-T stage-3 cross scan, b{b}', cross_call(b, 14, 14, 384, 24, 1)),
            (f'Vim-T mixer layer, b{b}', mixer_call(b, 197, 192, 2, 'v2')),
            (f'hybrid-T mixer layer, b{b}', mixer_call(b, 196, 192, 1, 'none')),
        ]
    print()
    print('| call | compiled, split ms | compiled, 1 thread ms | PyTorch path ms | PyTorch / compiled | split speed-up |')
    print('|---|---|---|---|---|---|')
    with torch.inference_mode():
        for name, call in cases:
            split = median_ms(call, args.repeats, warmup=3)
            single = median_ms(with_env({'MAMBAZOO_SCAN_THREADS': '1'}, call), args.repeats, warmup=3)
            pytorch = median_ms(with_env({'MAMBAZOO_NUMBA': '0'}, call), args.repeats, warmup=3)
            print(f'| {name} | {split:.3f} | {single:.3f} | {pytorch:.3f} | {pytorch / split:.1f}x | '
                  f'{single / split:.2f}x |', flush=True)


if __name__ == '__main__':
    main()
