"""How a process that runs jobs uses the machine: memory reuse and OpenMP thread teams.

**Memory.** glibc's malloc hands every large free block straight back to the kernel (``munmap``, or
trimming the top of a heap), so the next buffer of that size arrives as fresh pages the
kernel must fault in and zero, one 4 KiB page at a time. Detection allocates and frees
the same tens of megabytes of activations for every tile: at 24 MP that measured about a
million page faults per image and 17–20 % of detection time (by hand, alternating fresh
processes; the same peak memory either way). So a process that runs jobs (the CLI, and
so the daemon; ``bench/speed.py``) raises the two thresholds once (``keep_freed_memory``),
and the daemon returns what its heaps kept after each job and each model import
(``release_freed_memory``), so an idle daemon stays small.

Only glibc has these knobs (``mallopt``, ``malloc_trim``); elsewhere both calls do
nothing and say so by returning False.

**Threads.** PyTorch's CPU kernels run on OpenMP (libgomp), which keeps a team of helper
threads for every thread that ever ran a parallel region, until that thread ends. Once
libgomp manages more threads than there are CPUs, its threads stop spinning at barriers
and sleep instead, and every one of the thousands of small parallel regions in a tile
waits for a wake-up: detection on the daemon's worker measured 20–25 % slower (CPU use
1.6 of 2 cores instead of 2.0) once the main thread had loaded the model, and as fast as
in-process when only one thread ever ran torch. So the daemon loads its model on a
short-lived thread (``on_short_thread``), whose team ends with it, and warms up on its
worker (``Server(warm_up=...)``), the one long-lived thread that runs torch, which so has
its team before the first job. (A ``models.import`` is checked on the I/O thread by
names, shapes and types alone, with no tensor work: ``ModelStore._check``.)
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap and are reused when freed; whole-image buffers
# (72 MB and up at 24 MP) stay mmapped, so freeing them still returns them at once.
MMAP_THRESHOLD = 64 << 20
# A heap's free top is returned only beyond this; release_freed_memory returns the rest.
TRIM_THRESHOLD = 1 << 30

_libc: ctypes.CDLL | None | bool = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.gnu_get_libc_version  # noqa: B018 -- glibc only (musl has no such symbol)
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc or None


def keep_freed_memory() -> bool:
    """Let freed blocks below ``MMAP_THRESHOLD`` be reused rather than returned; True if set."""
    libc = _glibc()
    if libc is None:
        return False
    mmap_set = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    trim_set = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return mmap_set and trim_set


def release_freed_memory() -> bool:
    """Return the free memory of every heap to the system (a few ms); True if any was."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


def on_short_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on a thread of its own, which ends with it (see the module's
    note on threads); returns its result or raises its exception."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller, raised there
            box["error"] = e

    t = threading.Thread(target=run, name="healdust-torch-once")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
