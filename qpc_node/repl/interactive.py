"""Interactive REPL: prompt_toolkit on its own thread, Trio for everything else.

prompt_toolkit's ``prompt()`` blocks, so it runs via ``trio.to_thread``; the
receive loop prints arriving messages above the prompt (``patch_stdout``).
"""

from __future__ import annotations

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.patch_stdout import patch_stdout

from qpc_node.client.session import NotConnected
from qpc_node.errors import QpcError
from qpc_node.ops.log import get_logger
from qpc_node.repl.commands import UsageError
from qpc_node.repl.runner import RECEIVE_POLL, Quit, Repl

log = get_logger("qpc.repl")


async def _receive_loop(repl: Repl) -> None:
    """Receive, show, flush; while the session reconnects, wait for it quietly.

    Connection loss and recovery are the session's to announce (once each); a
    failure with the connection up is shown once per run of failures, then
    retried with backoff.
    """
    delay = 1.0
    failing = False
    while True:
        try:
            await repl.wait_connected()
        except NotConnected:
            await trio.sleep_forever()  # refused for good: the session said why
        try:
            await repl.agent.receive(RECEIVE_POLL)
            await repl.show_unshown()
            await repl.agent.flush_outbox()
            delay, failing = 1.0, False
        except QpcError as exc:
            if not repl.connected:
                continue
            if not failing:
                repl.out(f"(receive failed: {exc}; retrying with backoff)")
            failing = True
            await trio.sleep(delay)
            delay = min(delay * 2, 60.0)


async def run_interactive(repl: Repl) -> int:
    session: PromptSession[str] = PromptSession("qpc> ")
    repl.out("type /help for commands, /quit to leave")
    with patch_stdout(raw=True):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_receive_loop, repl)
            while True:
                try:
                    line = await trio.to_thread.run_sync(session.prompt, abandon_on_cancel=True)
                except (EOFError, KeyboardInterrupt):
                    break
                try:
                    await repl.run_line(line)
                except Quit:
                    break
                except UsageError as exc:
                    repl.out(f"error: {exc}\nusage: {exc.usage}")
                except QpcError as exc:
                    repl.out(f"error: {exc}")
            nursery.cancel_scope.cancel()
    return 0
