"""Encrypted node backups: ``qpc backup FILE`` / ``qpc restore FILE``.

A backup holds an online SQLite copy of the node database (integrity-checked)
and the node's keys, as a tar, sealed with AES-256-GCM in 1 MiB chunks under a
key derived (scrypt) from a backup passphrase. Each chunk's nonce carries its
index and the AAD marks the last chunk, so truncation, reordering and flipped
bytes are all refused. Restore refuses a corrupted backup and, unless forced,
one made by another node (its certificate differs from the keys present).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import sqlite3
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import Encoding

from qpc_node.errors import QpcError, StatusCode
from qpc_node.ops.lockfile import DataDirLock
from qpc_node.quic.tls import CERT_FILE, fingerprint
from qpc_node.store.backup import backup_to, verify_file

MAGIC = b"QPCBK1\n"
CHUNK = 1 << 20
_HDR = struct.Struct(">16s8s")  # scrypt salt, nonce prefix
DB_NAME = "node.db"
KEYS_NAME = "node-keys"
MANIFEST = "manifest.json"


class BackupError(QpcError):
    code = StatusCode.FAILED_PRECONDITION


class BackupCorrupt(BackupError):
    """Wrong passphrase, truncated, or modified: the two are indistinguishable by design."""


class ForeignBackup(BackupError):
    """The backup belongs to another node than the keys in place."""


def _key(passphrase: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=1 << 15, r=8, p=1).derive(passphrase.encode("utf-8"))


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + index.to_bytes(4, "big")


def _seal(plain: Path, out: Path, passphrase: str) -> None:
    salt, prefix = secrets.token_bytes(16), secrets.token_bytes(8)
    aead = AESGCM(_key(passphrase, salt))
    tmp = out.with_name(out.name + ".tmp")
    size = plain.stat().st_size
    with plain.open("rb") as src, tmp.open("wb") as dst:
        dst.write(MAGIC + _HDR.pack(salt, prefix))
        index = 0
        while True:
            chunk = src.read(CHUNK)
            last = src.tell() >= size
            dst.write(aead.encrypt(_nonce(prefix, index), chunk, MAGIC + bytes([last])))
            index += 1
            if last:
                break
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, out)


def _open_chunks(path: Path, passphrase: str) -> Iterator[bytes]:
    with path.open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise BackupCorrupt(f"{path} is not a qpc backup")
        hdr = f.read(_HDR.size)
        if len(hdr) != _HDR.size:
            raise BackupCorrupt("truncated header")
        salt, prefix = _HDR.unpack(hdr)
        aead = AESGCM(_key(passphrase, salt))
        index = 0
        sealed_len = CHUNK + 16
        while True:
            sealed = f.read(sealed_len)
            last = len(sealed) < sealed_len or not f.peek(1)
            try:
                yield aead.decrypt(_nonce(prefix, index), sealed, MAGIC + bytes([last]))
            except InvalidTag:
                raise BackupCorrupt("backup is corrupted or the passphrase is wrong") from None
            index += 1
            if last:
                return


def create_backup(data_dir: Path, key_dir: Path, out: Path, passphrase: str) -> int:
    """Back up a (possibly running) node; return the size of the sealed file."""
    db = data_dir / DB_NAME
    if not db.exists():
        raise BackupError(f"no node database at {db}")
    with tempfile.TemporaryDirectory(prefix="qpc-backup-") as tdir:
        work = Path(tdir)
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            info = backup_to(src, work / DB_NAME)
        finally:
            src.close()
        manifest = {
            "format": 1,
            "schema": info.schema_version,
            "cert": node_cert_fingerprint(key_dir),
        }
        tar_path = work / "backup.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(work / DB_NAME, DB_NAME)
            if key_dir.is_dir():
                tar.add(key_dir, KEYS_NAME)
            data = json.dumps(manifest).encode()
            ti = tarfile.TarInfo(MANIFEST)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        _seal(tar_path, out, passphrase)
    return out.stat().st_size


def node_cert_fingerprint(key_dir: Path) -> str:
    """Fingerprint of the node certificate in ``key_dir`` ("" when there is none)."""
    cert = key_dir / CERT_FILE
    if not cert.exists():
        return ""
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
    return fingerprint(der)


def restore_backup(
    backup: Path, data_dir: Path, key_dir: Path, passphrase: str, *, force: bool = False
) -> dict[str, object]:
    """Verify everything first, then swap the files into place (old ones kept as .old)."""
    with tempfile.TemporaryDirectory(prefix="qpc-restore-") as tdir:
        work = Path(tdir)
        tar_path = work / "backup.tar"
        with tar_path.open("wb") as f:
            for chunk in _open_chunks(backup, passphrase):
                f.write(chunk)
        out = work / "x"
        try:
            with tarfile.open(tar_path) as tar:
                _extract(tar, out)
        except (tarfile.TarError, OSError) as exc:
            raise BackupCorrupt(f"backup content is not readable: {exc}") from None
        try:
            manifest = json.loads((out / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise BackupCorrupt(f"backup has no valid manifest: {exc}") from None
        verify_file(out / DB_NAME)
        here = node_cert_fingerprint(key_dir)
        if here and manifest.get("cert") and here != manifest["cert"] and not force:
            raise ForeignBackup(
                f"backup is of node {str(manifest['cert'])[:16]}…, these keys are {here[:16]}…;"
                " use --force to replace them"
            )
        data_dir.mkdir(parents=True, exist_ok=True)
        with DataDirLock(data_dir):  # refuses while a node runs here
            _install(out, data_dir, key_dir)
        return dict(manifest)


def _extract(tar: tarfile.TarFile, out: Path) -> None:
    """Unpack a backup's own members into ``out``: regular files and directories, nothing else.

    Not ``extractall(filter="data")``: extraction filters came with Python 3.11.4, and the
    bundle carries Debian bookworm's 3.11.2, where that call raises TypeError (restore from
    the bundle failed: tests/packaging/test_bundle_root.py). This is stricter than the
    filter anyway. Only the three names a backup holds may appear at the top. No absolute
    path, no ``..``, no link, device or FIFO. Modes lose setuid/setgid/sticky and
    group/other write, and no file is written twice (``O_EXCL``). Any of these is
    :class:`BackupCorrupt`. The archive is authenticated, so these guard against a backup
    made with the right passphrase by someone else's tool.
    """
    out.mkdir(mode=0o700)
    for member in tar:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise BackupCorrupt(f"backup member {member.name!r} is not a relative path")
        if name.parts[0] not in (DB_NAME, KEYS_NAME, MANIFEST):
            raise BackupCorrupt(f"backup member {member.name!r} is not part of a qpc backup")
        dest = out.joinpath(*name.parts)
        mode = member.mode & 0o755
        if member.isdir():
            dest.mkdir(mode=mode | 0o700, parents=True, exist_ok=True)
            continue
        if not member.isreg():
            raise BackupCorrupt(f"backup member {member.name!r} is not a regular file")
        src = tar.extractfile(member)
        if src is None:  # isreg() members always have content; kept for the type
            raise BackupCorrupt(f"backup member {member.name!r} has no content")
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode | 0o600)
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(src, f)


def _install(out: Path, data_dir: Path, key_dir: Path) -> None:
    for suffix in ("-wal", "-shm"):
        (data_dir / (DB_NAME + suffix)).unlink(missing_ok=True)
    _swap(out / DB_NAME, data_dir / DB_NAME)
    if (out / KEYS_NAME).is_dir():
        _swap(out / KEYS_NAME, key_dir)


def _swap(new: Path, dest: Path) -> None:
    old = dest.with_name(dest.name + ".old")
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink(missing_ok=True)
    if dest.exists():
        os.replace(dest, old)
    shutil.move(str(new), str(dest))
