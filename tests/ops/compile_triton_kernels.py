"""Compile the scan kernels for a Hopper GPU (sm_90) without one: Triton's front end, LLVM and ptxas only.

Run as a script (without TRITON_INTERPRET); prints one line per kernel variant with its registers and spills.
The interpreter skips checks the compiler makes (constexpr globals, types), so this catches what the interpreter
tests cannot. Used by test_scan_triton.py.
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mambazoo.ops import scan_triton_kernels as kernels
from mambazoo.ops.scan_triton import NUM_WARPS, _block_sizes

FLAGS = ('HAS_D', 'HAS_Z', 'HAS_BIAS', 'SOFTPLUS', 'B_FIXED', 'C_FIXED', 'CROSS')
VARIANTS = {  # name: (L, N, channels per group, dtype, flags that are on)
    'vim_layer_bf16': (197, 16, 384, 'bf16', ('HAS_D', 'HAS_Z', 'HAS_BIAS', 'SOFTPLUS')),
    'vmamba_cross_fp32': (3136, 1, 96, 'fp32', ('HAS_D', 'HAS_BIAS', 'SOFTPLUS', 'CROSS')),
    'fixed_bc_fp16': (300, 5, 12, 'fp16', ('B_FIXED', 'C_FIXED')),
}


def signature(fn, dtype, constexprs):
    return {name: 'constexpr' if name in constexprs else
            (f'*{dtype}' if name in ('u_ptr', 'delta_ptr', 'z_ptr', 'out_ptr', 'B_ptr', 'C_ptr', 'dout_ptr', 'du_ptr',
                                     'ddelta_ptr', 'dz_ptr') else '*fp32' if name.endswith('_ptr') else 'i32')
            for name in fn.arg_names}


def ptxas_report(ptx: str) -> str:
    """Registers and spill bytes from ptxas -v (Triton's bundled ptxas) for the kernel's PTX."""
    ptxas = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'ptxas'
    with tempfile.NamedTemporaryFile('w', suffix='.ptx') as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([str(ptxas), '-v', '--gpu-name', 'sm_90a', f.name, '-o', '/dev/null'],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r'Used (\d+) registers', out)
    spills = re.search(r'(\d+) bytes spill stores', out)
    return f'registers {registers.group(1) if registers else "?"}, spill stores {spills.group(1) if spills else "?"} B'


def main() -> int:
    target = GPUTarget('cuda', 90, 32)
    for name, (length, n_state, per_group, dtype, on) in VARIANTS.items():
        for kernel, backward in ((kernels.selective_scan_fwd_kernel, False),
                                 (kernels.selective_scan_bwd_kernel, True)):
            block_d, block_n, block_l = _block_sizes(length, n_state, per_group, backward)
            consts = {flag: flag in on for flag in FLAGS}
            consts.update(BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l)
            if backward:
                consts['HAS_DLAST'] = True
            compiled = triton.compile(ASTSource(kernel, signature(kernel, dtype, consts), constexprs=consts),
                                      target=target, options={'num_warps': NUM_WARPS})
            print(f'{name} {kernel.__name__}: {ptxas_report(compiled.asm["ptx"])}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
