"""Interactive REPL: prompt_toolkit on its own thread, Trio for everything else.

prompt_toolkit runs on asyncio, so each prompt runs on one long-lived asyncio
loop in its own thread (``PromptLoop``); the receive loop prints arriving messages
above the prompt (``patch_stdout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
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
    """Tab completion of commands, contact and channel names (``commands.completions``).

    Runs on prompt_toolkit's thread: it reads the name list the REPL refreshes after
    each command, never client.db itself."""

    def __init__(
        self, names: Callable[[], list[str]], channels: Callable[[], list[str]] = list
    ) -> None:
        self._names = names
        self._channels = channels

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        before = document.text_before_cursor
        last = before.split(" ")[-1]
        for word in completions(before, self._names(), self._channels()):
            yield Completion(word, start_position=-len(last))


class PromptLoop:
    """Prompts on ONE asyncio event loop that outlives each prompt.

    ``patch_stdout``'s flush thread hands text to the running prompt's event loop
    (``call_soon_threadsafe``) to print it above the prompt. ``PromptSession.prompt``
    runs every prompt on a loop of its own that is closed when the prompt ends, so
    text handed to a prompt that ended at once (its line was already typed: a
    paste, or two lines typed together) was dropped unseen: a command's whole
    output missing. On a loop that keeps running, the handed text is printed
    after the prompt ended (``run_in_terminal`` then writes directly).
    """

    DRAIN_S = 1.0
    """At close: how long text already handed to the loop may take to be printed."""

    def __init__(self, session: PromptSession[str]) -> None:
        self._session = session
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="qpc-prompt", daemon=True
        )
        self._thread.start()

    async def prompt(self, pre_run: Callable[[], None] | None = None) -> str:
        """One line; EOFError / KeyboardInterrupt as ``PromptSession.prompt`` raises.
        ``pre_run`` runs on the loop once the prompt is up (as prompt_toolkit's)."""
        fut = asyncio.run_coroutine_threadsafe(
            self._session.prompt_async(pre_run=pre_run), self._loop
        )
        try:
            return await trio.to_thread.run_sync(fut.result, abandon_on_cancel=True)
        finally:
            fut.cancel()  # no-op once done; ends the prompt when we were cancelled

    def close(self) -> None:
        """Let pending writes finish (bounded), then stop the loop and its thread."""

        async def drain() -> None:
            me = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not me]
            if pending:
                await asyncio.wait(pending, timeout=self.DRAIN_S)

        done = asyncio.run_coroutine_threadsafe(drain(), self._loop)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            done.result(self.DRAIN_S + 1.0)  # never hang the exit on a write
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


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
        "qpc> ",
        completer=ReplCompleter(lambda: repl.names, lambda: repl.channel_names),
        complete_while_typing=False,
    )
    repl.out("type /help for commands (Tab completes commands and contact names), /quit to leave")
    prompts = PromptLoop(session)
    try:
        with patch_stdout(raw=True):
            await _run(repl, prompts)
    finally:
        prompts.close()
    return 0


async def _run(repl: Repl, prompts: PromptLoop) -> None:
    """Read and run lines until /quit or end of input, receiving all the while."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive_loop, repl)
        while True:
            try:
                line = await prompts.prompt()
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
