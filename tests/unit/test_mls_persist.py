"""MLS state at rest: encrypted, reloadable, crash-safe, and cheap to update."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qpc_node.crypto import (
    Group,
    Identity,
    MlsError,
    StorageError,
    StoreExists,
    StoreNotFound,
    WrongSecret,
)

STORE = "store.qpc"


def pair(root: Path) -> tuple[Identity, Group, Identity, Group, bytes, bytes]:
    sa, sb = os.urandom(32), os.urandom(32)
    a = Identity.create(root / "a", sa)
    b = Identity.create(root / "b", sb)
    ga = a.create_group(b"chat")
    _commit, welcome = ga.add([b.key_package()])
    ga.merge_pending_commit()
    gb = b.join(welcome)
    return a, ga, b, gb, sa, sb


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_reopen_in_process_continues_conversation(tmp_path: Path) -> None:
    a, ga, b, gb, sa, sb = pair(tmp_path)
    assert gb.process(ga.encrypt(b"before restart")).data == b"before restart"
    fp_a, fp_b = a.fingerprint, b.fingerprint
    del a, ga, b, gb
    a2 = Identity.open(tmp_path / "a", sa)
    b2 = Identity.open(tmp_path / "b", sb)
    assert (a2.fingerprint, b2.fingerprint) == (fp_a, fp_b)
    assert a2.groups() == [b"chat"]
    ga2, gb2 = a2.group(b"chat"), b2.group(b"chat")
    assert gb2.process(ga2.encrypt(b"after restart")).data == b"after restart"
    assert ga2.process(gb2.encrypt(b"and back")).data == b"and back"
    # Epoch changes survive too.
    gb2.process(ga2.update())
    ga2.merge_pending_commit()
    del a2, ga2
    ga3 = Identity.open(tmp_path / "a", sa).group(b"chat")
    assert ga3.epoch == gb2.epoch == 2
    assert ga3.process(gb2.encrypt(b"epoch 2")).data == b"epoch 2"


CHILD = """
import sys
from qpc_node.crypto import Identity
state_dir, secret_hex, ct_path, out_path = sys.argv[1:5]
g = Identity.open(state_dir, bytes.fromhex(secret_hex)).group(b"chat")
ev = g.process(open(ct_path, "rb").read())
assert ev.kind == "application", ev
open(out_path, "wb").write(g.encrypt(b"child saw: " + ev.data))
"""


def test_real_process_restart_continues_conversation(tmp_path: Path) -> None:
    _a, ga, b, gb, _sa, sb = pair(tmp_path)
    del b, gb  # B's state now lives only on disk
    (tmp_path / "ct").write_bytes(ga.encrypt(b"hello child"))
    subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "b"),
            sb.hex(),
            str(tmp_path / "ct"),
            str(tmp_path / "out"),
        ],
        check=True,
        timeout=60,
    )
    ev = ga.process((tmp_path / "out").read_bytes())
    assert ev.data == b"child saw: hello child"
    # B's ratchet state advanced in the child and was persisted.
    gb = Identity.open(tmp_path / "b", sb).group(b"chat")
    assert gb.process(ga.encrypt(b"parent again")).data == b"parent again"


def test_wrong_secret_fails_cleanly_and_leaves_files_intact(tmp_path: Path) -> None:
    a, ga, _b, _gb, sa, _sb = pair(tmp_path)
    ga.encrypt(b"some state")
    del a, ga
    before = snapshot(tmp_path / "a")
    with pytest.raises(WrongSecret) as info:
        Identity.open(tmp_path / "a", os.urandom(32))
    assert isinstance(info.value, MlsError)
    assert isinstance(info.value, StorageError)
    assert snapshot(tmp_path / "a") == before
    # The right secret still opens it.
    assert Identity.open(tmp_path / "a", sa).groups() == [b"chat"]


def test_create_refuses_to_overwrite_and_open_needs_a_store(tmp_path: Path) -> None:
    secret = os.urandom(32)
    Identity.create(tmp_path / "x", secret)
    before = snapshot(tmp_path / "x")
    with pytest.raises(StoreExists):
        Identity.create(tmp_path / "x", secret)
    assert snapshot(tmp_path / "x") == before
    with pytest.raises(StoreNotFound):
        Identity.open(tmp_path / "nothing", secret)
    with pytest.raises(MlsError):
        Identity.create(tmp_path / "y", b"short")


def test_store_is_encrypted_at_rest(tmp_path: Path) -> None:
    a, ga, _b, _gb, _sa, _sb = pair(tmp_path)
    raw = (tmp_path / "a" / STORE).read_bytes()
    assert b"chat" not in raw
    assert a.public_key not in raw
    assert bytes.fromhex(a.fingerprint) not in raw
    assert ga.epoch == 1


def test_torn_tail_is_dropped_on_open(tmp_path: Path) -> None:
    _a, ga, _b, gb, _sa, sb = pair(tmp_path)
    gb.process(ga.encrypt(b"m1"))
    del gb, _b
    store = tmp_path / "b" / STORE
    good = store.read_bytes()
    # A crash mid-append leaves a partial record behind.
    store.write_bytes(good + b"\x40\x00\x00\x00" + os.urandom(20))
    gb = Identity.open(tmp_path / "b", sb).group(b"chat")
    assert store.read_bytes() == good
    assert gb.process(ga.encrypt(b"m2")).data == b"m2"


def test_corrupt_header_is_typed(tmp_path: Path) -> None:
    secret = os.urandom(32)
    Identity.create(tmp_path / "c", secret)
    store = tmp_path / "c" / STORE
    store.write_bytes(b"garbage")
    with pytest.raises(StorageError):
        Identity.open(tmp_path / "c", secret)


def test_bytes_written_per_message_in_64_member_group(tmp_path: Path) -> None:
    """One encrypt/decrypt appends only the changed records, not the group state."""
    creator = Identity.create(tmp_path / "m0", os.urandom(32), durable=False)
    g0 = creator.create_group()
    others = [
        Identity.create(tmp_path / f"m{i}", os.urandom(32), durable=False) for i in range(1, 64)
    ]
    _commit, welcome = g0.add([o.key_package() for o in others])
    g0.merge_pending_commit()
    receiver = others[0]
    g1 = receiver.join(welcome)
    assert len(g0.members()) == 64
    # One warm-up message: add and merge are two records each holding the 64-leaf tree, so
    # the creator's next write compacts the log; measure the steady state after that.
    assert g1.process(g0.encrypt(b"warm-up")).data == b"warm-up"

    s0, r0 = creator.storage_stats(), receiver.storage_stats()
    rounds = 20
    for _ in range(rounds):
        assert g1.process(g0.encrypt(b"x" * 1024)).data == b"x" * 1024
    s1, r1 = creator.storage_stats(), receiver.storage_stats()
    per_encrypt = (s1["bytes_written"] - s0["bytes_written"]) / rounds
    per_decrypt = (r1["bytes_written"] - r0["bytes_written"]) / rounds
    assert s1["records"] - s0["records"] == rounds
    assert r1["records"] - r0["records"] == rounds
    # Far below a full rewrite of the group state (the store file holds the 64-leaf tree).
    assert per_encrypt < s0["file_size"] / 4
    assert per_decrypt < r0["file_size"] / 4
    assert per_encrypt < 16 * 1024
    assert per_decrypt < 16 * 1024


FULL_DISK_CHILD = """
import os, resource, sys
from qpc_node.crypto import Identity, StorageError
root = sys.argv[1]
a = Identity.create(os.path.join(root, "a"), b"a" * 32)
b = Identity.create(os.path.join(root, "b"), b"b" * 32)
ga = a.create_group(b"chat")
_c, welcome = ga.add([b.key_package()])
ga.merge_pending_commit()
gb = b.join(welcome)
store_a, store_b = (os.path.join(root, n, "store.qpc") for n in "ab")
size_a, size_b = os.path.getsize(store_a), os.path.getsize(store_b)
commit = gb.update()
gb.merge_pending_commit()
size_b = os.path.getsize(store_b)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
# From here on a's store may not grow: every operation's log record fails to be written
# (EFBIG; Python ignores SIGXFSZ). Only a is written below; b's store is larger (it keeps
# past-epoch secrets), so a limit at b's size would let a's records through.
resource.setrlimit(resource.RLIMIT_FSIZE, (size_a, hard))
for name, op in [
    ("update", ga.update),
    ("encrypt", lambda: ga.encrypt(b"lost")),
    ("process commit", lambda: ga.process(commit)),
    ("key package", a.key_package),
]:
    try:
        op()
    except StorageError:
        pass
    else:
        raise SystemExit(f"{name}: no StorageError with a full disk")
    # Memory is what it was (and what is on disk): no pending commit, old epoch.
    assert not ga.has_pending_commit(), name
    assert ga.epoch == 1, (name, ga.epoch)
    assert os.path.getsize(store_a) == size_a, name
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
# The same operations now succeed, and the group works on, before and after a reopen.
assert ga.process(commit).kind == "commit"
assert gb.process(ga.encrypt(b"after the full disk")).data == b"after the full disk"
del ga, a
ga = Identity.open(os.path.join(root, "a"), b"a" * 32).group(b"chat")
assert ga.epoch == gb.epoch == 2
assert gb.process(ga.encrypt(b"after reopen")).data == b"after reopen"
print("ok")
"""


def test_failed_write_leaves_memory_as_on_disk(tmp_path: Path) -> None:
    """An operation whose log record cannot be written is undone in memory too.

    Before, the in-memory group kept the change (a pending commit, a merged commit) that the
    disk never got, and the records it had touched were never written later either.
    """
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
