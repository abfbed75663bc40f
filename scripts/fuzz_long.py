#!/usr/bin/env python3
"""Long fuzz run: >= 1,000,000 inputs across every harness in tests/fuzz.

    .venv/bin/python scripts/fuzz_long.py [--total 1000000] [--minutes 40] [--jobs 2]
                                          [--out build/fuzz-long] [--engine auto]

Engine ``atheris`` (default when importable): one coverage-guided libFuzzer
process per harness, ``--jobs`` at a time, seeded with the harness's corpus.
Engine ``mutate``: the seeded mutation engine of the CI run, in-process, for
machines without atheris. Each harness gets the inputs and time still left
divided by the harnesses still to run, so a slow harness cannot starve the
rest and the run stops at --total inputs or --minutes, whichever comes first.
Prints the count per harness and in total; crashing inputs are saved under
OUT/crashes/<harness>/ with their tracebacks. Exit status 1 if any crashed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")


def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _crash_count(d: Path) -> int:
    f = d / "count"
    return len(f.read_text().splitlines()) if f.exists() else 0


def run_atheris(names: list[str], args: argparse.Namespace, out: Path) -> dict[str, dict]:
    stop = time.monotonic() + args.minutes * 60
    queue = list(names)
    running: dict[str, tuple[subprocess.Popen[bytes], Path, float]] = {}
    results: dict[str, dict] = {}
    done_inputs = 0

    def launch(name: str) -> None:
        left = len(queue) + 1 + len(running)  # harnesses not finished, this one included
        # Running harnesses count in ``left`` but not in done_inputs: each gets its share.
        runs = max(1000, -(-(args.total - done_inputs) // left))
        secs = max(10, int((stop - time.monotonic()) * args.jobs / left))
        log = out / "logs" / f"{name}.log"
        cmd = [sys.executable, "-m", "tests.fuzz.atheris_main", name,
               str(out / "crashes" / name), f"-runs={runs}", f"-max_total_time={secs}",
               "-max_len=65536", "-timeout=60", "-rss_limit_mb=4096", "-print_final_stats=1"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        running[name] = (proc, log, time.monotonic())
        print(f"  start {name}: up to {runs} inputs / {secs} s", flush=True)

    while queue or running:
        while queue and len(running) < args.jobs and time.monotonic() < stop:
            launch(queue.pop(0))
        if not running:
            break
        time.sleep(1)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            m = _DONE.findall(log.read_bytes())
            n = int(m[-1][0]) if m else 0
            done_inputs += n
            crashes = _crash_count(out / "crashes" / name)
            results[name] = {"inputs": n, "seconds": round(time.monotonic() - t0, 1),
                             "crashes": crashes, "exit": proc.returncode}  # fmt: skip
            print(f"{name:28} {n:9} inputs {results[name]['seconds']:7.1f} s  "
                  f"crashes={crashes} exit={proc.returncode}", flush=True)  # fmt: skip
    for name in queue:
        results[name] = {"inputs": 0, "seconds": 0, "crashes": 0, "exit": None}
    return results


def run_mutate(names: list[str], args: argparse.Namespace, out: Path) -> dict[str, dict]:
    import trio

    from tests.fuzz.runner import Session, run_harness, save_crashes

    results: dict[str, dict] = {}

    async def main() -> None:
        stop = time.monotonic() + args.minutes * 60
        done = 0
        async with Session(names, out / "work") as session:
            for i, name in enumerate(names):
                left = len(names) - i
                n = max(1000, -(-(args.total - done) // left))
                secs = max(10.0, (stop - time.monotonic()) / left)
                r = await run_harness(session, name, n, seed=args.seed, seconds=secs)
                done += r.inputs
                save_crashes([r], out / "crashes" / name)
                results[name] = {"inputs": r.inputs, "seconds": round(r.seconds, 1),
                                 "crashes": len(r.crashes), "exit": 0}  # fmt: skip
                print(f"{name:28} {r.inputs:9} inputs {r.seconds:7.1f} s  "
                      f"crashes={len(r.crashes)}", flush=True)  # fmt: skip

    trio.run(main)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--total", type=int, default=1_000_000)
    p.add_argument("--minutes", type=float, default=40.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "build" / "fuzz-long")
    p.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("harness", nargs="*", help="only these harnesses (default: all)")
    args = p.parse_args()

    from tests.fuzz.registry import harnesses

    names = args.harness or list(harnesses())
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _have_atheris() else "mutate"
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print(f"engine={engine} harnesses={len(names)} total>={args.total} "
          f"minutes<={args.minutes} seed={args.seed}", flush=True)  # fmt: skip
    t0 = time.monotonic()
    results = (run_atheris if engine == "atheris" else run_mutate)(names, args, out)
    total = sum(r["inputs"] for r in results.values())
    crashes = sum(r["crashes"] for r in results.values())
    failed = [n for n, r in results.items() if r["exit"] not in (0, None)]
    summary = {"engine": engine, "total_inputs": total, "crashes": crashes,
               "seconds": round(time.monotonic() - t0, 1), "failed_processes": failed,
               "harnesses": results}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"TOTAL {total} inputs across {len(results)} harnesses in "
          f"{summary['seconds']} s; crashes={crashes}; failed processes={failed}")  # fmt: skip
    return 1 if crashes or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
