"""Size report for cross/build.sh, and the budget gate.

Writes dist/size-ARCH.txt (package, installed tree, onefile variant, largest parts of
the bundle) and exits 1 when the .ipk of ARCH is larger than its budget in
cross/budget.toml, so a dependency that doubles the package fails the build.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

MiB = 1024 * 1024


def tree_size(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def goal_of(budget: dict[str, int], arch: str) -> int:
    """Issue 15's goal for ``arch``: ``goal_ARCH`` where one is set (armv7: 11 MiB), else
    ``goal`` (12 MiB)."""
    return int(budget.get(f"goal_{arch}", budget.get("goal", 0)))


def check_budget(ipk: Path, arch: str, budget_file: Path) -> tuple[bool, str]:
    budget = tomllib.loads(budget_file.read_text())["ipk"]
    limit = int(budget.get(arch, 0))
    goal = goal_of(budget, arch)
    size = ipk.stat().st_size
    if not limit:
        return True, f"budget: none set for {arch} ({size / MiB:.2f} MiB)"
    verdict = "OK" if size <= limit else "OVER BUDGET"
    line = (
        f"budget: {verdict} {ipk.name} {size} B = {size / MiB:.2f} MiB of {limit / MiB:.2f} MiB"
        f" (goal {goal / MiB:.0f} MiB: {(size - goal) / MiB:+.2f} MiB)"
    )
    return size <= limit, line


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dist", type=Path, required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--budget", type=Path, required=True)
    ap.add_argument("--seconds", type=int, default=0)
    ap.add_argument("--ipk", type=Path, help="the package cross/build.sh just made")
    a = ap.parse_args()

    lines = [f"qpc {a.version} {a.arch} (build {a.seconds} s)"]
    ok = True
    root = a.dist / f"root-{a.arch}"
    ipk = a.ipk or a.dist / f"qpc_{a.version}_{a.arch}.ipk"
    if root.is_dir():
        lines.append(f"installed tree (one-dir): {tree_size(root) / MiB:.2f} MiB  {root}")
        internal = root / "usr/lib/qpc/_internal"
        parts = sorted(
            (
                (tree_size(p) if p.is_dir() else p.stat().st_size, p.name)
                for p in internal.iterdir()
            ),
            reverse=True,
        )
        for size, name in parts[:12]:
            lines.append(f"  {size / MiB:7.2f} MiB  _internal/{name}")
    if ipk.is_file():
        lines.append(f"package: {ipk.stat().st_size / MiB:.2f} MiB  {ipk}")
        ok, verdict = check_budget(ipk, a.arch, a.budget)
        lines.append(verdict)
    onefile = a.dist / f"qpc-{a.arch}.onefile"
    if onefile.is_file():
        lines.append(f"onefile+staticx: {onefile.stat().st_size / MiB:.2f} MiB  {onefile}")
    if ipk.is_file():  # the figure issue 15 asks for, against its goal, last
        goal = goal_of(tomllib.loads(a.budget.read_text())["ipk"], a.arch)
        size = ipk.stat().st_size
        lines.append(
            f"ipk_mib={size / MiB:.2f}"
            + (f" goal_mib={goal / MiB:.2f} ratio={size / goal:.2f}" if goal else "")
        )
    text = "\n".join(lines) + "\n"
    (a.dist / f"size-{a.arch}.txt").write_text(text)
    sys.stdout.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
