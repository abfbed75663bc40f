"""CPU per message through the Plumtree core and RAM of the seen-filter (one process).

Core: a node with 8 neighbours of which 3 are eager (the rest PRUNEd), at 100 msgs/s of
virtual time; per message it takes a first push, a duplicate from a second eager edge,
an ACK for its own push, one IHAVE from each of the 5 lazy neighbours, and runs its
timers. CPU is process time (the machine may be shared), so it is what a router's core
would spend. A second figure: the same traffic through the wire codec as well
(decode + encode of the frames), what the Trio driver adds before the RPC layer.

Seen-filter: tracemalloc around 100k ids added over 7000 s (12 buckets of 10 min),
against a plain set of the same ids' fingerprints (what it replaces).

    .venv/bin/python bench/plumtree_core_bench.py [--messages N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qpc_node.storefwd.core import Ack, IHave, Prune, Push
from qpc_node.storefwd.gossip_wire import decode_request, encode_request
from qpc_node.storefwd.plumtree import PlumtreeCore
from qpc_node.storefwd.seen import SeenFilter


def core_us(n: int, *, wire: bool) -> float:
    peers = [bytes([i]) * 32 for i in range(8)]
    c = PlumtreeCore()
    for p in peers:
        c.link_up(0.0, p)
    for p in peers[3:]:
        c.receive(0.0, p, (Prune(),))
    c.poll()
    ids = [os.urandom(16) for _ in range(n)]
    payload = b"x" * 300

    def recv(t: float, peer: bytes, frames: tuple[object, ...]) -> None:
        if wire:
            frames = tuple(decode_request(encode_request(frames)).frames)  # type: ignore[arg-type]
        c.receive(t, peer, frames)  # type: ignore[arg-type]
        for o in c.poll():
            if wire and hasattr(o, "frames"):
                encode_request(o.frames)

    t = 1.0
    t0 = time.process_time()
    for m in ids:
        t += 0.01
        recv(t, peers[0], (Push(m, 3, payload),))
        recv(t, peers[1], (Push(m, 3, payload),))
        recv(t, peers[2], (Ack((m,)),))
        for p in peers[3:]:
            recv(t, p, (IHave(((m, 4),)),))
        c.tick(t)
        c.poll()
    return (time.process_time() - t0) / n * 1e6


def seen_bytes(n: int) -> tuple[int, int]:
    ids = [os.urandom(16) for _ in range(n)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    f = SeenFilter()
    for i, m in enumerate(ids):
        f.add(i * 0.07, m)
    used = tracemalloc.get_traced_memory()[0] - base
    plain = {f.fingerprint(m) for m in ids}
    plain_used = tracemalloc.get_traced_memory()[0] - base - used
    tracemalloc.stop()
    assert len(f) == n and len(plain) == n
    return used, plain_used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    args = ap.parse_args()
    us = core_us(args.messages, wire=False)
    us_wire = core_us(args.messages, wire=True)
    used, plain = seen_bytes(100_000)
    print(f"core: {us:.1f} us CPU per message (8 neighbours, 3 eager, 8 frames in)")
    print(f"core + wire codec: {us_wire:.1f} us CPU per message")
    print(
        f"seen-filter: {used / 1024:.0f} KiB per 100k ids ({used / 1e5:.1f} B/id);"
        f" a set of the same fingerprints: {plain / 1024:.0f} KiB"
    )
    print(f"load: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
