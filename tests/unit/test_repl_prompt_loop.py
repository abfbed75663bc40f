"""The interactive REPL's prompts: text handed to a prompt that just ended is shown.

``patch_stdout``'s flush thread prints a command's output by handing it to the
event loop of the prompt it sees running (``call_soon_threadsafe``). When the next
line was already typed (a paste; the mesh tests type ``/mesh peers`` and ``/help
mesh`` together) that prompt ends at once; with ``PromptSession.prompt``'s loop
per prompt, closed when it returns, the handed output was dropped (the ``/mesh
peers`` table missing in tests/mesh/test_mesh_five_netns.py, 1 run in 3-13).
"""

from __future__ import annotations

import asyncio
import io
import threading

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app, run_in_terminal
from prompt_toolkit.application.current import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output.plain_text import PlainTextOutput

from qpc_node.repl.interactive import PromptLoop


async def test_output_handed_to_a_prompt_that_ended_at_once_is_printed() -> None:
    buf = io.StringIO()
    out = PlainTextOutput(buf)
    with create_pipe_input() as inp, create_app_session(input=inp, output=out):
        prompts = PromptLoop(PromptSession("qpc> "))
        try:
            loops: list[asyncio.AbstractEventLoop] = []

            def typed_ahead() -> None:
                loops.append(get_app().loop)  # what the flush thread reads
                inp.send_text("/help mesh\r")  # the line is already there

            assert await prompts.prompt(typed_ahead) == "/help mesh"
            printed = threading.Event()

            def write() -> None:  # as StdoutProxy._write_and_flush does
                out.write_raw("the /mesh peers table\n")
                out.flush()
                printed.set()

            # The flush thread hands the text over just after the prompt ended.
            loops[0].call_soon_threadsafe(lambda: run_in_terminal(write, in_executor=False))
            with trio.fail_after(5):
                await trio.to_thread.run_sync(printed.wait)
            assert "the /mesh peers table" in buf.getvalue()
        finally:
            prompts.close()
