"""Before/after pairs of one bench: this tree against a git revision, alternated.

    .venv/bin/python bench/pairs.py --base HEAD~1 --pairs 5 -- bench/rpc_bench.py --rounds 1

A shared machine drifts (load, CPU steal, frequency) over minutes, so a change is judged
by runs of the old and the new tree taken in turns in one session, never against a
figure from another day. This checks out ``--base`` as a detached git worktree in a
temporary directory, copies in the built files a checkout lacks (``--copy``: the Rust
core by default, which ``git worktree`` does not build), then runs the bench command
alternately from each tree (``PYTHONPATH`` and the working directory set to that tree,
the order flipping every pair) and removes the worktree afterwards.

From each run's output it takes every ``name=value`` with a numeric value (the benches'
last lines: ``rpc calls/s ratio=1.79``, ``node msgs_per_s=2296 cpu_ms_per_msg=0.308``) and
prints them per run and as medians per tree, with the CPU steal over each run
(``/proc/stat``). ``--keys`` picks which names are shown (default: all). Each run is
bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
_VALUE = re.compile(r"=(-?\d+(?:\.\d+)?)(?![\w.])")


def figures(output: str) -> dict[str, float]:
    """Every numeric ``name=value`` in ``output``. The name is the text before the ``=``
    back to the previous figure on its line (``rpc calls/s ratio=2.03`` is "rpc calls/s
    ratio", ``node msgs_per_s=2296 cpu_ms_per_msg=0.308`` two figures); a later line wins."""
    found: dict[str, float] = {}
    for line in output.splitlines():
        start = 0
        for m in _VALUE.finditer(line):
            name = line[start : m.start()].strip(" ,;:()")
            if name:
                found[name] = float(m.group(1))
            start = m.end()
    return found


def steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far; (0, 0) without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """CPU steal (%) between two :func:`steal_ticks` readings; 0.0 without /proc/stat."""
    ticks = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / ticks if ticks > 0 else 0.0


def run_once(tree: Path, command: list[str], timeout: float) -> tuple[dict[str, float], float]:
    """One run of ``command`` from ``tree``: its figures and the CPU steal (%) meanwhile."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = steal_ticks()
    proc = subprocess.run(
        [sys.executable, *command],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    after = steal_ticks()
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed in {tree} (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return figures(proc.stdout), steal_percent(before, after)


def add_worktree(repo: Path, rev: str, where: Path, copy: list[str]) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(where), rev],
        check=True,
    )
    for rel in copy:
        src = repo / rel
        if not src.exists():
            raise SystemExit(f"--copy {rel}: not in {repo} (build it first)")
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, where / rel)


def remove_worktree(repo: Path, where: Path) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "remove", "--force", str(where)],
        check=False,
        capture_output=True,
    )
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="git revision of the 'before' tree")
    p.add_argument("--pairs", type=int, default=4, help="before/after pairs (1-50)")
    p.add_argument("--repo", type=Path, default=HERE, help="the 'after' tree (default: this one)")
    p.add_argument(
        "--copy",
        action="append",
        default=None,
        help="a built file to copy into the base worktree, relative to the repo\n"
        "(repeatable; default: qpc_node/_core.abi3.so)",
    )
    p.add_argument("--keys", default="", help="comma-separated figure names to show (default: all)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- bench/X.py [its arguments]")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the bench after --, e.g. -- bench/rpc_bench.py --rounds 1")
    if not 1 <= a.pairs <= 50:
        p.error("--pairs must be within [1, 50]")
    repo = a.repo.resolve()
    copy = a.copy if a.copy is not None else ["qpc_node/_core.abi3.so"]

    runs: dict[str, list[tuple[dict[str, float], float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="qpc-pairs-") as tmp:
        base = Path(tmp) / "base"
        add_worktree(repo, a.base, base, copy)
        try:
            trees = {"before": base, "after": repo}
            for n in range(a.pairs):
                order = ["before", "after"] if n % 2 == 0 else ["after", "before"]
                for side in order:
                    t0 = time.monotonic()
                    found, steal = run_once(trees[side], command, a.timeout)
                    runs[side].append((found, steal))
                    print(
                        f"pair {n + 1} {side:6} {time.monotonic() - t0:6.1f} s, load "
                        f"{os.getloadavg()[0]:.2f}, steal {steal:.1f} %",
                        flush=True,
                    )
        finally:
            remove_worktree(repo, base)

    names = [k for k in a.keys.split(",") if k] or sorted(
        set().union(*(f.keys() for side in runs.values() for f, _ in side))
    )
    print(f"pairs: {a.pairs}, before = {a.base}, after = {repo}: {' '.join(command)}")
    for name in names:
        cells = []
        for side in ("before", "after"):
            values = [f[name] for f, _ in runs[side] if name in f]
            if values:
                listed = " / ".join(f"{v:g}" for v in values)
                cells.append(f"{side} {listed} (median {statistics.median(values):g})")
            else:
                cells.append(f"{side} -")
        print(f"{name}: {'; '.join(cells)}")
    for side in ("before", "after"):
        print(f"cpu steal % {side}: {' / '.join(f'{s:.1f}' for _, s in runs[side])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
