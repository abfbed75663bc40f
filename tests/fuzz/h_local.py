"""Local text inputs: REPL lines and configuration (TOML file and QPC_* environment)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, get_args

from qpc_node.errors import ConfigError
from qpc_node.ops import config as config_mod
from qpc_node.ops.config import load_config
from qpc_node.repl import commands
from qpc_node.repl.commands import UsageError, parse
from tests.fuzz.registry import Invariant, environment, register

FPR = "ab" * 32
_COMMAND_TYPES = get_args(commands.Command)


def _repl_seeds() -> list[bytes]:
    lines = [
        "/help", "/help dm", "/whoami", "/stats", "/quit", "/exit", "# comment", "",
        f"/dm {FPR} hello there", f"/mesh dm qpc:{FPR.upper()} hi", f"/verify {FPR[:32]} {FPR[32:]}",
        "/group create team", f"/group invite team {FPR}", "/group send team hi all",
        "/group members team", "/group leave team", f"/group remove team {FPR}",
        "/inbox", "/inbox --wait 2.5", "/inbox --wait 'unterminated", "/inbox --wait nan",
    ]  # fmt: skip
    return [line.encode() for line in lines]


def repl_target(data: bytes) -> str:
    line = data.decode("utf-8", "surrogateescape" if data[:1] == b"\xff" else "replace")
    cmd = parse(line)
    if cmd is not None and not isinstance(cmd, _COMMAND_TYPES):
        raise Invariant(f"parse returned {cmd!r}")
    return type(cmd).__name__


register(
    "repl.parse",
    seeds=lambda _env: _repl_seeds(),
    target=lambda _env: repl_target,
    allowed=(UsageError,),
)


def _env_keys() -> list[str]:
    keys = list(config_mod._ENV_ALIASES)
    for section, typ in config_mod._SECTIONS.items():
        keys += [f"QPC_{section.upper()}_{f.upper()}" for f in typ.__struct_fields__]
    return [*keys, "QPC_UNKNOWN_KEY"]


ENV_KEYS = _env_keys()


def env_from_bytes(data: bytes) -> dict[str, str]:
    """Each line: one byte picks a QPC_* variable, the rest is its value."""
    env: dict[str, str] = {}
    for line in data.split(b"\n"):
        if line:
            env[ENV_KEYS[line[0] % len(ENV_KEYS)]] = line[1:].decode("utf-8", "surrogateescape")
    return env


def _env_seeds() -> list[bytes]:
    values = {
        "QPC_LOG": "debug", "QPC_LISTEN": "[::1]:4201", "QPC_NODE_PRODUCTION": "yes",
        "QPC_LIMITS_RATE_PER_SECOND": "2.5", "QPC_LIMITS_MAX_PAYLOAD": "1024",
        "QPC_MLS_CIPHERSUITES": "1,3", "QPC_MESH_STATIC_PEERS": "10.0.0.1:4201, [fe80::1%mesh0]:1",
        "QPC_METRICS_LISTEN": "0.0.0.0:9201", "QPC_FEDERATION_MODE": "managed",
        "QPC_LOG_FORMAT": "json", "QPC_MESH_MDNS": "off",
    }  # fmt: skip
    seeds = []
    for i, (k, v) in enumerate(values.items()):
        seeds.append(bytes([ENV_KEYS.index(k)]) + v.encode())
        if i % 3 == 0:
            seeds.append(seeds[-1] + b"\n" + seeds[0])
    return seeds


register(
    "config.env",
    seeds=lambda _env: _env_seeds(),
    target=lambda _env: lambda d: (load_config(None, env=env_from_bytes(d)), "valid")[1],
    allowed=(ConfigError,),
)

_TOML_SEEDS = [
    b'[node]\nlisten = "127.0.0.1:4201"\ndata_dir = "/tmp/x"\nproduction = false\n',
    b'[log]\nlevel = "debug"\nformat = "json"\n[metrics]\nlisten = ""\n',
    b"[limits]\nmax_payload = 1048576\nrate_per_second = 10.5\nrate_burst = 20\n",
    b'[mls]\nciphersuites = [1, 2]\n[mesh]\nmdns = false\ninterfaces = ["br-lan"]\n'
    b'static_peers = ["[fe80::1%mesh0]:4201"]\n',
    b'[federation]\nmode = "managed"\nca = "/etc/qpc/ca.pem"\npinned = ["ab"]\n'
    b"[node]\nproduction = true\n",
    b"node = 1\n",
    b'[node]\nlisten = "[::1"\n',
]


@environment("files")
@contextlib.asynccontextmanager
async def files_env(tmp: Path) -> AsyncIterator[Path]:
    yield tmp


def toml_target(tmp: Path) -> Callable[[bytes], Any]:
    path = tmp / "qpc.toml"
    # Also merge with an env override now and then: the merge sees TOML-typed values.
    envs = [{}, {"QPC_NODE_LISTEN": "127.0.0.1:1"}, {"QPC_LOG": "warning"}, {"QPC_MESH_MDNS": "0"}]

    def run(data: bytes) -> str:
        path.write_bytes(data)
        load_config(path, env=envs[len(data) % len(envs)])
        return "valid"

    return run


register(
    "config.toml",
    env="files",
    seeds=lambda _env: list(_TOML_SEEDS),
    target=toml_target,
    allowed=(ConfigError,),
)
