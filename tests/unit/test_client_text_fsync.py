"""A group text costs one fsync of client.db, not two (docs/groups.md, "What a restart
remembers"): the kept copy of our text (``branch_texts``, for a resend if its branch
loses) is committed without a sync of its own and made durable by the outbox commit of
its envelopes that follows on the same connection (one WAL, synced as a whole).

Counted with strace in a child process (the syscalls SQLite makes are not visible from
Python); a process killed right after the text was kept still has it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from qpc_node.client.state import ClientState
from tests.ci_needs import unavailable

SECRET = b"s" * 32
GID = b"g" * 16
TEXTS = 20

_CHILD = """
import os, sys
from pathlib import Path
from qpc_node.client.state import ClientState
st = ClientState(Path(sys.argv[1]), b"s" * 32)
gid = b"g" * 16
st.branch_save(gid, b"state", live_tags=[b"A" * 16])
for k in range(int(sys.argv[2])):
    st.branch_text_add(gid, b"id-%d" % k, b"A" * 16, b"body", 1_000)
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), 9)
    st.outbox_add_many([(b"m-%d" % k, b"envelope")], 1_000)
st.close()
"""


def _syncs(tmp: Path, n: int) -> int:
    """fsync/fdatasync calls of a child that keeps and queues ``n`` texts."""
    data = tmp / f"d{n}"
    data.mkdir()
    trace = tmp / f"trace{n}"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync",
            "-o",
            str(trace),
            sys.executable,
            "-c",
            _CHILD,
            str(data),
            str(n),
            "send",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0 and b"ptrace" in proc.stderr:
        unavailable("the fsync count", f"strace cannot trace here: {proc.stderr[:200]!r}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sum(1 for line in trace.read_text().splitlines() if "sync(" in line)


def test_a_group_text_costs_one_fsync(tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        unavailable("the fsync count", "strace is not installed")
    per_text = (_syncs(tmp_path, TEXTS) - _syncs(tmp_path, 0)) / TEXTS
    assert per_text == 1, per_text


def test_a_kept_text_survives_a_kill_and_the_connection_syncs_fully_again(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), "1", "kill"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    st = ClientState(tmp_path, SECRET)
    assert [t.app_id for t in st.branch_texts_after(GID, 0)] == [b"id-0"]
    st.branch_text_add(GID, b"id-1", b"A" * 16, b"body", 1_000)
    assert st._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    st.close()
