"""What this process holds in memory, from /proc and glibc's allocator (Linux; None or False elsewhere).

Read by ``/metrics`` (api/metrics.py) and trimmed periodically in the front (api/runtime.py) and, when the engine
has a process of its own, in that process too (engine/process.py). Imports nothing of the package.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass


def resident_bytes(pid: int | str = "self") -> int | None:
    """Resident set size from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def open_fds(pid: int | str = "self") -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass(frozen=True)
class HeapStats:
    in_use: int  # bytes of live allocations in the arenas
    free: int  # bytes the arenas hold that nobody uses (RSS only where touched and not yet trimmed)
    mmapped: int  # bytes of live large allocations mapped directly (unmapped, not kept, when freed)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2  # glibc >= 2.33
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl, macOS): no heap figures, no trimming
        return None
    return libc


_GLIBC = _load_glibc()


def heap_stats() -> HeapStats | None:
    """glibc's heap figures summed over all arenas (None off glibc)."""
    if _GLIBC is None:
        return None
    info = _GLIBC.mallinfo2()
    return HeapStats(in_use=info.uordblks, free=info.fordblks, mmapped=info.hblkhd)


def malloc_trim() -> bool:
    """Return free heap pages of every arena to the OS; False where that is not possible."""
    if _GLIBC is None:
        return False
    _GLIBC.malloc_trim(0)
    return True
