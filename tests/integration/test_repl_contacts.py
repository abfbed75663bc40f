"""Contacts in the REPL: names and short codes wherever a user is named (issue 12)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from node_harness import cli_fingerprint, run_repl, start_node_process
from repl_harness import start_pty_repl

from qpc_node.client.fingerprint import short_code

pytestmark = pytest.mark.timeout(180)


async def test_contact_names_and_short_codes_in_commands(tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    a_fp, b_fp = cli_fingerprint(alice), cli_fingerprint(bob)
    proc, info = await start_node_process(tmp_path / "node")
    port, pin = info.port, info.cert_fingerprint

    async def run(who: Path, script: str, ok: bool = True) -> tuple[str, str]:
        r = await run_repl(who, port, pin, script)
        assert (r.returncode == 0) == ok, (r.stdout.decode(), r.stderr.decode())
        return r.stdout.decode(), r.stderr.decode()

    try:
        await run(bob, "/whoami\n")  # homes bob, uploads his KeyPackages
        out, _ = await run(
            alice,
            f"/contact add bob {b_fp}\n/contacts\n/dm bob hello by name\n"
            f"/dm {short_code(b_fp)} hello by code\n/group create team\n"
            "/group invite team bob\n/verify bob\n",
        )
        assert f"bob = {short_code(b_fp)}" in out
        assert f"bob              {short_code(b_fp)}  {b_fp}" in out
        assert out.count("sent to [") == 2 and "(stored on this node)" in out
        assert f"invited {short_code(b_fp)} to team" in out
        assert f"safety number with {short_code(b_fp)}" in out

        out, _ = await run(bob, "/inbox --wait 10\n")
        assert f"{short_code(a_fp)}: hello by name" in out
        assert f"{short_code(a_fp)}: hello by code" in out

        # Unknown names are a clear error, and stop a script.
        _, err = await run(alice, "/dm carol hi\n", ok=False)
        assert "line 1: error: no contact or known user 'carol'" in err
        # A removed name no longer resolves; the short code still does (bob is known).
        out, err = await run(alice, "/contact remove bob\n/verify bob\n", ok=False)
        assert "forgot the name bob" in out and "no contact or known user 'bob'" in err
        out, _ = await run(alice, f"/verify {short_code(b_fp)}\n/contacts\n")
        assert f"-                {short_code(b_fp)}" in out
        # A name is unique.
        carol = cli_fingerprint(tmp_path / "carol")
        _, err = await run(alice, f"/contact add x {b_fp}\n/contact add x {carol}\n", ok=False)
        assert "line 2: error: the name 'x' is taken" in err
    finally:
        proc.kill()
        await proc.wait()


async def test_tab_completes_contact_names_in_the_interactive_repl(tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    cli_fingerprint(alice)
    b_fp = cli_fingerprint(bob)
    proc, info = await start_node_process(tmp_path / "node")
    repl = None
    try:
        repl = await start_pty_repl(alice, info.port, info.cert_fingerprint)
        await repl.wait_for("type /help")
        repl.type(f"/contact add bobby {b_fp}")
        await repl.wait_for(f"bobby = {short_code(b_fp)}")
        os.write(repl._master, b"/veri\t")  # the command word completes too
        await repl.wait_for("/verify")
        os.write(repl._master, b" bob\t")  # completion is applied asynchronously
        # (the terminal may draw the space by moving the cursor: compare without spaces)
        await repl.wait_until(lambda: "/verifybobby" in repl.text.replace(" ", ""), "completion")
        os.write(repl._master, b"\r")
        await repl.wait_for(f"safety number with {short_code(b_fp)}")
        assert await repl.quit() == 0
        repl = None
    finally:
        if repl is not None:
            await repl.aclose()
        proc.kill()
        await proc.wait()
