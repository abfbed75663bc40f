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
import re
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/packaging"))
from pkg_rootfs import ARCH, DIST, BusyboxRoot, busybox_root, veth_namespaces

HERE = Path(__file__).resolve().parent

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


# Up to the newline: a read can end in the middle of the fingerprint.
NODE_LINE = re.compile(r"listening on (\S+):(\d+) pin=([0-9A-Fa-f]+)\r?\n")

# Runs inside the node's network namespace, started before the node so its own Python start
# is not counted: reads "PORT PIN" from stdin, calls Health until it answers, prints the
# CLOCK_MONOTONIC time (shared by every namespace) of the answer.
PROBER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from health_probe import probe
import qpc_node.client.connect, qpc_node.rpc.client, qpc_node.rpc.health  # before the clock starts
from qpc_node.wire.gen.qpc.v1 import health_pb2
port, pin = sys.stdin.readline().split()
deadline = time.monotonic() + 30
while True:
    try:
        status = probe("127.0.0.1", int(port), pin, seconds=2.0)
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
print(time.monotonic(), status, flush=True)
"""


def wait_line(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[float, int, str]:
    """(monotonic time of) the node's 'listening on HOST:PORT pin=FPR' line, bounded."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    while time.monotonic() < deadline and len(buf) < 1 << 20:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        m = NODE_LINE.search(buf.decode(errors="replace"))
        if m:
            return time.monotonic(), int(m.group(2)), m.group(3)
    raise SystemExit(
        f"node did not report listening (rc={proc.poll()}):\n{buf.decode(errors='replace')}"
    )


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def node_env(dev: str, metrics: bool) -> dict[str, str]:
    """The router's node: mesh discovery (mDNS on the mesh link) and federation on."""
    return {
        "QPC_MESH_MDNS": "1",
        "QPC_MESH_INTERFACES": dev,
        "QPC_METRICS_LISTEN": "127.0.0.1:9101" if metrics else "",
    }


