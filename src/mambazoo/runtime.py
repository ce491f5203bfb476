"""Process settings that make CPU inference faster: opt-in, because they change the whole process.

glibc's malloc serves large blocks (above a threshold that adapts up to 32 MB) with fresh mmap'd pages and
trims the top of the heap when more than twice that threshold is free. A network's activations are exactly
such blocks, allocated and freed in turn, so each op's output is paid again in page faults: measured on a
2-core VM, 20-25% of Vim-T's and VMamba-T's CPU latency (a freshly mapped 600 kB output costs more than the
elementwise op that fills it). Keeping freed memory in the heap removes that; the price is that the
process's resident memory stays at its peak. timm models in the same process profit too, so comparisons
stay fair. (jemalloc or tcmalloc through LD_PRELOAD do the same from outside the process.)
"""
import ctypes
import ctypes.util
import logging
import sys

__all__ = ['tune_cpu_allocator']

_LOG = logging.getLogger(__name__)
# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30,
                       top_pad: int = 64 << 20) -> bool:
    """Keep freed large blocks in glibc's heap (no mmap below ``mmap_threshold``, no trimming below
    ``trim_threshold``). Returns True when applied; False where the C library is not glibc (nothing changes).
    Idempotent. The command-line tools call it; library users on CPU may call it once at start-up.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))
    if not ok:
        _LOG.warning('mallopt refused the allocator settings; CPU speed unchanged')
    _tuned = ok
    return ok
