"""Interactive REPL: prompt_toolkit on its own thread, Trio for everything else.

prompt_toolkit's ``prompt()`` blocks, so it runs via ``trio.to_thread``; the
receive loop prints arriving messages above the prompt (``patch_stdout``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.patch_stdout import patch_stdout

from qpc_node.client.session import NotConnected
from qpc_node.errors import QpcError
from qpc_node.ops.log import get_logger
from qpc_node.repl.commands import UsageError, completions
from qpc_node.repl.runner import RECEIVE_POLL, Quit, Repl

log = get_logger("qpc.repl")


class ReplCompleter(Completer):
    """Tab completion of commands and contact names (see ``commands.completions``).

    Runs on prompt_toolkit's thread: it reads the name list the REPL refreshes after
    each command, never client.db itself."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self._names = names

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        before = document.text_before_cursor
        last = before.split(" ")[-1]
        for word in completions(before, self._names()):
            yield Completion(word, start_position=-len(last))


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
        generation = repl.session.generation if repl.session is not None else 0
        try:
            await repl.agent.receive(RECEIVE_POLL)
            await repl.show_unshown()
            await repl.agent.flush_outbox()
            delay, failing = 1.0, False
        except QpcError as exc:
            if not repl.connected:
                continue
            if repl.session is not None and repl.session.generation != generation:
                continue  # the call died with the connection a move replaced
            if not failing:
                repl.out(f"(receive failed: {exc}; retrying with backoff)")
            failing = True
            await trio.sleep(delay)
            delay = min(delay * 2, 60.0)


async def run_interactive(repl: Repl) -> int:
    await repl.refresh_names()
    session: PromptSession[str] = PromptSession(
        "qpc> ", completer=ReplCompleter(lambda: repl.names), complete_while_typing=False
    )
    repl.out("type /help for commands (Tab completes commands and contact names), /quit to leave")
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
