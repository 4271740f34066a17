"""glibc malloc tuning for the degradation hot path.

The pipeline allocates and frees many 0.2-2 MB float temporaries per sample. glibc serves blocks
of that size with fresh mmap()s (or trims them off the heap top) once its adaptive thresholds
drift, and every fresh page then costs a page fault: we measured 400-600 faults and up to 2x
the time per area resize in a long-lived process (docs/benchmarks.md). Raising the mmap and trim
thresholds keeps freed blocks in the heap for reuse. The cost is that up to the trim threshold of
freed memory stays with the process instead of returning to the OS.

Entry points (the CLI and make-dataset worker processes) call :func:`tune_allocator`; library
functions never change process-wide settings on their own.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Raise glibc's mmap/trim thresholds for this process; False where that is not possible."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _tuned
