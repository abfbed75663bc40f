"""Hostile input never crashes the interpreter: only MlsError subclasses come out."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

from qpc_node.crypto import (
    Identity,
    MlsError,
    inspect_key_package,
)

CASES = 10_000


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random structural mutation of a real message."""
    b = bytearray(data)
    op = rng.randrange(6)
    if op == 0 and b:  # flip 1-4 bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1 and b:  # overwrite a byte in the header region (lengths, types)
        b[rng.randrange(min(len(b), 24))] = rng.randrange(256)
    elif op == 2:  # truncate
        del b[rng.randrange(len(b) + 1) :]
    elif op == 3:  # insert random bytes
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 8))
    elif op == 4 and b:  # delete a slice
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 8)]
    else:  # splice: append garbage
        b += rng.randbytes(rng.randint(1, 32))
    return bytes(b)


def test_fuzz_process_and_join(tmp_path: Path) -> None:
    rng = random.Random(0x9C5A)
    alice = Identity.create(tmp_path / "a", os.urandom(32), durable=False)
    bob = Identity.create(tmp_path / "b", os.urandom(32), durable=False)
    carol = Identity.create(tmp_path / "c", os.urandom(32), durable=False)
    ga = alice.create_group()
    commit0, welcome = ga.add([bob.key_package()])
    ga.merge_pending_commit()
    gb = bob.join(welcome)
    carol_kp = carol.key_package()
    corpus = [
        ga.encrypt(b"application " * 8),
        gb.encrypt(b"reply"),
        ga.encrypt(b""),
        commit0,
        welcome,
        carol_kp,
        bob.key_package(),
    ]
    outcomes: Counter[str] = Counter()
    for n in range(CASES):
        if n % 4 == 0:
            data = rng.randbytes(rng.randrange(0, 300))
        else:
            data = mutate(rng, rng.choice(corpus))
        target = n % 3
        try:
            if target == 0:
                ga.process(data)
            elif target == 1:
                carol.join(data)
            else:
                inspect_key_package(data)
        except MlsError as e:
            outcomes[type(e).__name__] += 1
        else:
            outcomes["accepted"] += 1
    # Nearly everything is rejected, always with a typed error; a few mutations that
    # only touch ignored bits may still be accepted, which is fine.
    rejected = sum(v for k, v in outcomes.items() if k != "accepted")
    assert rejected + outcomes["accepted"] == CASES
    assert rejected > CASES * 0.95
    assert outcomes["InvalidMessage"] > 0
    # The group is still healthy after the storm.
    assert gb.process(ga.encrypt(b"still alive")).data == b"still alive"
    assert ga.process(gb.encrypt(b"both ways")).data == b"both ways"
