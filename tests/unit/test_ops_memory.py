"""ops/memory.py pins glibc's thresholds wherever the node runs, the bundle on a router too."""

from __future__ import annotations

import platform
import subprocess
import sys

from tests.ci_needs import unavailable

# As on a router: the bundle carries glibc, but there is no /sbin/ldconfig, gcc or ld, so
# ctypes.util.find_library("c") finds nothing; and no child process may be needed for it.
ROUTER = """
import ctypes.util, subprocess
ctypes.util.find_library = lambda name: None
def no_child(*a, **k):
    raise AssertionError(f"spawned {a[0]!r}")
subprocess.Popen = no_child
from qpc_node.ops.memory import release_large_buffers
print(release_large_buffers())
"""


def test_thresholds_pinned_without_find_library() -> None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        unavailable("the glibc threshold test", "glibc only")
    out = subprocess.run(
        [sys.executable, "-c", ROUTER], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "True", out.stderr


FREEZE = """
import gc, weakref
from qpc_node.ops.memory import freeze_startup_heap

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

dead_before = cycle()          # garbage already at the freeze: collected, not frozen
kept = Node(); kept.me = kept  # alive at the freeze: frozen
frozen = freeze_startup_heap()
dead_after = cycle()           # made after the freeze: collected as usual
gc.collect()
print(frozen, dead_before() is None, dead_after() is None, gc.get_freeze_count() == frozen)
"""


def test_freeze_startup_heap_spares_what_comes_after() -> None:
    """Process-wide, so in a child: what start left alive is frozen once; garbage that
    existed then is collected first, and cycles made afterwards are still collected."""
    out = subprocess.run(
        [sys.executable, "-c", FREEZE], capture_output=True, text=True, timeout=60, check=True
    )
    frozen, before, after, count = out.stdout.split()
    assert int(frozen) > 1000 and (before, after, count) == ("True", "True", "True"), out
