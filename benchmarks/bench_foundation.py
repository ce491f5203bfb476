"""Foundation benchmark, CPU: the fast scan vs the reference, and MambaVision-T vs timm's convnext_tiny.

Everything is measured side by side in one run; the table reports ratios against the baseline of the same run.
Targets (issue "Foundation"): fast scan >= 5x the reference at batch 2, dim 384, L 3136, N 16 (20x stretch);
MambaVision-T batch-1 latency <= 2x convnext_tiny.

    .venv/bin/python benchmarks/bench_foundation.py [--threads 2] [--repeats 5]
"""
import argparse
import platform

import timm
import torch

import mambazoo
from cpu_compile import median_ms  # this folder is on sys.path when the script runs
from mambazoo.ops import selective_scan_chunked, selective_scan_ref


def scan_inputs(batch=2, dim=384, length=3136, n=16, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.randn(batch, dim, length, generator=g) * 0.5
    A = -torch.exp(torch.randn(dim, n, generator=g) * 0.5)
    B = torch.randn(batch, n, length, generator=g)
    C = torch.randn(batch, n, length, generator=g)
    D = torch.randn(dim, generator=g)
    bias = torch.randn(dim, generator=g) * 0.1
    tensors = [u, delta, A, B, C, D, bias]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors


def run_scan(fn, tensors, backward: bool):
    u, delta, A, B, C, D, bias = tensors
    y = fn(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
    if backward:
        y.sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'# {platform.processor() or platform.machine()}, torch {torch.__version__}, timm {timm.__version__}, '
          f'{torch.get_num_threads()} threads, float32, median of {args.repeats}')

    rows = []
    with torch.no_grad():
        t = scan_inputs()
        ref = median_ms(lambda: run_scan(selective_scan_ref, t, False), max(1, args.repeats // 2))
        fast = median_ms(lambda: run_scan(selective_scan_chunked, t, False), args.repeats)
    rows.append(('scan fwd, B2 D384 L3136 N16', 'selective_scan_ref', ref, 'chunked', fast))
    # Autograd through the reference's 3136-step loop takes minutes at the full size: fwd+bwd at L 512.
    t = scan_inputs(length=512, requires_grad=True)
    ref = median_ms(lambda: run_scan(selective_scan_ref, t, True), 1)
    fast = median_ms(lambda: run_scan(selective_scan_chunked, t, True), args.repeats)
    rows.append(('scan fwd+bwd, B2 D384 L512 N16', 'selective_scan_ref', ref, 'chunked', fast))
    print(f'measured {len(rows)} scan rows', flush=True)

    ours = mambazoo.create_model('mambavision_tiny').eval()
    base = timm.create_model('convnext_tiny').eval()
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            t_base = median_ms(lambda: base(x), args.repeats, warmup=2)
            t_ours = median_ms(lambda: ours(x), args.repeats, warmup=2)
        rows.append((f'latency 224x224 batch {batch}', 'convnext_tiny', t_base, 'mambavision_tiny', t_ours))

    print('| measurement | baseline | baseline ms | ours | ours ms | ours / baseline time | speed-up |')
    print('|---|---|---|---|---|---|---|')
    for what, bname, tb, oname, to in rows:
        print(f'| {what} | {bname} | {tb:.1f} | {oname} | {to:.1f} | {to / tb:.2f} | {tb / to:.1f}x |')


if __name__ == '__main__':
    main()
