"""A small seeded mutation engine (libFuzzer-style byte mutations, no coverage).

Deterministic for a given ``random.Random``: the CI run is reproducible from
its seed and every crash is reported with the exact input bytes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

MAX_LEN = 64 * 1024
"""Mutants are cut to this size so one input never costs more than a few ms."""

# Values that sit on boundaries of lengths, varints, tags and flags.
_INTERESTING: tuple[bytes, ...] = (
    b"\x00",
    b"\x01",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"\x80\x01",
    b"\xff\x7f",
    b"\x80\x80\x80\x80\x00",
    b"\xff\xff\xff\xff\x0f",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x80" * 11,
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
    b"\x00\x00\x01\x00",
    b"\xc0\x80",  # overlong UTF-8 NUL
    b"\xed\xa0\x80",  # UTF-8 encoded surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\x0a\x00",  # protobuf: field 1, length 0
    b"\x12\xff\xff\xff\x0f",  # protobuf: field 2, huge length
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # field 1 varint, 10 bytes
    b"\x0d\xff\xff\xff\xff",  # field 1 fixed32
    b"\x0b",  # field 1 start-group (deprecated wire type)
    b"\x0f",  # wire type 7 (invalid)
)


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes] = ()) -> bytes:
    """Apply 1-4 random structural mutations to ``data``."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        _one(rng, b, corpus)
    if len(b) > MAX_LEN:
        del b[MAX_LEN:]
    return bytes(b)


def _one(rng: random.Random, b: bytearray, corpus: Sequence[bytes]) -> None:
    op = rng.randrange(12)
    n = len(b)
    if op == 0 and n:  # flip bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # set a byte, biased to the head (lengths, tags, kinds)
        i = rng.randrange(min(n, 32)) if rng.random() < 0.5 else rng.randrange(n)
        b[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    elif op == 2:  # truncate
        del b[rng.randrange(n + 1) :]
    elif op == 3:  # insert random bytes
        i = rng.randrange(n + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    elif op == 4 and n:  # delete a slice
        i = rng.randrange(n)
        del b[i : i + rng.randint(1, 16)]
    elif op == 5:  # insert or overwrite with an interesting value
        v = rng.choice(_INTERESTING)
        i = rng.randrange(n + 1)
        if rng.random() < 0.5:
            b[i:i] = v
        else:
            b[i : i + len(v)] = v
    elif op == 6 and n:  # duplicate a slice in place
        i = rng.randrange(n)
        j = min(n, i + rng.randint(1, 64))
        b[j:j] = b[i:j]
    elif op == 7 and corpus:  # splice with another seed
        other = rng.choice(corpus)
        i = rng.randrange(n + 1)
        j = rng.randrange(len(other) + 1)
        b[i:] = other[j:]
    elif op == 8 and n >= 2:  # swap two bytes
        i, j = rng.randrange(n), rng.randrange(n)
        b[i], b[j] = b[j], b[i]
    elif op == 9 and n:  # add/subtract a small delta (length fields off by a few)
        i = rng.randrange(n)
        b[i] = (b[i] + rng.choice((-2, -1, 1, 2, 64, -64))) & 0xFF
    elif op == 10 and n:  # repeat a chunk many times (grow)
        i = rng.randrange(n)
        chunk = bytes(b[i : i + rng.randint(1, 8)])
        b[i:i] = chunk * rng.randint(2, 64)
    else:  # append garbage
        b += rng.randbytes(rng.randint(1, 32))


def generate(rng: random.Random, seeds: Sequence[bytes], *, random_share: float = 0.15) -> bytes:
    """One input: usually a mutated seed, sometimes raw random bytes or a seed as is."""
    r = rng.random()
    if not seeds or r < random_share:
        return rng.randbytes(rng.choice((0, 1, 2, 4, 8, 16, 64, 256, rng.randrange(1024))))
    seed = rng.choice(seeds)
    if r < random_share + 0.03:
        return seed
    return mutate(rng, seed, seeds)
