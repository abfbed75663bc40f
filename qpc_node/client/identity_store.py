"""Layout of a user's data dir, as ``qpc id --data DIR`` creates it.

DIR/secret.key   at-rest key (0600; optionally passphrase-wrapped)
DIR/mls/         MLS identity and group state, encrypted by the Rust core
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from qpc_node.client.keyfile import load_or_create_key
from qpc_node.crypto import Identity

MLS_DIR = "mls"


class UserIdentity(msgspec.Struct, frozen=True):
    ident: Identity
    secret: bytes
    created: bool


def open_user(data_dir: Path, passphrase: str | None = None) -> UserIdentity:
    """Open the identity in ``data_dir``, creating key and identity on first use."""
    secret, _ = load_or_create_key(data_dir, passphrase)
    state = data_dir / MLS_DIR
    if state.is_dir() and any(state.iterdir()):
        return UserIdentity(Identity.open(str(state), secret), secret, False)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    return UserIdentity(Identity.create(str(state), secret), secret, True)


def open_or_create_identity(data_dir: Path, passphrase: str | None = None) -> tuple[Identity, bool]:
    u = open_user(data_dir, passphrase)
    return u.ident, u.created
