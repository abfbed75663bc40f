"""MLS core benchmark: qpc_node.crypto (OpenMLS via PyO3) against mls-rs (UniFFI).

Run with ``make bench`` (it builds ``.venv-bench`` holding the project and the
reference package ``agentvault-mls-rs-uniffi``, which is not a project dependency).
Without the reference installed, only our column is printed.

Each row is the median over its repetitions, measured in the same run for both
engines. Our figures include persisting the changed state records to the
encrypted log (page cache, no fsync, like the in-memory reference); the fsync
cost per operation is printed separately, as are bytes written per message.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qpc_node.crypto import Group, Identity

PAYLOAD = os.urandom(1024)
SIZES = (2, 16, 64)
ADD_REPS = 10
MSG_REPS = 500
KP_REPS = 200

Row = tuple[str, float, float | None]


def median_of(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Ours:
    """Our engine; every identity gets its own state dir under one temp root."""

    def __init__(self, root: Path, durable: bool = False) -> None:
        self.root = root
        self.durable = durable
        self.count = 0

    def ident(self) -> Identity:
        self.count += 1
        return Identity.create(
            self.root / f"{self.durable}-{self.count}", os.urandom(32), durable=self.durable
        )

    def group_of(self, n: int) -> tuple[Identity, Group, Identity, Group]:
        """A group of n built with one add; returns creator and one other member."""
        creator = self.ident()
        g0 = creator.create_group()
        others = [self.ident() for _ in range(n - 1)]
        _commit, welcome = g0.add([o.key_package() for o in others])
        g0.merge_pending_commit()
        g1 = others[0].join(welcome)
        return creator, g0, others[0], g1

    def run(self) -> dict[str, float]:
        r: dict[str, float] = {}
        kp_ident = self.ident()
        r["key package"] = median_of(kp_ident.key_package, KP_REPS)
        for n in SIZES:
            _c, g0, _m, g1 = self.group_of(n)
            add_t, join_t = [], []
            for _ in range(ADD_REPS):
                newcomer = self.ident()
                kp = newcomer.key_package()
                t = time.perf_counter()
                commit, welcome = g0.add([kp])
                g0.merge_pending_commit()  # part of the figure, as before (add merged)
                add_t.append(time.perf_counter() - t)
                g1.process(commit)
                t = time.perf_counter()
                newcomer.join(welcome)
                join_t.append(time.perf_counter() - t)
            r[f"add 1 @ N={n}"] = statistics.median(add_t)
            if n == 64:
                r[f"join @ N={n}"] = statistics.median(join_t)
                enc_t, dec_t = [], []
                for _ in range(MSG_REPS):
                    t = time.perf_counter()
                    ct = g0.encrypt(PAYLOAD)
                    enc_t.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    ev = g1.process(ct)
                    dec_t.append(time.perf_counter() - t)
                    assert ev.data == PAYLOAD
                r["encrypt 1 KiB"] = statistics.median(enc_t)
                r["decrypt 1 KiB"] = statistics.median(dec_t)
        return r


def bytes_per_message(root: Path) -> tuple[float, float, int]:
    """Bytes appended to the store per encrypt (sender) and decrypt (receiver), N=64."""
    ours = Ours(root / "bytes")
    creator, g0, member, g1 = ours.group_of(64)
    s0, r0 = creator.storage_stats(), member.storage_stats()
    reps = 100
    for _ in range(reps):
        g1.process(g0.encrypt(PAYLOAD))
    s1, r1 = creator.storage_stats(), member.storage_stats()
    return (
        (s1["bytes_written"] - s0["bytes_written"]) / reps,
        (r1["bytes_written"] - r0["bytes_written"]) / reps,
        r1["file_size"],
    )


def fsync_costs(root: Path) -> dict[str, float]:
    ours = Ours(root / "durable", durable=True)
    _c, g0, _m, g1 = ours.group_of(64)
    enc = median_of(lambda: g1.process(g0.encrypt(PAYLOAD)), 100)
    return {"encrypt+decrypt 1 KiB, fsync each": enc}


def reference_clients() -> Callable[[], Any] | None:
    """A maker of fresh mls-rs clients (ciphersuite 1, default config, each its own
    signature key and name), or None without the reference installed. Shared with
    bench/group_bench.py's add@64 reference."""
    try:
        from mls_rs_uniffi import (  # type: ignore[import-not-found]
            CipherSuite,
            Client,
            client_config_default,
            generate_signature_keypair,
        )
    except ImportError:
        return None
    cs = CipherSuite.CURVE25519_AES128
    counter = [0]

    def mk() -> Any:
        counter[0] += 1
        return Client(
            f"c{counter[0]}".encode(), generate_signature_keypair(cs), client_config_default()
        )

    return mk


