"""What each command imports: a router's RAM and start time are paid per imported module.

`qpc version` is what opkg's postinst and every health script run; `qpc node` is the daemon
that idles on the router for weeks. Neither may pull in the REPL (prompt_toolkit and its
wcwidth tables), the QR code renderer, the user agent or backup, nor Prometheus until metrics
are scraped or the Stats RPC is called; `qpc version` not even Trio
(docs/performance.md, "Memory and start", has the figures per module). Each case runs in a
fresh interpreter: the test process itself has imported everything already.
"""

from __future__ import annotations

import pytest
from fresh_interpreter import run_fresh

# Imported by the node's own modules once it is configured, not by the CLI's dispatch.
NODE_MODULES = ("qpc_node.cli", "qpc_node.node", "qpc_node.mesh.service")

# Never in a node: interactive client, QR codes, the user agent, backup.
NOT_IN_NODE = (
    "prompt_toolkit",
    "wcwidth",
    "segno",
    "qpc_node.repl",
    "qpc_node.client.agent",
    "qpc_node.client.fingerprint",
    "qpc_node.ops.backup",
    "qpc_node.demo",
    "qpc_sim",
)

# Not at import: only a scrape (metrics on) or the first Stats call builds the registry;
# the metrics HTTP server is imported when its listener starts; tomllib when a TOML config
# file is read (a router's node has none: UCI gives flags and QPC_* variables).
NOT_AT_NODE_START = ("prometheus_client", "qpc_node.ops.http", "tomllib")


def _loaded(code: str) -> set[str]:
    return set(run_fresh(code + "\nimport sys\nRESULT = sorted(sys.modules)"))


def _hits(loaded: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == b or m.startswith(b + ".") for b in banned))


def test_version_imports_neither_trio_nor_the_node() -> None:
    loaded = _loaded(
        "import contextlib, io\nfrom qpc_node.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['version']) == 0"
    )
    assert _hits(loaded, ("trio", "qpc_node.node", "aioquic", "cryptography", *NOT_IN_NODE)) == []


@pytest.mark.parametrize("module", NODE_MODULES)
def test_node_imports_no_client_side_code(module: str) -> None:
    loaded = _loaded(f"import {module}")
    assert _hits(loaded, (*NOT_IN_NODE, *NOT_AT_NODE_START)) == []
