"""The at-rest key of a user's (or node's) data dir.

By default a random 32-byte key sits in a 0600 file so routers and scripts run
unattended. An optional passphrase wraps it (scrypt -> AES-256-GCM), so a
stolen disk alone does not open the state. The key is what the Rust core uses
(via HKDF) to encrypt MLS state at rest.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from qpc_node.errors import QpcError, StatusCode

KEY_FILE = "secret.key"
KEY_LEN = 32
_FORMAT = 1
# scrypt cost: ~50 ms and 16 MiB on a laptop, acceptable once per start on a router.
_SCRYPT_N = 1 << 14
_SCRYPT_R = 8
_SCRYPT_P = 1


class KeyFileError(QpcError):
    code = StatusCode.FAILED_PRECONDITION


class WrongPassphrase(KeyFileError):
    code = StatusCode.PERMISSION_DENIED


class _KeyFile(msgspec.Struct, frozen=True):
    v: int
    wrapped: bool
    key: bytes
    salt: bytes = b""
    nonce: bytes = b""


def _kek(passphrase: str, salt: bytes) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return kdf.derive(passphrase.encode("utf-8"))


def _write_private(path: Path, data: bytes) -> None:
    """Atomically write ``data`` readable by the owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def create_key(data_dir: Path, passphrase: str | None = None) -> bytes:
    """Make a new at-rest key in ``data_dir``; refuses to overwrite one."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / KEY_FILE
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    key = secrets.token_bytes(KEY_LEN)
    if passphrase:
        salt = secrets.token_bytes(16)
        nonce = secrets.token_bytes(12)
        wrapped = AESGCM(_kek(passphrase, salt)).encrypt(nonce, key, b"qpc-keyfile-v1")
        rec = _KeyFile(v=_FORMAT, wrapped=True, key=wrapped, salt=salt, nonce=nonce)
    else:
        rec = _KeyFile(v=_FORMAT, wrapped=False, key=key)
    _write_private(path, msgspec.json.encode(rec))
    return key


def load_key(data_dir: Path, passphrase: str | None = None) -> bytes:
    """Read the at-rest key; typed errors for a missing, corrupt or locked file."""
    path = data_dir / KEY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path}") from None
    try:
        rec = msgspec.json.decode(raw, type=_KeyFile)
    except msgspec.DecodeError as exc:
        raise KeyFileError(f"corrupt key file {path}: {exc}") from None
    if rec.v != _FORMAT:
        raise KeyFileError(f"unsupported key file version {rec.v}")
    if not rec.wrapped:
        if len(rec.key) != KEY_LEN:
            raise KeyFileError("key file holds a key of the wrong length")
        return rec.key
    if not passphrase:
        raise WrongPassphrase("the key file is passphrase-protected: set QPC_PASSPHRASE")
    try:
        return AESGCM(_kek(passphrase, rec.salt)).decrypt(rec.nonce, rec.key, b"qpc-keyfile-v1")
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for the key file") from None


def load_or_create_key(data_dir: Path, passphrase: str | None = None) -> tuple[bytes, bool]:
    """Return (key, created)."""
    if (data_dir / KEY_FILE).exists():
        return load_key(data_dir, passphrase), False
    return create_key(data_dir, passphrase), True
