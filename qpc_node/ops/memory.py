"""Give large buffers back to the kernel when they are freed (glibc malloc).

A node's large allocations are message-sized (up to 5 MiB frames, requests,
responses). glibc serves them with mmap -- and munmaps them on free -- only
until the first such chunk is freed: then it raises its mmap threshold to that
size (up to 32 MiB), and later 5 MiB buffers come from the heap, where freed
memory in the middle is kept by the process. Measured on a node that was made
to hold ~40 responses for unreading peers: RSS stayed at ~2x its idle size
after every byte had been released (issue 11). Pinning the threshold
(``mallopt(M_MMAP_THRESHOLD)`` disables the dynamic adjustment) makes every
large buffer an mmap of its own, released on free; the cost is one
mmap/munmap pair per large buffer, small next to copying its bytes.

Not glibc (musl on OpenWrt: it already unmaps large chunks), or no ctypes: a
no-op.
"""

from __future__ import annotations

import contextlib

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Above this, a buffer gets its own mapping. Frames are 64 KiB chunks on the
#: wire path; message-sized buffers are far above.
LARGE_BUFFER = 256 * 1024


def release_large_buffers(threshold: int = LARGE_BUFFER) -> bool:
    """Pin glibc's mmap and trim thresholds; True when it took effect."""
    try:
        import ctypes
        import ctypes.util
    except ImportError:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
        # Trim the heap top once this much is free there (the default moves with
        # the mmap threshold; pinned like it).
        return ok and bool(mallopt(M_TRIM_THRESHOLD, 2 * threshold))
    return False