def health_start(
    root: BusyboxRoot, cmd: list[str], dev: str, n: int
) -> tuple[list[float], list[float]]:
    """Seconds from starting `qpc node` to its first Health answer, ``n`` times; and the
    node's CPU seconds (user + system) at that answer, which moves less with the load of
    a shared machine than the wall time does."""
    out, cpu = [], []
    for i in range(n):
        prober = subprocess.Popen(
            [*root.prefix, sys.executable, "-c", PROBER, str(HERE.parent / "tests/packaging")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        shutil.rmtree(root.path / f"data/start{i}", ignore_errors=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            root.argv(
                *cmd,
                "node",
                "--listen",
                "127.0.0.1:0",
                "--data",
                f"/data/start{i}",
                env=node_env(dev, metrics=False),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _, port, pin = wait_line(proc)
            answer, _ = prober.communicate(f"{port} {pin}\n", timeout=60)
            out.append(float(answer.split()[0]) - t0)
            cpu.append(rss_cpu(tree_pids(proc.pid))[1])
        finally:
            stop(proc)
            if prober.poll() is None:
                prober.kill()
                prober.wait(timeout=10)
    return out, cpu


def idle_node(
    root: BusyboxRoot, cmd: list[str], dev: str, idle: float, metrics: bool
) -> tuple[int, float]:
    """RSS (bytes) of the node's process tree after ``idle`` + 2 s, and its CPU seconds over ``idle``."""
    proc = subprocess.Popen(
        root.argv(
            *cmd,
            "node",
            "--listen",
            "0.0.0.0:0",
            "--data",
            "/data/node-metrics" if metrics else "/data/node",
            env=node_env(dev, metrics),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_line(proc)
        time.sleep(2)
        _, cpu0 = rss_cpu(tree_pids(proc.pid))
        time.sleep(idle)
        rss, cpu1 = rss_cpu(tree_pids(proc.pid))
        if proc.poll() is not None:
            raise SystemExit(f"node exited during the idle run (rc={proc.returncode})")
        return rss, cpu1 - cpu0
    finally:
        stop(proc)


def bare_rss(root: BusyboxRoot, cmd: list[str], deps: bool = False) -> int:
    """The reference: the bundled interpreter started by the same bootloader, nothing of qpc
    imported (cross/qpc_entry.py reports its own VmRSS under QPC_MEASURE_BARE); with
    ``QPC_MEASURE_DEPS`` the same after importing the node's dependencies (trio, aioquic,
    cryptography, zeroconf, protobuf, msgspec, sqlite3) but none of qpc's modules (a bundle
    built before that mode reads only QPC_MEASURE_BARE and reports the bare figure)."""
    env = {"QPC_MEASURE_BARE": "1"}
    if deps:
        env["QPC_MEASURE_DEPS"] = "1"
    r = root.run(*cmd, env=env)
    if r.returncode != 0 or not r.stdout.strip().isdigit():
        raise SystemExit(f"bare interpreter: rc={r.returncode} {r.stdout!r} {r.stderr!r}")
    return int(r.stdout) * 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--idle", type=float, default=60)
    a = ap.parse_args()
    print(f"arch {ARCH} on a {platform.machine()} host (load {os.getloadavg()[0]:.1f})")
    onefile = DIST / f"qpc-{ARCH}.onefile"
    last: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, busybox_root(Path(tmp) / "r") as host_root:
        variants = [("one-dir", ["qpc"])]
        if onefile.is_file():
            shutil.copy2(onefile, host_root.path / "usr/bin/qpc-onefile")
            variants.append(("onefile+staticx", ["qpc-onefile"]))
        with veth_namespaces() as pair:
            root = host_root.in_netns(pair.ns_a)
            for name, cmd in variants:
                bare = [bare_rss(root, cmd) for _ in range(3)]
                runs = [one_run(root, [*cmd, "version"]) for _ in range(a.runs)]
                wall = statistics.median(r[0] for r in runs)
                bare_mib = statistics.median(bare) / MiB
                deps = [bare_rss(root, cmd, deps=True) for _ in range(3)]
                deps_mib = statistics.median(deps) / MiB
                print(
                    f"{name}: `qpc version` median {wall:.3f} s of {a.runs} "
                    f"(min {min(r[0] for r in runs):.3f}); peak tmpfs {max(r[1] for r in runs) / MiB:.1f} MiB; "
                    f"peak RSS {max(r[2] for r in runs) / MiB:.1f} MiB; bare interpreter RSS {bare_mib:.1f} MiB; "
                    f"with the node's dependencies imported {deps_mib:.1f} MiB"
                )
                if a.idle <= 0 or root.run(*cmd, "node", "--help").returncode != 0:
                    print(f"{name}: `qpc node` not measured")
                    continue
                starts, cpus = health_start(root, cmd, pair.dev_a, a.runs)
                print(
                    f"{name}: `qpc node` to its first Health answer, median {statistics.median(starts):.3f} s "
                    f"of {a.runs} (min {min(starts):.3f}, max {max(starts):.3f}); node CPU by then "
                    f"median {statistics.median(cpus):.2f} s (min {min(cpus):.2f})"
                )
                figures = {}
                for metrics in (False, True):
                    rss, cpu = idle_node(root, cmd, pair.dev_a, a.idle, metrics)
                    figures[metrics] = rss / MiB
                    print(
                        f"{name}: idle node (mDNS on {pair.dev_a}, federation on, metrics "
                        f"{'on' if metrics else 'off'}) after {a.idle + 2:.0f} s: RSS {rss / MiB:.1f} MiB "
                        f"= {rss / MiB / bare_mib:.2f}x the bare interpreter, {rss / MiB - deps_mib:+.1f} MiB "
                        f"over its dependencies alone, CPU {cpu:.2f} s over "
                        f"{a.idle:.0f} s ({100 * cpu / a.idle:.2f} %), tmpfs {root.tmp_used() / MiB:.1f} MiB"
                    )
                if name == "one-dir":
                    last = [
                        f"start version_s={wall:.3f} health_s={statistics.median(starts):.3f} "
                        f"health_cpu_s={statistics.median(cpus):.2f}",
                        f"idle rss_mib={figures[False]:.1f} bare_mib={bare_mib:.1f} "
                        f"ratio={figures[False] / bare_mib:.2f} metrics_on_rss_mib={figures[True]:.1f} "
                        f"deps_mib={deps_mib:.1f}",
                    ]
    ipks = sorted(DIST.glob(f"qpc_*_{ARCH}.ipk"))
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")
    if ipks:
        print(f"ipk_mib={ipks[-1].stat().st_size / MiB:.2f}")
    for line in last:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
