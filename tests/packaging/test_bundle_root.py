"""The packaged qpc runs in a root holding only busybox, /tmp and /proc — no libc."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from pathlib import Path

from pkg_rootfs import ARCH, BusyboxRoot, cross_module

FPR = re.compile(r"fingerprint:\s*([0-9A-Fa-f ]{16,})")


def test_root_has_no_c_library(root: BusyboxRoot) -> None:
    for d in ("lib", "lib64", "usr/lib64", "etc"):
        assert not (root.path / d).exists(), d
    assert sorted(p.name for p in (root.path / "usr/lib").iterdir()) == ["qpc"]


def test_version(root: BusyboxRoot) -> None:
    r = root.run("qpc", "version")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"qpc \d+\.\d+\.\d+\S* \(core \S+\)\n", r.stdout), r.stdout


def test_start_unpacks_nothing(root: BusyboxRoot) -> None:
    """The one-dir layout runs in place: /tmp (RAM on OpenWrt) stays as it was."""
    before = root.tmp_used()
    r = root.run("qpc", "version")
    assert r.returncode == 0, r.stderr
    assert root.tmp_used() == before
    assert list((root.path / "tmp").iterdir()) == []


def test_id_creates_then_reopens_identity(root: BusyboxRoot) -> None:
    first = root.run("qpc", "id", "--data", "/data", "--no-qr")
    assert first.returncode == 0, first.stderr
    assert "created a new identity" in first.stdout
    m = FPR.search(first.stdout)
    assert m, first.stdout
    key = root.path / "data/secret.key"
    assert key.is_file() and key.stat().st_mode & 0o077 == 0
    again = root.run("qpc", "id", "--data", "/data", "--no-qr")
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout
    m2 = FPR.search(again.stdout)
    assert m2 and m2.group(1) == m.group(1)


def has_subcommand(root: BusyboxRoot, name: str) -> bool:
    return root.run("qpc", name, "--help", timeout=30).returncode == 0


NODE_LINE = re.compile(r"listening on (\S+):(\d+) pin=([0-9A-Fa-f]+)")


def wait_for_node(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, int, str]:
    """Read the node's output until its 'listening on HOST:PORT pin=FPR' line (bounded).

    Reads the raw descriptor: select() cannot see lines already sitting in a
    TextIOWrapper's buffer, so readline() after select() can miss the line we want.
    """
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
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
            return m.group(1), int(m.group(2)), m.group(3)
    raise AssertionError(
        f"node did not report listening (rc={proc.poll()}):\n" + buf.decode(errors="replace")
    )


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_node_answers_health(root: BusyboxRoot) -> None:
    assert has_subcommand(root, "node"), "`qpc node` missing from the bundle"
    from health_probe import probe

    proc = root.popen(
        "qpc",
        "node",
        "--listen",
        "127.0.0.1:0",
        "--data",
        "/data/node",
        env={"QPC_METRICS_LISTEN": ""},
    )
    try:
        _host, port, pin = wait_for_node(proc)
        status = probe("127.0.0.1", port, pin)
        assert status == "SERVING"
        assert list((root.path / "tmp").iterdir()) == []
    finally:
        stop(proc)


def test_backup_then_restore_from_the_bundle(root: BusyboxRoot) -> None:
    """`qpc backup` and `qpc restore` as an operator runs them on the router.

    The bundle's Python is Debian's 3.11.2: restore once called ``extractall(filter=...)``,
    which only 3.11.4 has, and raised TypeError here while the development venv passed.
    """
    proc = root.popen(
        "qpc", "node", "--listen", "127.0.0.1:0", "--data", "/data/node",
        env={"QPC_METRICS_LISTEN": ""},
    )  # fmt: skip
    try:
        wait_for_node(proc)
    finally:
        stop(proc)
    env = {"QPC_BACKUP_PASSPHRASE": "correct horse battery"}
    b = root.run("qpc", "backup", "/data/node.qpcbak", "--data", "/data/node", env=env)
    assert b.returncode == 0, b.stderr[-2000:]
    r = root.run("qpc", "restore", "/data/node.qpcbak", "--data", "/data/copy", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (root.path / "data/copy/node.db").is_file()


def test_bundle_carries_one_openssl(tree: Path) -> None:
    """cryptography is built against the libcrypto Python's ssl uses (cross/requirements-bundle.txt),
    not PyPI's wheel with a second, static OpenSSL inside."""
    internal = tree / "usr/lib/qpc/_internal"
    assert [p.name for p in internal.rglob("libcrypto*")] == ["libcrypto.so.3"]
    rust = internal / "cryptography/hazmat/bindings/_rust.abi3.so"
    dyn = subprocess.run(["readelf", "-d", str(rust)], capture_output=True, text=True, check=True)
    assert "[libcrypto.so.3]" in dyn.stdout and "[libssl.so.3]" in dyn.stdout
    ssl_mod = next(internal.glob("python3.11/lib-dynload/_ssl.*.so"))
    dyn = subprocess.run(
        ["readelf", "-d", str(ssl_mod)], capture_output=True, text=True, check=True
    )
    assert "[libcrypto.so.3]" in dyn.stdout


def test_bundle_carries_no_libstdcxx_and_closes_its_needed_graph(tree: Path) -> None:
    """protobuf's upb module NEEDs libstdc++ without binding a symbol of it; cross/build.sh
    drops that entry (cross/drop_needed.py), so the 2.1 MiB library is not carried. Every
    ELF's NEEDED entries must still be in _internal (the launcher sets no other path), and
    upb stays the compiled module where the arch has its wheel (armv7 has none)."""
    needed = cross_module("drop_needed").needed
    internal = tree / "usr/lib/qpc/_internal"
    assert not (internal / "libstdc++.so.6").exists()
    present = {p.name for p in internal.iterdir()}

    for elf in [tree / "usr/lib/qpc/qpc", *internal.rglob("*.so*")]:
        if elf.is_file() and not elf.is_symlink() and elf.read_bytes()[:4] == b"\x7fELF":
            missing_libs = set(needed(elf.read_bytes())) - present
            assert not missing_libs, (elf, missing_libs)
    upb = list(internal.glob("google/_upb/_message*.so"))
    if ARCH != "armv7":
        assert upb, "protobuf's upb module is not in the bundle (pure-Python fallback)"
