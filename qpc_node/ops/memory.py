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

Not glibc (musl on OpenWrt: it already unmaps large chunks, and has no
``mallopt``): a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Above this, a buffer gets its own mapping. Frames are 64 KiB chunks on the
#: wire path; message-sized buffers are far above.
LARGE_BUFFER = 256 * 1024


def release_large_buffers(threshold: int = LARGE_BUFFER) -> bool:
    """Pin glibc's mmap and trim thresholds; True when it took effect."""
    libc = _libc()
    if libc is None:
        return False
    with contextlib.suppress(AttributeError):
        import ctypes

        mallopt = libc.mallopt
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
        # Trim the heap top once this much is free there (the default moves with
        # the mmap threshold; pinned like it).
        return ok and bool(mallopt(M_TRIM_THRESHOLD, 2 * threshold))
    return False


def _libc() -> Any:
    """The C library this process already runs on (a ``ctypes.CDLL``), or None.

    Not ``ctypes.util.find_library("c")``: that runs ``/sbin/ldconfig -p`` (then looks
    for gcc and ld) in a child process, and in the bundle on a router there is none of
    them, so it returned None and the thresholds were never pinned there (the bundle
    carries its own glibc). ``CDLL(None)`` is ``dlopen(NULL)``: no search, no child."""
    try:
        import ctypes

        return ctypes.CDLL(None)
    except (ImportError, OSError):
        return None


#: Seconds after a node serves (or a REPL's session opens) before its start-up heap is
#: frozen: the services, the first mesh links and mDNS registration are built by then.
FREEZE_AFTER_S = 5.0


def freeze_startup_heap() -> int:
    """Collect once, then take every object alive now out of the cyclic collector's
    scans (``gc.freeze``); returns how many were frozen.

    An idle node holds ~50,000 tracked objects made at start (modules, classes,
    functions, config, tables) that live as long as the process. Python's full
    collection walks all of them each time: 10-30 ms on this VM, during which the
    event loop answers nothing, so each one lands on the latency of every call in
    flight (bench/rpc_inproc.py under gc.callbacks: 2 full collections per 8,000 calls,
    18-27 ms each; 1.5 ms once frozen). Frozen objects that die later are never freed
    (until ``gc.unfreeze``): that is why this runs once, after start, on what start
    left alive; nothing made per call or per connection afterwards is affected.
    A process-wide setting, so only the program that owns the process calls it
    (``qpc node``, ``qpc repl`` and ``qpc`` through :func:`freeze_startup_heap_later`), not
    the :class:`~qpc_node.node.Node` class or the REPL's classes (tests run many)."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def freeze_startup_heap_later(delay: float = FREEZE_AFTER_S) -> None:
    """:func:`freeze_startup_heap` once ``delay`` seconds have passed (a task of the
    command's own nursery: cancelled with it if the command ends first).

    Every long-lived qpc process does it: ``qpc node`` once it serves, and a REPL
    (``qpc repl``, ``qpc`` with its node in the same process) once its session is
    open, since a full collection stalls the REPL's calls and screen the same way
    (bench/rpc_bench.py's client, in a REPL's role: p99 37 -> 30 ms at 64 in flight,
    half of the slowest 1 % had waited on a 28 ms full collection)."""
    import trio

    from qpc_node.ops.log import get_logger

    await trio.sleep(delay)
    frozen = freeze_startup_heap()
    get_logger("qpc.memory").debug("start-up heap frozen", extra={"objects": frozen})
