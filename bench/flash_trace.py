"""WAL frames per delivered message by commit kind and B-tree, in a real node, and
the bytes the payload log (schema v15) appended.

bench/node_bench.py says how many bytes the node writes per message; this says where
they go. It makes a traced copy of a source tree (``qpc_node`` only) whose
``store/sql.py`` transaction helper, after every COMMIT, reads the frames the commit
appended to the WAL, maps each page to the table or index that owns it (``dbstat``,
at that moment: a freed page may belong to another tree later) and counts them per
calling Store method (enqueue_many, ack, reclaim, ...). The node writes the counts as
JSON at exit. Diagnostic only: the dbstat scan per commit costs CPU and reads, not
writes.

    .venv/bin/python bench/flash_trace.py make /tmp/traced [--src DIR]
    QPC_FLASH_TRACE=/tmp/trace.json QPC_BENCH_NODE_SRC=/tmp/traced \\
        .venv/bin/python bench/node_bench.py --messages 1000 --no-strace
    .venv/bin/python bench/flash_trace.py show /tmp/trace.json --messages 16000
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRACER = """

# --- flash trace (bench/flash_trace.py; a diagnostic copy, never the real tree) ---
import atexit as _atexit
import json as _json
import os as _os
import traceback as _tb

_TRACE: dict[str, dict[str, int]] = {}
_POS: dict[str, object] = {"salt": b"", "off": 32}
_KINDS = (
    "enqueue_many", "ack", "reclaim", "expire_messages", "relay_handover",
    "upload_keypackages", "audit_append", "meta_put",
)


def _trace_commit(conn: sqlite3.Connection) -> None:
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        with open(path + "-wal", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    if len(data) < 32:
        return
    salt = data[16:24]
    if salt != _POS["salt"]:  # the WAL restarted after a checkpoint
        _POS["salt"], _POS["off"] = salt, 32
    frame = int.from_bytes(data[8:12], "big") + 24
    off = int(_POS["off"])  # type: ignore[call-overload]
    pages = []
    while off + frame <= len(data) and data[off + 8 : off + 16] == salt:
        pages.append(int.from_bytes(data[off : off + 4], "big"))
        off += frame
    _POS["off"] = off
    kind = "other"
    for fr in reversed(_tb.extract_stack()):
        if fr.name in _KINDS:
            kind = fr.name
            break
    owner = {int(p): str(n) for n, p in conn.execute("SELECT name, pageno FROM dbstat")}
    by = _TRACE.setdefault(kind, {})
    by["(commits)"] = by.get("(commits)", 0) + 1
    by["(bytes)"] = by.get("(bytes)", 0) + len(pages) * frame
    for p in pages:
        name = owner.get(p, "(freelist)" if p != 1 else "(header)")
        by[name] = by.get(name, 0) + 1


def _dump() -> None:
    out = _os.environ.get("QPC_FLASH_TRACE")
    if out:
        with open(out, "w") as f:
            _json.dump(_TRACE, f, indent=1, sort_keys=True)


_atexit.register(_dump)
"""

HOOK = """        conn.execute("COMMIT")
        committed = True
"""

LOG_HOOK = """            self._sizes[self._seg] += len(data)
"""
LOG_TRACE = """            from qpc_node.store import sql as _sql  # flash trace

            _t = _sql._TRACE.setdefault("(payload log)", {"(commits)": 0, "(bytes)": 0})
            _t["(commits)"] += 1
            _t["(bytes)"] += len(data)
"""


def make(dest: Path, src: Path) -> None:
    target = dest / "qpc_node"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(src / "qpc_node", target, ignore=shutil.ignore_patterns("__pycache__"))
    sql = target / "store" / "sql.py"
    text = sql.read_text()
    if HOOK not in text:
        raise SystemExit(f"{sql}: transaction() is not what this tracer expects")
    text = text.replace(HOOK, HOOK + "        _trace_commit(conn)\n", 1)
    sql.write_text(text + TRACER)
    log = target / "store" / "payload_log.py"  # schema v15: the payloads' own writes
    if log.exists():
        text = log.read_text()
        if LOG_HOOK not in text:
            raise SystemExit(f"{log}: PayloadLog.sync is not what this tracer expects")
        log.write_text(text.replace(LOG_HOOK, LOG_HOOK + LOG_TRACE, 1))
    print(f"traced copy in {dest} (run the node bench with QPC_BENCH_NODE_SRC={dest})")


def show(path: Path, messages: int) -> None:
    data = json.loads(path.read_text())
    total = 0.0
    for kind, by in sorted(data.items()):
        commits = by.pop("(commits)")
        size = by.pop("(bytes)")
        frames = sum(by.values())
        per = size / frames if frames else 0
        total += size
        print(f"{kind}: {commits} commits, {size / messages:,.0f} B/msg")
        for name, n in sorted(by.items(), key=lambda kv: -kv[1]):
            if n * per / messages >= 1:
                print(f"    {name:<28} {n * per / messages:>7,.0f} B/msg  ({n} frames)")
    print(f"WAL frames (and payload log) in all: {total / messages:,.0f} B per delivered message")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="make a traced copy of qpc_node")
    m.add_argument("dest", type=Path)
    m.add_argument("--src", type=Path, default=REPO, help="tree with qpc_node (default: this)")
    s = sub.add_parser("show", help="print a trace")
    s.add_argument("trace", type=Path)
    s.add_argument("--messages", type=int, default=16000, help="delivered in the bench run")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.dest, args.src)
    else:
        show(args.trace, args.messages)


if __name__ == "__main__":
    main()
