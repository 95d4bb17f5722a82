"""The resident-set helpers the benchmark scripts share (Linux /proc; torch has no CPU allocator
statistics, so the resident set is the measure of CPU memory). Not a benchmark: tests/test_bench.py
runs every bench/*.py except these underscore modules."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status: "VmRSS" (resident now) or "VmHWM" (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def settle_kb() -> int:
    """The resident set in kB after freeing what can be freed (Python's cycles, glibc's free lists)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return status_kb("VmRSS")
