"""store/homes.py: saved home bindings are bounded, expire, and load oldest first."""

from __future__ import annotations

from pathlib import Path

from qpc_node.store.homes import StoredBinding, binding_count, load_bindings, save_bindings
from qpc_node.store.store import Store


def b(n: int, expiry_ms: int, node: int = 1) -> StoredBinding:
    return StoredBinding(bytes([n]) * 32, bytes([node]) * 32, expiry_ms, b"signed%d" % n)


def test_newest_per_user_kept_bounded_and_expired_dropped(tmp_path: Path) -> None:
    with Store.open(tmp_path / "node.db") as s:
        save_bindings(s, [b(1, 5_000), b(2, 9_000)], 1_000, cap=3)
        save_bindings(s, [b(1, 9_000, node=7)], 2_000, cap=3)  # user 1 re-homed
        assert [(x.user[0], x.node[0]) for x in load_bindings(s, 3_000, cap=3)] == [
            (2, 1),
            (1, 7),
        ]
        # Over the cap: the least recently stored go first.
        dropped = save_bindings(s, [b(3, 9_000), b(4, 9_000)], 4_000, cap=3)
        assert dropped == 1 and binding_count(s) == 3
        assert [x.user[0] for x in load_bindings(s, 4_000, cap=3)] == [1, 3, 4]
        # Expired rows are deleted on load; a smaller cap keeps the newest.
        assert [x.user[0] for x in load_bindings(s, 9_000, cap=10)] == []
        assert binding_count(s) == 0


def test_load_cap_keeps_the_most_recent(tmp_path: Path) -> None:
    with Store.open(tmp_path / "node.db") as s:
        for i in range(1, 6):
            save_bindings(s, [b(i, 99_000)], 1_000 + i, cap=100)
        assert [x.user[0] for x in load_bindings(s, 2_000, cap=2)] == [4, 5]
