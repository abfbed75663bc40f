import stat
from pathlib import Path

import pytest

from qpc_node.client.keyfile import (
    KEY_FILE,
    KeyFileError,
    WrongPassphrase,
    create_key,
    load_key,
    load_or_create_key,
)


def test_plain_key_is_private_and_stable(tmp_path: Path) -> None:
    key, created = load_or_create_key(tmp_path / "d")
    assert created and len(key) == 32
    mode = stat.S_IMODE((tmp_path / "d" / KEY_FILE).stat().st_mode)
    assert mode == 0o600
    again, created2 = load_or_create_key(tmp_path / "d")
    assert again == key and not created2


def test_passphrase_wraps_key(tmp_path: Path) -> None:
    key = create_key(tmp_path, "correct horse")
    raw = (tmp_path / KEY_FILE).read_bytes()
    assert key not in raw
    assert load_key(tmp_path, "correct horse") == key
    with pytest.raises(WrongPassphrase):
        load_key(tmp_path, "wrong")
    with pytest.raises(WrongPassphrase):
        load_key(tmp_path, None)
    assert (tmp_path / KEY_FILE).read_bytes() == raw


def test_refuses_overwrite_and_corrupt(tmp_path: Path) -> None:
    create_key(tmp_path)
    with pytest.raises(KeyFileError):
        create_key(tmp_path)
    (tmp_path / KEY_FILE).write_bytes(b"{not json")
    with pytest.raises(KeyFileError):
        load_key(tmp_path)
