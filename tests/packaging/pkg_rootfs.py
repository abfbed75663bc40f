"""Busybox-only roots and network namespaces for the packaged `qpc` (tests/packaging).

A root holds only /bin/busybox (static) with its applet links, the installed qpc tree
(usr/bin/qpc + usr/lib/qpc), a tmpfs /tmp, /proc and /data: no libc, no /lib, no /etc.
Everything is undone in ``close()``/``finally``; every wait is bounded.
"""

from __future__ import annotations

import importlib
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cross_module(name: str) -> types.ModuleType:
    """A script of cross/ (not a package) imported as a module, e.g. ``drop_needed``."""
    sys.path.insert(0, str(REPO / "cross"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "cross"))


# QPC_TEST_ARCH=aarch64|armv7 tests a cross build (cross/test-arch.sh sets it, with
# QPC_BUSYBOX the static busybox of that arch and binfmt_misc running it under qemu-user).
ARCH = os.environ.get("QPC_TEST_ARCH") or platform.machine()
# cross/build.sh's ARCH -> the OpenWrt architecture in the package (packaging/openwrt/build-ipk.sh)
OPKG_ARCH = {"aarch64": "aarch64_generic", "armv7": "arm_cortex-a7_neon-vfpv4"}.get(ARCH, ARCH)
DIST = Path(os.environ.get("QPC_DIST", REPO / "dist"))
TREE = DIST / f"root-{ARCH}"
BUSYBOX = Path(os.environ.get("QPC_BUSYBOX", "/bin/busybox"))
APPLETS = ("sh", "ls", "cat", "sleep", "ping", "ip", "ifconfig", "kill", "ps", "df", "du")


def busybox_is_static() -> bool:
    if not BUSYBOX.is_file():
        return False
    out = subprocess.run(["readelf", "-l", str(BUSYBOX)], capture_output=True, text=True)
    return out.returncode == 0 and "INTERP" not in out.stdout


def run(cmd: Sequence[str], timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]


def missing(reason: str) -> None:
    """Skip with the reason outside CI; fail in CI (tests/ci_needs.py)."""
    from tests.ci_needs import unavailable

    unavailable("packaging tests", reason)


def shellcheck(*scripts: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``shellcheck -x -S warning`` over ``scripts``; skips the test when it is not installed."""
    if shutil.which("shellcheck") is None:
        missing("shellcheck not installed (apt install shellcheck)")
    return run(["shellcheck", "-x", "-S", "warning", *map(str, scripts)], cwd=cwd)


def _mounted(path: Path) -> bool:
    return run(["mountpoint", "-q", str(path)]).returncode == 0


@dataclass
class BusyboxRoot:
    """A busybox-only root with the qpc tree installed; ``prefix`` enters a netns."""

    path: Path
    prefix: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, path: Path, tree: Path = TREE, tmp_size: str = "256m") -> BusyboxRoot:
        for d in ("bin", "proc", "tmp", "data"):
            (path / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, path / "bin/busybox")
        for applet in APPLETS:
            (path / "bin" / applet).symlink_to("busybox")
        shutil.copytree(tree / "usr", path / "usr", symlinks=True)
        root = cls(path)
        try:
            subprocess.run(["mount", "-t", "proc", "proc", str(path / "proc")], check=True)
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={tmp_size},mode=1777",
                    "tmpfs",
                    str(path / "tmp"),
                ],
                check=True,
            )
        except BaseException:
            root.close()
            raise
        return root

    def argv(self, *cmd: str, env: dict[str, str] | None = None) -> list[str]:
        envs = [f"{k}={v}" for k, v in (env or {}).items()]
        return [
            *self.prefix,
            "chroot",
            str(self.path),
            "/bin/busybox",
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            "HOME=/data",
            *envs,
            *cmd,
        ]

    def run(
        self,
        *cmd: str,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*cmd, env=env), timeout=timeout, input=stdin)

    def popen(self, *cmd: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*cmd, env=env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def tmp_used(self) -> int:
        st = os.statvfs(self.path / "tmp")
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def in_netns(self, ns: str) -> BusyboxRoot:
        return BusyboxRoot(self.path, ["ip", "netns", "exec", ns])

    def close(self) -> None:
        for m in ("tmp", "proc"):
            p = self.path / m
            for _ in range(10):
                if not _mounted(p):
                    break
                if run(["umount", str(p)]).returncode != 0:
                    run(["umount", "-l", str(p)])
                    time.sleep(0.1)


@contextmanager
def busybox_root(path: Path) -> Iterator[BusyboxRoot]:
    root = BusyboxRoot.create(path)
    try:
        yield root
    finally:
        root.close()


@dataclass
class VethPair:
    """Two network namespaces joined by one veth link.

    a: 10.201.N.1/24 and fe80::a on ``dev_a``; b: 10.201.N.2/24 and fe80::b on ``dev_b``.
    """

    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    v4_a: str
    v4_b: str
    ll_a: str = "fe80::a"
    ll_b: str = "fe80::b"


def _ip(*args: str) -> None:
    r = run(["ip", *args])
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@contextmanager
def veth_namespaces() -> Iterator[VethPair]:
    tag = secrets.token_hex(3)
    net = int(tag[:2], 16)
    pair = VethPair(
        f"qpcA{tag}", f"qpcB{tag}", f"qa{tag}", f"qb{tag}", f"10.201.{net}.1", f"10.201.{net}.2"
    )
    created: list[str] = []
    try:
        for ns in (pair.ns_a, pair.ns_b):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip(
            "link",
            "add",
            pair.dev_a,
            "netns",
            pair.ns_a,
            "type",
            "veth",
            "peer",
            "name",
            pair.dev_b,
            "netns",
            pair.ns_b,
        )
        for ns, dev, v4, ll in (
            (pair.ns_a, pair.dev_a, pair.v4_a, pair.ll_a),
            (pair.ns_b, pair.dev_b, pair.v4_b, pair.ll_b),
        ):
            _ip("-n", ns, "link", "set", "lo", "up")
            # no duplicate address detection: the link-local address is usable at once
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0"])
            run(
                ["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.addr_gen_mode=1"]
            )
            _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{ll}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        yield pair
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth (and so both)
            run(["ip", "netns", "pids", ns])
            for pid in run(["ip", "netns", "pids", ns]).stdout.split():
                run(["kill", "-9", pid])
            run(["ip", "netns", "del", ns])
