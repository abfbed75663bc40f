"""ops/memory.py pins glibc's thresholds wherever the node runs, the bundle on a router too."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_thresholds_pinned_without_find_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", ROUTER], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "True", out.stderr
