"""What the frozen bundle holds: every module cross/excludes.txt names is absent from it, the
modules kept on purpose next to them import, and the data files nothing reads are gone.

Each check runs the bundle itself (``QPC_MEASURE_DEPS`` in cross/qpc_entry.py imports the
listed modules, ``QPC_MEASURE_BARE`` then exits), so a misspelt exclude, or one PyInstaller
ignores, fails here rather than silently keeping the bytes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pkg_rootfs import REPO
from test_build_gates import excluded_modules

pytestmark = pytest.mark.timeout(240)

# Kept on purpose, each next to an excluded sibling: what Linux, qpc's REPL, the metrics
# endpoint and aioquic import (a wrong exclude would take one of these along).
KEPT = (
    "trio._core._io_epoll",
    "trio.lowlevel",
    "qpc_node.rpc.server",
    "qpc_node.quic.endpoint",
    "trio._subprocess_platform.waitid",
    "prompt_toolkit.input.vt100",
    "prompt_toolkit.output.vt100",
    "asyncio.unix_events",
    "email.utils",
    "email.generator",
    "email.parser",
    "http.client",
    "urllib.request",
    "xml.dom.minidom",
    "xml.dom.expatbuilder",
    "idna.uts46data",
    "importlib.readers",
    "importlib.metadata",
    "concurrent.futures.thread",
    "ifaddr",
    "certifi",
    "decimal",
    "uuid",
)


def bundle_import(tree: Path, modules: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QPC_MEASURE_DEPS": modules, "QPC_MEASURE_BARE": "1"}
    return subprocess.run(
        [str(tree / "usr/bin/qpc")], env=env, capture_output=True, text=True, timeout=60
    )


def builtin_modules() -> set[str]:
    """Modules compiled into the bundled libpython (Debian's: e.g. syslog, _statistics),
    which no exclude can remove; cross/build.sh freezes with /usr/bin/python3.11."""
    debian = Path("/usr/bin/python3.11")
    if not debian.is_file():
        return set(sys.builtin_module_names)
    out = subprocess.run(
        [str(debian), "-c", "import sys; print(*sys.builtin_module_names)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_excluded_modules_are_not_in_the_bundle(tree: Path) -> None:
    present = []
    builtin = builtin_modules()
    for name in sorted(excluded_modules()):
        if name.endswith(".py") or name in builtin:
            continue
        r = bundle_import(tree, name)
        missing = f"ModuleNotFoundError: No module named '{name}'"
        # a parent excluded first (e.g. 'cffi' for nothing, 'wcwidth._wcwidth_c' vs wcwidth)
        # also reads "No module named '<name>'"; anything else means it was frozen
        if r.returncode == 0 or missing not in r.stderr:
            present.append((name, r.returncode, r.stderr.strip().splitlines()[-2:]))
    assert not present, present


def test_modules_kept_on_purpose_import(tree: Path) -> None:
    r = bundle_import(tree, ",".join(KEPT))
    assert r.returncode == 0, r.stderr[-2000:]


def test_unread_data_files_are_not_shipped(tree: Path) -> None:
    internal = tree / "usr/lib/qpc/_internal"
    assert not list(internal.rglob("cacert.pem"))
    infos = list(internal.glob("*.dist-info"))
    assert infos, "importlib.metadata.version() needs the METADATA of these"
    for info in infos:
        assert (info / "METADATA").is_file(), info
        names = {p.name for p in info.iterdir()}
        assert not names & {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}, info
        assert any(info.rglob("LICENSE*")), info  # the licenses stay


def test_bundled_sqlite_is_our_build_with_debians_defaults(tree: Path) -> None:
    """cross/sqlite.sh's libsqlite3 replaced Debian's in the tree, the bundle's sqlite3 module
    runs on it, and the defaults qpc's stores were written against (secure_delete on, URI file
    names, serialized threading) are kept while the extensions nothing uses are gone."""
    script = (REPO / "cross/sqlite.sh").read_text()
    pinned = re.search(r"^sqlite_version=(\S+)$", script, re.M)
    assert pinned, "cross/sqlite.sh pins no sqlite_version"
    r = subprocess.run(
        [str(tree / "usr/bin/qpc"), "version", "--libs"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()
    version = next(ln.removeprefix("sqlite ") for ln in out if ln.startswith("sqlite 3."))
    assert version == pinned.group(1)
    assert any(ln.startswith("openssl OpenSSL 3.") for ln in out), out
    options = set(next(ln for ln in out if ln.startswith("sqlite options ")).split()[2:])
    assert {"SECURE_DELETE", "THREADSAFE=1", "USE_URI", "OMIT_LOOKASIDE"} <= options, options
    extensions = ("ENABLE_FTS", "ENABLE_RTREE", "ENABLE_GEOPOLY", "ENABLE_SESSION")
    assert not {o for o in options if o.startswith(extensions)}, options