def reference() -> dict[str, float] | None:
    mk = reference_clients()
    if mk is None:
        return None
    r: dict[str, float] = {}
    c = mk()
    r["key package"] = median_of(c.generate_key_package_message, KP_REPS)
    for n in SIZES:
        clients = [mk() for _ in range(n)]
        g0 = clients[0].create_group(None)
        out = g0.add_members([cl.generate_key_package_message() for cl in clients[1:]])
        g0.process_incoming_message(out.commit_message)
        g1 = clients[1].join_group(out.ratchet_tree, out.welcome_message).group
        add_t, join_t = [], []
        for _ in range(ADD_REPS):
            newc = mk()
            kp = newc.generate_key_package_message()
            t = time.perf_counter()
            o = g0.add_members([kp])
            g0.process_incoming_message(o.commit_message)  # merge own commit, like ours
            add_t.append(time.perf_counter() - t)
            g1.process_incoming_message(o.commit_message)
            t = time.perf_counter()
            newc.join_group(o.ratchet_tree, o.welcome_message)
            join_t.append(time.perf_counter() - t)
        r[f"add 1 @ N={n}"] = statistics.median(add_t)
        if n == 64:
            r[f"join @ N={n}"] = statistics.median(join_t)
            enc_t, dec_t = [], []
            for _ in range(MSG_REPS):
                t = time.perf_counter()
                ct = g0.encrypt_application_message(PAYLOAD)
                enc_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                g1.process_incoming_message(ct)
                dec_t.append(time.perf_counter() - t)
            r["encrypt 1 KiB"] = statistics.median(enc_t)
            r["decrypt 1 KiB"] = statistics.median(dec_t)
    return r


TARGETS = {
    "encrypt 1 KiB": 60e-6,
    "decrypt 1 KiB": 80e-6,
    "add 1 @ N=64": 1e-3,
    "join @ N=64": 5e-3,
}


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    return f"{seconds * 1e3:8.3f} ms"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="qpc-mls-bench-") as tmp:
        root = Path(tmp)
        ours = Ours(root).run()
        ref = reference()
        enc_b, dec_b, file_size = bytes_per_message(root)
        durable = fsync_costs(root)
    print(f"{'operation':<24}{'ours':>12}{'mls-rs ref':>14}{'ours/ref':>10}{'target':>12}")
    for name, ours_t in ours.items():
        ref_t = ref.get(name) if ref else None
        ratio = f"{ours_t / ref_t:9.2f}x" if ref_t else "        -"
        target = TARGETS.get(name)
        mark = "" if target is None else (" ok" if ours_t <= target else " MISS")
        print(f"{name:<24}{fmt(ours_t):>12}{fmt(ref_t):>14}{ratio:>10}{fmt(target):>12}{mark}")
    if ref is None:
        print("(reference mls_rs_uniffi not installed: run `make bench` for the ratio column)")
    print()
    print(f"bytes written per encrypt (N=64, 1 KiB): {enc_b:,.0f} B")
    print(f"bytes written per decrypt (N=64, 1 KiB): {dec_b:,.0f} B")
    print(f"store file size of a 64-member group member: {file_size:,} B")
    for name, t in durable.items():
        print(f"{name}: {fmt(t).strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
