"""Fixtures for the packaged `qpc` (cross/build.sh output in dist/; `make package` builds it)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pkg_rootfs import (
    DIST,
    OPKG_ARCH,
    TREE,
    BusyboxRoot,
    VethPair,
    busybox_is_static,
    busybox_root,
    missing,
    veth_namespaces,
)


def _need_tree() -> None:
    if not (TREE / "usr/bin/qpc").is_file():
        missing(f"no packaged qpc in {TREE}: run `make package` (cross/build.sh)")


def _need_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (chroot, mount, ip netns)")
    if not busybox_is_static():
        missing("needs a static /bin/busybox (apt install busybox-static)")


@pytest.fixture
def tree() -> Path:
    _need_tree()
    return TREE


@pytest.fixture
def ipk() -> Path:
    found = sorted(DIST.glob(f"qpc_*_{OPKG_ARCH}.ipk"))
    if not found:
        missing(f"no qpc_*_{OPKG_ARCH}.ipk in {DIST}: run `make package`")
    return found[-1]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[BusyboxRoot]:
    _need_tree()
    _need_root()
    with busybox_root(tmp_path / "root") as r:
        yield r


@pytest.fixture
def netns_pair() -> Iterator[VethPair]:
    _need_root()
    if shutil.which("ip") is None:
        missing("needs the `ip` command (iproute2)")
    with veth_namespaces() as pair:
        yield pair


@pytest.fixture
def two_roots(tmp_path: Path) -> Iterator[tuple[BusyboxRoot, BusyboxRoot]]:
    _need_tree()
    _need_root()
    with busybox_root(tmp_path / "a") as a, busybox_root(tmp_path / "b") as b:
        yield a, b
