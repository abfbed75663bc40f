"""The negentropy binding (rust/src/sync.rs): reconciliation is exact, frames stay within
the limit, and every bad item or peer message is a SyncError (never a panic, never another
exception type)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence

import pytest

from qpc_node._core import NEGENTROPY_ID_LEN, NEGENTROPY_MAX_ITEMS, Negentropy, SyncError


def _id(n: int) -> bytes:
    return hashlib.sha256(b"neg-%d" % n).digest()


def _run(
    mine: Sequence[tuple[int, bytes]], theirs: Sequence[tuple[int, bytes]], limit: int = 0
) -> tuple[set[bytes], set[bytes], int, int, int]:
    """Whole session: (have, need, bytes both ways, rounds, largest message)."""
    init, resp = Negentropy(mine, limit), Negentropy(theirs, limit)
    msg: bytes | None = init.initiate()
    have: set[bytes] = set()
    need: set[bytes] = set()
    total = rounds = largest = 0
    while msg is not None:
        assert rounds < 200
        reply = resp.reconcile(msg)
        total += len(msg) + len(reply)
        largest = max(largest, len(msg), len(reply))
        msg, h, n = init.reconcile_with_ids(reply)
        have.update(h)
        need.update(n)
        rounds += 1
    return have, need, total, rounds, largest


def test_constants() -> None:
    assert NEGENTROPY_ID_LEN == 32
    assert NEGENTROPY_MAX_ITEMS == 1 << 20
    assert issubclass(SyncError, ValueError)


def test_exact_differences_both_ways() -> None:
    common = [(1000 + i, _id(i)) for i in range(3000)]
    only_a = [(5 + i, _id(10_000 + i)) for i in range(7)]
    only_b = [(2000 + i, _id(20_000 + i)) for i in range(11)]
    have, need, _, _, _ = _run(common + only_a, common + only_b)
    assert have == {i for _, i in only_a}
    assert need == {i for _, i in only_b}


def test_equal_sets_one_round_and_small() -> None:
    items = [(i, _id(i)) for i in range(10_000)]
    have, need, total, rounds, _ = _run(items, items)
    assert (have, need, rounds) == (set(), set(), 1)
    assert total < 1000  # 16 fingerprints and a version byte, not 10k ids


def test_duplicates_collapse_and_len() -> None:
    n = Negentropy([(1, _id(1)), (1, _id(1)), (2, _id(1))])
    assert len(n) == 2  # same id at two timestamps are two items; the exact copy is one


def test_frame_size_limit_honoured() -> None:
    a = [(i, _id(i)) for i in range(1500)]
    b = [(i, _id(50_000 + i)) for i in range(1500)]
    have, need, _, rounds, largest = _run(a, b, limit=4096)
    assert len(have) == len(need) == 1500
    assert largest <= 4096
    assert rounds > 1


@pytest.mark.parametrize("limit", [1, 100, 4095, -1])
def test_frame_size_limit_refused(limit: int) -> None:
    with pytest.raises((SyncError, OverflowError)):
        Negentropy([], limit)


@pytest.mark.parametrize(
    "items",
    [
        [(1, b"short")],
        [(1, b"x" * 33)],
        [(-1, _id(1))],
        [(2**64, _id(1))],
        [(2**64 - 1, _id(1))],  # the protocol's infinity bound
        [(1, "a" * 32)],
        [(1,)],
        [(1, _id(1), 3)],
        [None],
        [("1", _id(1))],
    ],
)
def test_bad_items_typed(items: list[object]) -> None:
    with pytest.raises(SyncError):
        Negentropy(items)  # type: ignore[arg-type]


class _Huge(Sequence[tuple[int, bytes]]):
    """Claims more items than the cap without materialising them."""

    def __len__(self) -> int:
        return NEGENTROPY_MAX_ITEMS + 1

    def __getitem__(self, i: int) -> tuple[int, bytes]:  # type: ignore[override]
        return (i, _id(i))

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        raise AssertionError("the cap is checked before iterating")


def test_item_count_capped() -> None:
    with pytest.raises(SyncError, match="exceed"):
        Negentropy(_Huge())


def test_roles() -> None:
    n = Negentropy([(1, _id(1))])
    q = n.initiate()
    with pytest.raises(SyncError):
        n.initiate()
    with pytest.raises(SyncError):
        n.reconcile(q)
    r = Negentropy([(1, _id(1))])
    with pytest.raises(SyncError):
        r.reconcile_with_ids(q)


def test_fuzz_only_sync_error() -> None:
    """Random and mutated messages into both roles: SyncError or a bounded answer."""
    rng = random.Random(0x5EED)
    items = [(i // 3, _id(i)) for i in range(400)]
    valid_q = Negentropy(items).initiate()
    valid_r = Negentropy(items[::2]).reconcile(Negentropy(items).initiate())
    seen_ok = seen_err = 0
    for k in range(1500):
        base = bytearray([valid_q, valid_r, b"\x61", b""][k % 4])
        if k % 5 == 4:
            base = bytearray(rng.randbytes(rng.randrange(300)))
        for _ in range(rng.randrange(4)):
            if base:
                base[rng.randrange(len(base))] = rng.randrange(256)
        if rng.random() < 0.3:
            del base[rng.randrange(len(base) + 1) :]
        msg = bytes(base)
        try:
            out = Negentropy(items, 4096).reconcile(msg)
            assert len(out) <= 4096
            seen_ok += 1
        except SyncError:
            seen_err += 1
        init = Negentropy(items, 4096)
        init.initiate()
        try:
            nxt, have, need = init.reconcile_with_ids(msg)
            assert nxt is None or len(nxt) <= 4096
            assert all(len(i) == 32 for i in have + need)
            seen_ok += 1
        except SyncError:
            seen_err += 1
    assert seen_ok > 100 and seen_err > 100
