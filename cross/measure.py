"""Measure the packaged qpc in a busybox-only root: start time, RAM, tmpfs, idle node.

Usage (root): python cross/measure.py [--runs 7] [--idle 60]
A cross build: QPC_TEST_ARCH=aarch64 QPC_BUSYBOX=<that arch's static busybox> with binfmt_misc
on (as cross/test-arch.sh sets up); its figures are qemu-user's, not the hardware's.
Compares the one-dir layout (dist/root-ARCH) with the onefile+staticx variant
(dist/qpc-ARCH.onefile) when both were built (cross/build.sh --layout both).
Prints a table; numbers are for the machine it runs on.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/packaging"))
from pkg_rootfs import ARCH, DIST, BusyboxRoot, busybox_root

MiB = 1024 * 1024


def peak_tmp(root: BusyboxRoot, proc: subprocess.Popen[str], stop: threading.Event) -> list[int]:
    peak = [0]

    def poll() -> None:
        while not stop.is_set() and proc.poll() is None:
            peak[0] = max(peak[0], root.tmp_used())
            time.sleep(0.005)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    proc.wait(timeout=120)
    stop.set()
    t.join(timeout=5)
    return peak


def one_run(root: BusyboxRoot, cmd: list[str]) -> tuple[float, int, int]:
    """wall seconds, peak tmpfs bytes, peak RSS bytes of the largest process of the tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        root.argv(*cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak = peak_tmp(root, proc, threading.Event())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd}: rc={proc.returncode} {proc.stderr.read() if proc.stderr else ''}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak[0] - root.tmp_used(), max(rss, before) * 1024


def tree_pids(top: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [top]
    while todo and len(out) < 100:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def rss_cpu(pids: list[int]) -> tuple[int, float]:
    rss, ticks = 0, 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
        ticks += int(stat[11]) + int(stat[12])
    return rss, ticks / os.sysconf("SC_CLK_TCK")


def idle_node(root: BusyboxRoot, cmd: list[str], idle: float) -> str:
    proc = subprocess.Popen(
        root.argv(
            *cmd,
            "node",
            "--listen",
            "127.0.0.1:0",
            "--data",
            "/data/node",
            env={"QPC_METRICS_LISTEN": ""},
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = ""
        for _ in range(50):  # log lines come first; bounded (the node prints within seconds)
            line = proc.stdout.readline()
            if not line or "listening" in line:
                break
        if "listening" not in line:
            return f"node did not start: {line.strip()}"
        time.sleep(2)
        _, cpu0 = rss_cpu(tree_pids(proc.pid))
        time.sleep(idle)
        rss, cpu1 = rss_cpu(tree_pids(proc.pid))
        return (
            f"idle node after {idle + 2:.0f} s: RSS {rss / MiB:.1f} MiB, "
            f"CPU {cpu1 - cpu0:.2f} s over {idle:.0f} s ({100 * (cpu1 - cpu0) / idle:.2f} %), "
            f"tmpfs {root.tmp_used() / MiB:.1f} MiB"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--idle", type=float, default=60)
    a = ap.parse_args()
    print(f"arch {ARCH} on a {platform.machine()} host (load {os.getloadavg()[0]:.1f})")
    onefile = DIST / f"qpc-{ARCH}.onefile"
    with tempfile.TemporaryDirectory() as tmp, busybox_root(Path(tmp) / "r") as root:
        variants = [("one-dir", ["qpc"])]
        if onefile.is_file():
            shutil.copy2(onefile, root.path / "usr/bin/qpc-onefile")
            variants.append(("onefile+staticx", ["qpc-onefile"]))
        for name, cmd in variants:
            runs = [one_run(root, [*cmd, "version"]) for _ in range(a.runs)]
            wall = statistics.median(r[0] for r in runs)
            print(
                f"{name}: `qpc version` median {wall:.3f} s of {a.runs} "
                f"(min {min(r[0] for r in runs):.3f}); peak tmpfs {max(r[1] for r in runs) / MiB:.1f} MiB; "
                f"peak RSS {max(r[2] for r in runs) / MiB:.1f} MiB"
            )
            if a.idle > 0 and root.run(*cmd, "node", "--help").returncode == 0:
                print(f"{name}: " + idle_node(root, cmd, a.idle))
            elif a.idle > 0:
                print(f"{name}: `qpc node` not in this build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
