"""KeyPackage directory: single use, last resort, TTL, quota, idempotent upload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qpc_node.errors import StatusCode
from qpc_node.store import InvalidRecord, KeyPackageUpload, QuotaExceeded, Store, StoreLimits

NOW = 1_700_000_000_000
HOUR = 3_600_000
ALICE = b"A" * 32
SUITE = 1


def kp(n: int, *, last_resort: bool = False, not_after: int | None = None) -> KeyPackageUpload:
    return KeyPackageUpload(f"kp-{n}".encode(), SUITE, last_resort, not_after)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "node.db", limits=StoreLimits(keypackage_max_per_identity=5)) as s:
        yield s


def test_fetch_consumes_normal_then_reuses_last_resort(store: Store) -> None:
    assert store.upload_keypackages(ALICE, [kp(1), kp(2), kp(9, last_resort=True)], NOW) == 3
    served = [store.fetch_keypackage(ALICE, NOW) for _ in range(4)]
    assert [r.data if r else None for r in served] == [b"kp-1", b"kp-2", b"kp-9", b"kp-9"]
    assert [r.last_resort for r in served if r] == [False, False, True, True]
    count = store.count_keypackages(ALICE, NOW)
    assert (count.normal, count.last_resort) == (0, 1)


def test_no_package_returns_none(store: Store) -> None:
    assert store.fetch_keypackage(ALICE, NOW) is None
    store.upload_keypackages(ALICE, [kp(1)], NOW)
    assert store.fetch_keypackage(ALICE, NOW, ciphersuite=SUITE + 1) is None


def test_ttl_defaults_to_24h_and_expired_are_not_served(store: Store) -> None:
    store.upload_keypackages(ALICE, [kp(1), kp(2, not_after=NOW + HOUR)], NOW)
    record = store.fetch_keypackage(ALICE, NOW)
    assert record is not None and record.not_after_ms == NOW + 24 * HOUR
    assert store.fetch_keypackage(ALICE, NOW + HOUR) is None
    assert store.expire_keypackages(NOW + HOUR).expired == 1
    # A requested expiry beyond the TTL is clamped to it.
    store.upload_keypackages(ALICE, [kp(3, not_after=NOW + 100 * HOUR)], NOW)
    record = store.fetch_keypackage(ALICE, NOW)
    assert record is not None and record.not_after_ms == NOW + 24 * HOUR


def test_upload_is_idempotent_and_last_resort_is_replaced(store: Store) -> None:
    assert store.upload_keypackages(ALICE, [kp(1), kp(1)], NOW) == 1
    assert store.upload_keypackages(ALICE, [kp(1)], NOW) == 0
    store.upload_keypackages(ALICE, [kp(8, last_resort=True)], NOW)
    store.upload_keypackages(ALICE, [kp(9, last_resort=True)], NOW)
    assert store.count_keypackages(ALICE, NOW).last_resort == 1


def test_quota_rejects_whole_upload(store: Store) -> None:
    store.upload_keypackages(ALICE, [kp(i) for i in range(4)], NOW)
    with pytest.raises(QuotaExceeded) as info:
        store.upload_keypackages(ALICE, [kp(10), kp(11)], NOW)
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED
    assert store.count_keypackages(ALICE, NOW).normal == 4
    # Last-resort packages do not count against the pool quota.
    store.upload_keypackages(ALICE, [kp(10), kp(12, last_resort=True)], NOW)
    assert store.count_keypackages(ALICE, NOW).normal == 5


def test_invalid_uploads_are_refused(store: Store) -> None:
    for bad in ([], [KeyPackageUpload(b"", SUITE)], [kp(1, not_after=NOW)]):
        with pytest.raises(InvalidRecord):
            store.upload_keypackages(ALICE, bad, NOW)
    with pytest.raises(InvalidRecord):
        store.upload_keypackages(b"short", [kp(1)], NOW)
    assert store.count_keypackages(ALICE, NOW).normal == 0
