"""Groups on a partitioned mesh (issue 14): heal-to-convergence, retained state, commit cost.

Sections (all in one run, over the real Rust MLS core):

- **heal** for 10/50/100 members (qpc_sim/group_partition.py): a partition splits the
  group 60/40, both sides change membership and chat for up to the rollback window,
  the partition heals with shuffled, duplicated delivery. Printed per size: virtual and
  wall time from the heal until every member is on one epoch authenticator, extra
  messages the heal cost (resent application messages + re-issued intents + re-applied
  removals), undecryptable texts, retained snapshot bytes per member at R=5.
- **commit @ N=100**: median time for a member to process one commit (self-update of
  another member) in a 100-member group; and the committer's side.
- **add @ 64**: median time to add one member to a 64-member group, merge included,
  ours against mls-rs (``agentvault-mls-rs-uniffi``, the reference of bench/mls_bench.py)
  in the same run; without the reference installed the ratio is ``nan``.

Run: ``make bench`` builds ``.venv-bench`` with the reference; then
``.venv-bench/bin/python bench/group_bench.py [--sizes 10,50,100] [--seeds 3]``.
The last line is ``groups undecryptable=<n> converged=<0..1> add64_ratio_vs_mls_rs=<x>``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qpc_node.crypto import Group, Identity

ADD_REPS = 15
COMMIT_REPS = 15


def median_of(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Ours:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def ident(self) -> Identity:
        self.count += 1
        return Identity.create(self.root / f"i{self.count}", os.urandom(32), durable=False)

    def group_of(self, n: int) -> tuple[Group, Group]:
        """A group of n built with one add; the creator's and one other member's handle."""
        creator = self.ident()
        g0 = creator.create_group()
        others = [self.ident() for _ in range(n - 1)]
        _commit, welcome = g0.add([o.key_package() for o in others])
        g0.merge_pending_commit()
        return g0, others[0].join(welcome)

    def add_at(self, n: int) -> float:
        g0, g1 = self.group_of(n)
        times = []
        for _ in range(ADD_REPS):
            kp = self.ident().key_package()
            t = time.perf_counter()
            commit, _welcome = g0.add([kp])
            g0.merge_pending_commit()
            times.append(time.perf_counter() - t)
            g1.process(commit)
        return statistics.median(times)

    def commit_at(self, n: int) -> tuple[float, float]:
        """(member processes a commit, committer makes + merges it) medians at size n."""
        g0, g1 = self.group_of(n)
        proc, make = [], []
        for _ in range(COMMIT_REPS):
            t = time.perf_counter()
            commit = g1.update()
            g1.merge_pending_commit()
            make.append(time.perf_counter() - t)
            t = time.perf_counter()
            g0.process(commit)
            proc.append(time.perf_counter() - t)
        return statistics.median(proc), statistics.median(make)


def reference_add_at(n: int) -> float | None:
    from mls_bench import reference_clients  # bench/ is on sys.path when run as a script

    mk = reference_clients()
    if mk is None:
        return None
    clients = [mk() for _ in range(n)]
    g0 = clients[0].create_group(None)
    out = g0.add_members([c.generate_key_package_message() for c in clients[1:]])
    g0.process_incoming_message(out.commit_message)
    g1 = clients[1].join_group(out.ratchet_tree, out.welcome_message).group
    times = []
    for _ in range(ADD_REPS):
        kp = mk().generate_key_package_message()
        t = time.perf_counter()
        o = g0.add_members([kp])
        g0.process_incoming_message(o.commit_message)  # merge own commit, like ours
        times.append(time.perf_counter() - t)
        g1.process_incoming_message(o.commit_message)
    return statistics.median(times)


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def heal_section(sizes: list[int], seeds: int) -> tuple[int, float]:
    """Per size and seed: the partition/heal scenario. Returns (undecryptable, share of
    runs in which every member ended on one authenticator)."""
    from qpc_sim.group_partition import PartitionConfig, run_partition

    undecryptable = 0
    runs = converged = 0
    print(
        f"{'members':>7} {'seed':>4} {'heal->conv virt':>16} {'wall':>8} {'run wall':>9}"
        f" {'extra msgs':>10}"
        f" {'switches':>8} {'undecr':>6} {'auths':>5} {'retained B/member (R=5)':>24}"
    )
    for n in sizes:
        conv_virtual: list[int] = []
        conv_wall: list[float] = []
        for seed in range(seeds):
            cfg = PartitionConfig(members=n, seed=seed)
            t = time.perf_counter()
            r = run_partition(cfg)
            wall = time.perf_counter() - t
            runs += 1
            converged += r.authenticators == 1
            undecryptable += r.undecryptable
            conv_virtual.append(r.heal_to_convergence_ms)
            conv_wall.append(r.heal_to_convergence_wall_s)
            print(
                f"{n:>7} {seed:>4} {r.heal_to_convergence_ms / 1e3:>14.1f} s"
                f" {r.heal_to_convergence_wall_s:>6.1f} s {wall:>7.1f} s"
                f" {r.extra_messages:>10} {r.switches:>8} {r.undecryptable:>6}"
                f" {r.authenticators:>5} {r.retained_bytes_per_member:>24,}"
            )
        k = max(0, math.ceil(0.99 * len(conv_virtual)) - 1)
        p99, p99w = sorted(conv_virtual)[k], sorted(conv_wall)[k]
        print(
            f"  N={n}: convergence p99 {p99 / 1e3:.1f} s virtual, {p99w:.1f} s wall"
            " (target <= 60 s at N=100)"
        )
    return undecryptable, (converged / runs if runs else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,50,100")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip-heal", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    undecryptable, conv = 0, 0.0
    if not args.skip_heal:
        undecryptable, conv = heal_section(sizes, args.seeds)
        print()
    with tempfile.TemporaryDirectory(prefix="qpc-group-bench-") as tmp:
        ours = Ours(Path(tmp))
        proc100, make100 = ours.commit_at(100)
        add64 = ours.add_at(64)
    ref64 = reference_add_at(64)
    print(f"commit @ N=100: member processes {fmt(proc100)}, committer makes+merges {fmt(make100)}")
    ratio = add64 / ref64 if ref64 else float("nan")
    ref_s = fmt(ref64) if ref64 else "- (mls_rs_uniffi not installed: make bench)"
    print(f"add 1 @ N=64: ours {fmt(add64)}, mls-rs {ref_s}, ratio {ratio:.2f}x (target <= 1)")
    print(f"load: {Path('/proc/loadavg').read_text().strip()}")
    print(
        f"groups undecryptable={undecryptable} converged={conv:.2f} add64_ratio_vs_mls_rs={ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
