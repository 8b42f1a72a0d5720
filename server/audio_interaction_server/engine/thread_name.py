"""The operating system's name for the calling thread, so ``top -H``, ``py-spy`` and ``/proc/<pid>/task/*/comm``
tell the model worker from the event loop (Python's ``threading`` names exist only inside the interpreter)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

PR_SET_NAME = 15  # prctl option: the calling thread's name (<linux/prctl.h>)
MAX_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last one NUL


def name_native_thread(name: str) -> bool:
    """Name the calling OS thread ``name`` (cut to 15 bytes); False where the platform offers no way (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.prctl(PR_SET_NAME, name.encode()[:MAX_NAME_BYTES], 0, 0, 0) == 0
