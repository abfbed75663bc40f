"""A backup's archive is unpacked by qpc's own rules, on every Python the node runs on.

``restore_backup`` used ``extractall(filter="data")``, which the bundle's Python (Debian's
3.11.2, before extraction filters) does not have: restore raised TypeError there. Each
archive below is sealed with the right passphrase, as a tool other than qpc could make it;
anything but the backup's own files and directories is refused as BackupCorrupt, and nothing
is written outside the restore's work directory or into the node's data dir.
"""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest

from qpc_node.ops import backup as bk
from qpc_node.ops.backup import BackupCorrupt, restore_backup

PW = "correct horse battery"


def _sealed(tmp: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    plain = tmp / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    out = tmp / "x.qpcbak"
    bk._seal(plain, out, PW)
    return out


def _file(name: str, mode: int = 0o600) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _dev(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize(
    ("member", "why"),
    [
        ((_file("../evil"), b"x"), "not a relative path"),
        ((_file("/tmp/qpc-evil-abs"), b"x"), "not a relative path"),
        ((_file("node-keys/../../evil"), b"x"), "not a relative path"),
        ((_file("other.txt"), b"x"), "not part of a qpc backup"),
        ((_link("node-keys/node.key", "/etc/shadow", tarfile.SYMTYPE), b""), "not a regular file"),
        (
            (_link("node-keys/node.key", "manifest.json", tarfile.LNKTYPE), b""),
            "not a regular file",
        ),
        ((_dev("node-keys/null"), b""), "not a regular file"),
    ],
)
def test_a_member_that_is_not_the_backups_own_file_is_refused(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes], why: str
) -> None:
    backup = _sealed(tmp_path, [(_file("manifest.json"), b"{}"), member])
    data = tmp_path / "data"
    with pytest.raises(BackupCorrupt, match=why):
        restore_backup(backup, data, tmp_path / "keys", PW)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/qpc-evil-abs").exists()
    assert not data.exists() and not (tmp_path / "keys").exists()


def test_a_name_written_twice_is_refused(tmp_path: Path) -> None:
    backup = _sealed(tmp_path, [(_file("manifest.json"), b"{}"), (_file("manifest.json"), b"[]")])
    with pytest.raises(BackupCorrupt, match="not readable"):
        restore_backup(backup, tmp_path / "data", tmp_path / "keys", PW)


def test_modes_lose_setuid_and_group_write(tmp_path: Path) -> None:
    out = tmp_path / "x"
    plain = tmp_path / "p.tar"
    with tarfile.open(plain, "w") as tar:
        info = _file("node-keys/tool", 0o6777)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with tarfile.open(plain) as tar:
        bk._extract(tar, out)
    mode = stat.S_IMODE((out / "node-keys/tool").stat().st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWGRP | stat.S_IWOTH) == 0
    assert mode & 0o700 == 0o700
