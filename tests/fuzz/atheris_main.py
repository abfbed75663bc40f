"""Coverage-guided run of ONE harness under atheris (libFuzzer), for the long run.

    python -m tests.fuzz.atheris_main HARNESS CRASH_DIR [libFuzzer flags: -runs=N ...]

qpc_node is imported under atheris instrumentation (coverage feedback comes
from our code, not from trio or protobuf). Pure targets run on libFuzzer's
thread; targets with an environment run on a Trio loop in a second thread
(``trio.from_thread.run``), so the node's store, server and agent stay open
for the whole run. A crash is written to CRASH_DIR (input + traceback, at
most 20 per harness) and the run goes on, so the final "Done N runs" line
counts every input; scripts/fuzz_long.py reads it.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["qpc_node"]):
    import qpc_node.client.agent
    import qpc_node.ops.config
    import qpc_node.repl.commands
    import qpc_node.rpc.client
    import qpc_node.rpc.server
    import qpc_node.service.delivery
    import qpc_node.service.directory
    import qpc_node.wire.envelope  # noqa: F401

import trio

from tests.fuzz.runner import HarnessResult, Opened, Session, execute, execute_sync

MAX_SAVED = 20


def main() -> None:
    name, crash_dir, flags = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    crash_dir.mkdir(parents=True, exist_ok=True)
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with Session([name], Path(tmp)) as session:
                box["opened"] = session.opened[name]
                box["token"] = trio.lowlevel.current_trio_token()
                ready.set()
                await trio.sleep_forever()

    threading.Thread(target=trio.run, args=(serve,), daemon=True).start()
    if not ready.wait(120):
        raise SystemExit(f"{name}: environment did not open")
    opened: Opened = box["opened"]
    result = HarnessResult(name)
    saved = 0
    # Pure targets run right here: a thread hop per input would cost more than they do.
    sync = opened.harness.env is None and not inspect.iscoroutinefunction(opened.target)

    def one(data: bytes) -> None:
        nonlocal saved
        before = len(result.crashes)
        if sync:
            execute_sync(opened.harness, opened.target, data, result)
        else:
            trio.from_thread.run(execute, opened.harness, opened.target, data, result,
                                 trio_token=box["token"])  # fmt: skip
        if len(result.crashes) > before:
            crash = result.crashes[-1]
            (crash_dir / "count").open("a").write("1\n")
            if saved < MAX_SAVED:
                saved += 1
                (crash_dir / f"crash-{name}-{crash.digest}").write_bytes(data)
                (crash_dir / f"crash-{name}-{crash.digest}.txt").write_text(
                    f"{crash.error}\n\n{crash.traceback}"
                )
            del result.crashes[:]

    seeds_dir = Path(tempfile.mkdtemp(prefix=f"qpc-fuzz-{name}-"))
    for i, seed in enumerate(opened.seeds):
        (seeds_dir / f"seed-{i}").write_bytes(seed)
    atheris.Setup([sys.argv[0], *flags, str(seeds_dir)], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
