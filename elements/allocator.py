"""glibc malloc tuned for buffers that come and go by the chunk.

Every chunk an element sees is a buffer of up to 1 MiB on each side (a batch joined for
gRPC, the bytes gRPC hands over, a 256 KiB socket read). glibc serves allocations that big
with mmap, or trims them off the heap when freed, so the next one faults its pages in again:
under bulk through one element the proxy took 80,000-220,000 page faults per GB moved.
Served from the heap instead: 600-2,800 per GB, and 8-10% less proxy CPU per GB (interleaved
runs, bench/README.md); gRPC alone (bench/grpc_ceiling.py) moves 1 MiB messages at 9.4-10.1
Gb/s instead of 3.6-4.2. Peak RSS under bulk did not move (51-53 MB).

Settings the user made win: MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or a glibc.malloc
tunable, and MALLOC_ARENA_MAX. Other C libraries have no mallopt: nothing is changed there.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 8 * 1024 * 1024


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        mallopt: Callable[[int, int], int] = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None  # not glibc
    return mallopt


def keep_buffers_on_heap() -> bool:
    """Serves allocations under MMAP_THRESHOLD_BYTES from the heap and trims it only past
    TRIM_THRESHOLD_BYTES of free space; False when the user's settings or the C library say no."""
    user_set = ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
                or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))
    mallopt = None if user_set else _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def limit_arenas(count: int) -> None:
    """glibc gives threads that allocate arenas of their own (up to 8 per CPU), and gRPC's
    threads keep theirs mostly empty; two arenas serve the proxy's event loop and gRPC alike,
    for about 5 MB less RSS in bulk with elements (bench: pass1 59.2 -> 55.2 MB). Must run
    before gRPC starts its threads; MALLOC_ARENA_MAX in the environment still decides."""
    mallopt = None if "MALLOC_ARENA_MAX" in os.environ else _mallopt()
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, count)
