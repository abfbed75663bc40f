"""Command line entry point: ``qpc``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qpc_node import __version__
from qpc_node.errors import ConfigError, QpcError

if TYPE_CHECKING:
    import trio

    from qpc_node.groups.core import GroupConfig
    from qpc_node.ops.config import Config


def default_data_dir() -> Path:
    """The user's data dir under XDG data home (``~/.local/share/qpc``)."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "qpc"


def _cmd_version(args: argparse.Namespace) -> int:
    from qpc_node import _core

    print(f"qpc {__version__} (core {_core.__version__})")
    if args.libs:
        # What an operator checks when a CVE lands: the libraries this binary carries (the
        # bundle ships its own Python, OpenSSL and SQLite, not the system's). Imported only
        # here, so a plain `qpc version` stays fast.
        import platform
        import sqlite3
        import ssl

        print(f"python {platform.python_version()}")
        print(f"openssl {ssl.OPENSSL_VERSION}")
        print(f"sqlite {sqlite3.sqlite_version}")
        db = sqlite3.connect(":memory:")
        options = " ".join(row[0] for row in db.execute("PRAGMA compile_options"))
        db.close()
        print(f"sqlite options {options}")
    return 0


def _cmd_id(args: argparse.Namespace) -> int:
    from qpc_node.client.fingerprint import grouped, qr_terminal, short_code
    from qpc_node.client.identity_store import open_or_create_identity

    ident, created = open_or_create_identity(Path(args.data), os.environ.get("QPC_PASSPHRASE"))
    fpr = ident.fingerprint
    if created:
        print(f"created a new identity in {args.data}")
    print(f"fingerprint: {grouped(fpr)}")
    print(f"short code:  {short_code(fpr)}")
    if not args.no_qr:
        print(qr_terminal(fpr), end="")
    return 0


def _load_cfg(
    args: argparse.Namespace, defaults: dict[str, dict[str, str]] | None = None
) -> Config:
    from qpc_node.ops.config import load_config

    node: dict[str, str] = {}
    if getattr(args, "listen", None):
        node["listen"] = args.listen
    if getattr(args, "data", None):
        node["data_dir"] = args.data
    overrides: dict[str, dict[str, str]] = {"node": node}
    if getattr(args, "metrics", None) is not None:
        overrides["metrics"] = {"listen": args.metrics}
    log: dict[str, str] = {}
    if getattr(args, "log_level", None):
        log["level"] = args.log_level
    cfg_path = Path(args.config) if getattr(args, "config", None) else None
    overrides["log"] = log
    if getattr(args, "local_only", False):
        from qpc_node.ops.config import LOCAL_LISTEN

        # Loopback only, no mDNS, no static peers: nobody else can reach this node.
        if node.get("listen"):
            raise ConfigError("--local-only and --listen: choose one")
        node["listen"] = LOCAL_LISTEN
        overrides["mesh"] = {"mdns": "false", "static_peers": ""}
    cfg = load_config(cfg_path, overrides=overrides, defaults=defaults)
    if getattr(args, "local_only", False):
        _note_ignored_peers(cfg_path)
    return cfg


def _note_ignored_peers(cfg_path: Path | None) -> None:
    """--local-only drops configured static peers: say so rather than silently."""
    from qpc_node.ops.config import load_config

    peers = load_config(cfg_path).mesh.static_peers
    if peers:
        print(f"--local-only: ignoring {len(peers)} static peer(s) from the config", flush=True)


def _loopback_for(host: str) -> str:
    """Where a REPL on this machine reaches a node bound to ``host``: the node's own
    address, or loopback when it listens on every address (``::``/``0.0.0.0``)."""
    if host in ("::", "0.0.0.0", ""):
        return "127.0.0.1"  # [::] is dual-stack; 127.0.0.1 also works for 0.0.0.0
    return host


async def _until_signalled(
    nursery: trio.Nursery,
    on_hup: Callable[[], Awaitable[None]] | None = None,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """SIGINT/SIGTERM cancel (the node drains); SIGHUP reloads the config.

    Started (receiver installed) before the node announces itself: until the receiver
    is open a SIGHUP (procd's reload) or a supervisor's SIGTERM right after the
    announcement would kill the process with the default action instead of
    reloading or draining.
    """
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for sig in signals:
            if sig == signal.SIGHUP:
                if on_hup is not None:
                    await on_hup()
                continue
            nursery.cancel_scope.cancel()
            return


def _cmd_node(args: argparse.Namespace) -> int:
    import trio

    from qpc_node.node import Node
    from qpc_node.ops.log import setup_logging
    from qpc_node.ops.memory import freeze_startup_heap_later

    cfg = _load_cfg(args)
    setup_logging(cfg.log.level, cfg.log.format)
    node = Node(cfg, default_data=default_data_dir() / "node")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(_until_signalled, nursery, reload)
            info = await nursery.start(node.run)
            print(
                f"qpc node listening on {info.host}:{info.port} pin={info.cert_fingerprint}",
                flush=True,
            )
            if node.mesh is not None:  # what other nodes put after '#' in static_peers
                print(f"qpc node mesh id {node.mesh.node_id.hex()}", flush=True)
            nursery.start_soon(freeze_startup_heap_later)

    async def reload() -> None:
        from qpc_node.ops.log import get_logger

        try:
            report = await node.reload(_load_cfg(args))
        except ConfigError as exc:
            get_logger("qpc.cli").error("config reload refused; keeping the old one: %s", exc)
            print(f"config reload refused; keeping the old one: {exc}", flush=True)
            return
        parts = [
            f"{label}: {', '.join(keys)}"
            for label, keys in (
                ("applied live", report.applied),
                ("restart needed for", report.needs_restart),
                ("failed", report.errors),
            )
            if keys
        ]
        print(f"config reloaded; {'; '.join(parts) or 'no changes'}", flush=True)

    trio.run(main)
    return 0


def _cmd_repl(args: argparse.Namespace) -> int:
    import trio

    from qpc_node.ops.config import parse_hostport
    from qpc_node.ops.log import setup_logging

    setup_logging(os.environ.get("QPC_LOG", "warning"))
    host, port = parse_hostport(args.server)
    lines: list[str] | None = None
    if args.script is not None:
        text = sys.stdin.read() if args.script == "-" else Path(args.script).read_text()
        lines = text.splitlines()
    pin = args.pin or _local_node_pin(Path(args.data))
    return trio.run(
        _repl_main,
        Path(args.data),
        host,
        port,
        pin,
        lines,
        args.dead_peer_timeout,
        args.failover_after,
        args.committer_timeout,
    )


def group_config(committer_timeout: float | None) -> GroupConfig | None:
    """The REPL's group settings (None: the defaults of qpc_node/groups/core.py)."""
    from qpc_node.groups.core import GroupConfig

    if committer_timeout is None:
        return None
    return GroupConfig(committer_timeout_ms=int(committer_timeout * 1000))


def _local_node_pin(user_data: Path) -> str | None:
    """No --pin and none remembered: trust the certificate of *our own* local node.

    The key dir is on this machine and ours, so this is not trust on first use of
    a remote party; a remote node always needs --pin once.
    """
    from qpc_node.client.connect import remembered_pin
    from qpc_node.node import KEYS_SUBDIR
    from qpc_node.ops.backup import node_cert_fingerprint

    if remembered_pin(user_data):
        return None
    return node_cert_fingerprint(default_data_dir() / "node" / KEYS_SUBDIR) or None


async def _repl_main(
    data: Path,
    host: str,
    port: int,
    pin: str | None,
    script: list[str] | None,
    dead_peer_timeout: float | None = None,
    failover_after: float | None = None,
    committer_timeout: float | None = None,
) -> int:
    from qpc_node.client.connect import open_session
    from qpc_node.client.reconnect import ReconnectPolicy
    from qpc_node.quic import QuicSettings
    from qpc_node.repl.runner import Repl

    def out(line: str) -> None:
        print(line, flush=True)

    def err(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    settings = None if dead_peer_timeout is None else QuicSettings(dead_peer_timeout)
    policy = None if failover_after is None else ReconnectPolicy(failover_after=failover_after)
    groups = group_config(committer_timeout)
    async with open_session(
        data,
        host,
        port,
        pin=pin,
        passphrase=os.environ.get("QPC_PASSPHRASE"),
        settings=settings,
        policy=policy,
        group_config=groups,
    ) as (agent, session):
        repl = Repl(agent, out, session)
        if script is not None:
            return await repl.run_script(script, err)
        import trio

        from qpc_node.ops.memory import freeze_startup_heap_later
        from qpc_node.repl.interactive import run_interactive

        async with trio.open_nursery() as nursery:
            # A REPL runs for hours: its start-up heap (and, under `qpc`, its node's)
            # out of the full collections, as `qpc node` does.
            nursery.start_soon(freeze_startup_heap_later)
            rc = await run_interactive(repl)
            nursery.cancel_scope.cancel()
        return rc


def _cmd_default(args: argparse.Namespace) -> int:
    """``qpc`` alone: a node of your own plus a REPL on it."""
    import trio

    from qpc_node.node import Node
    from qpc_node.ops.lockfile import NodeBusy
    from qpc_node.ops.log import setup_logging

    # Quieter than a daemon's default: the log shares the terminal with the REPL.
    # QPC_LOG / QPC_LOG_LEVEL or the config file still choose (config's layers).
    cfg = _load_cfg(args, defaults={"log": {"level": "warning"}})
    setup_logging(cfg.log.level, cfg.log.format)
    base = Path(args.data) if args.data else default_data_dir()
    node = Node(cfg, default_data=base / "node")

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            try:
                info = await nursery.start(node.run)
            except (OSError, NodeBusy) as exc:
                # Our own node already runs (its data dir is locked, or the port is
                # taken): attach to it.
                from qpc_node.node import KEYS_SUBDIR
                from qpc_node.ops.config import parse_hostport
                from qpc_node.quic.tls import load_or_create_node_credentials

                host, port = parse_hostport(cfg.node.listen)
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                print(f"({why}: attaching to the node on {cfg.node.listen})")
                pin = load_or_create_node_credentials(base / "node" / KEYS_SUBDIR).fingerprint
                rc = await _repl_main(base, _loopback_for(host), port, pin, None)
                nursery.cancel_scope.cancel()
                return rc
            print(f"node on {info.host}:{info.port} pin={info.cert_fingerprint}")
            host = _loopback_for(info.host)
            rc = await _repl_main(base, host, info.port, info.cert_fingerprint, None)
            nursery.cancel_scope.cancel()
            return rc

    return trio.run(main)


def _cmd_trust(args: argparse.Namespace) -> int:
    """``qpc trust FPR``: the node accepts a node id whose key it refused (changed key).

    The same call as ``/mesh trust``; the node answers it only over loopback, so
    this runs on the node's machine (``--server`` defaults to the local node).
    """
    import trio

    from qpc_node.ops.config import parse_hostport
    from qpc_node.ops.log import setup_logging

    setup_logging(os.environ.get("QPC_LOG", "warning"))
    host, port = parse_hostport(args.server)
    pin = args.pin or _local_node_pin(Path(args.data))
    return trio.run(_trust_main, Path(args.data), host, port, pin, args.fingerprint)


async def _trust_main(data: Path, host: str, port: int, pin: str | None, fpr: str) -> int:
    from qpc_node.client.connect import open_session
    from qpc_node.repl.runner import format_trust

    async with open_session(
        data, host, port, pin=pin, passphrase=os.environ.get("QPC_PASSPHRASE")
    ) as (agent, _session):
        print(format_trust(await agent.mesh_trust(fpr)), flush=True)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import trio

    from qpc_node import demo
    from qpc_node.ops.log import setup_logging

    setup_logging(os.environ.get("QPC_LOG", "error"))
    keep = Path(args.data) if args.data else None
    return trio.run(demo.main, keep, lambda line: print(line, flush=True), args.step_timeout)


def _backup_passphrase(confirm: bool) -> str:
    pw = os.environ.get("QPC_BACKUP_PASSPHRASE")
    if pw:
        return pw
    if not sys.stdin.isatty():
        raise ConfigError("set QPC_BACKUP_PASSPHRASE (no terminal to ask on)")
    import getpass

    pw = getpass.getpass("backup passphrase: ")
    if confirm and getpass.getpass("again: ") != pw:
        raise ConfigError("passphrases differ")
    if len(pw) < 8:
        raise ConfigError("use a backup passphrase of at least 8 characters")
    return pw


def _node_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    from qpc_node.node import resolve_dirs

    return resolve_dirs(_load_cfg(args), default_data_dir() / "node")


def _cmd_backup(args: argparse.Namespace) -> int:
    from qpc_node.ops.backup import create_backup

    data, keys = _node_dirs(args)
    size = create_backup(data, keys, Path(args.file), _backup_passphrase(confirm=True))
    print(f"backup written to {args.file} ({size} bytes, encrypted)")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from qpc_node.ops.backup import restore_backup

    data, keys = _node_dirs(args)
    manifest = restore_backup(
        Path(args.file), data, keys, _backup_passphrase(confirm=False), force=args.force
    )
    print(
        f"restored node {str(manifest.get('cert', ''))[:16]}… into {data}; previous files kept as *.old"
    )
    return 0


NODE_EPILOG = """\
configuration (--config TOML file, QPC_SECTION_KEY environment, these flags; later wins):
  node      listen, data_dir, key_dir, production, drain_grace_s
  log       level, format (kv|json)
  metrics   listen ('' = off)
  limits    max_payload, rate_per_second, rate_burst, mailbox_max_messages,
            mailbox_max_bytes, max_connections, max_connections_per_ip,
            max_half_open, max_half_open_per_ip, half_open_timeout_s,
            retry_threshold, rpc_buffer_bytes, rpc_buffer_bytes_per_ip,
            send_queue_bytes, send_queue_bytes_per_ip, send_timeout_s,
            keypackage_ttl_s, retention_s, relay_custody_per_user
  mls       ciphersuites
  mesh      mdns (announce and browse: true, false, or auto = on unless
            node.listen is loopback; default auto), interfaces (for mDNS; empty =
            every non-loopback interface), static_peers (host:port#nodefingerprint,
            comma-separated; a node prints its mesh id at start); mdns or a static
            peer puts the node on the mesh: federation links, routing, relay to
            users homed elsewhere; carrier (a laptop that may carry held copies
            between mesh islands)
  federation mode (mesh = trust on first use, a changed key refused until
            `qpc trust FPR`; managed = community CA), ca, cert, key (managed: PEM
            files; cert+key, Ed25519, become the node's identity), pinned (not
            yet: refused)
  channels  retention_s (default 48 h), max_messages, max_bytes (caps: the message
            due to go soonest is evicted first), max_expiry_s (expiry further ahead
            refused; 7 d), max_message_bytes, publish_rate (per session, per second)
  storefwd  max_held, held_per_origin (held while no route: in total and per
            origin node), max_expiry_ahead_s (farther expiries refused),
            reroute_after_s, spray_tokens, spray_delay_s (copies to carriers)
  sync      interval_s (inventory sync with one random neighbour every this many
            seconds, jittered; also on every link-up; default 60)

With no config a node listens on [::]:4201 and discovers peers by mDNS on every
non-loopback interface; --local-only keeps it on 127.0.0.1:4201 without mDNS
or static peers.

SIGHUP reloads the config and prints what was applied live and what needs a restart
(docs/operations.md has the table). SIGTERM/SIGINT drain and stop.
"""


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.5 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be within 0.5..3600 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qpc", description="quicprochat mesh messenger node")
    p.add_argument(
        "--local-only",
        action="store_true",
        help="(qpc alone) keep your node on 127.0.0.1:4201, no mDNS, no static peers",
    )
    sub = p.add_subparsers(dest="command")

    v = sub.add_parser("version", help="print the version")
    v.add_argument(
        "--libs", action="store_true", help="also the Python, OpenSSL and SQLite it carries"
    )
    v.set_defaults(func=_cmd_version)

    i = sub.add_parser("id", help="show (and on first use create) your identity")
    i.add_argument("--data", default=str(default_data_dir()), help="data dir")
    i.add_argument("--no-qr", action="store_true", help="skip the QR code")
    i.set_defaults(func=_cmd_id)

    n = sub.add_parser(
        "node",
        help="run the node daemon",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=NODE_EPILOG,
    )
    n.add_argument("--listen", help="HOST:PORT (default [::]:4201, every address)")
    n.add_argument(
        "--local-only",
        action="store_true",
        help="listen on 127.0.0.1:4201 only, no mDNS, no static peers",
    )
    n.add_argument("--data", help="data dir (queues, node keys)")
    n.add_argument("--config", help="TOML config file")
    n.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    n.add_argument("--metrics", help="HOST:PORT for /metrics, /healthz, /readyz ('' = off)")
    n.set_defaults(func=_cmd_node)

    for name, fn, text in (
        ("backup", _cmd_backup, "write an encrypted backup of the node (database + keys)"),
        ("restore", _cmd_restore, "restore a node from a backup (node must be stopped)"),
    ):
        b = sub.add_parser(name, help=text)
        b.add_argument("file")
        b.add_argument("--data", help="node data dir")
        b.add_argument("--config", help="TOML config file")
        if name == "restore":
            b.add_argument("--force", action="store_true", help="replace another node's keys")
        b.set_defaults(func=fn)

    r = sub.add_parser("repl", help="attach a REPL to a node")
    r.add_argument("--server", default="127.0.0.1:4201", help="HOST:PORT of the node")
    r.add_argument("--pin", help="node certificate fingerprint (remembered after first use)")
    r.add_argument("--data", default=str(default_data_dir()), help="your data dir")
    r.add_argument("--script", help="run commands from FILE ('-' for stdin) and exit")
    r.add_argument(
        "--dead-peer-timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="notice a silent node (killed, unreachable) within this long and reconnect "
        "(default 30; lower costs more keepalive packets)",
    )
    r.add_argument(
        "--failover-after",
        type=_positive_seconds,
        metavar="SECONDS",
        help="after the node has been unreachable this long, also try the other mesh "
        "nodes it listed, lowest RTT first (default 10)",
    )
    r.add_argument(
        "--committer-timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="a group request nobody committed for this long: the next member of the "
        "group's committer list commits it (default 120; docs/groups.md)",
    )
    r.set_defaults(func=_cmd_repl)

    t = sub.add_parser(
        "trust",
        help="accept a node's changed federation key (run on the node's machine)",
    )
    t.add_argument("fingerprint", help="the node id, or a unique hex prefix of it")
    t.add_argument("--server", default="127.0.0.1:4201", help="HOST:PORT of the local node")
    t.add_argument("--pin", help="node certificate fingerprint (remembered after first use)")
    t.add_argument("--data", default=str(default_data_dir()), help="your data dir")
    t.set_defaults(func=_cmd_trust)

    d = sub.add_parser(
        "demo", help="three nodes and three users on loopback: a relayed DM and a group"
    )
    d.add_argument(
        "--data",
        metavar="DIR",
        help="keep the demo's data in DIR (empty or new; default: a temp dir)",
    )
    d.add_argument(
        "--step-timeout", type=_positive_seconds, default=30.0, metavar="SECONDS",
        help="fail the demo (exit 1) when a step takes longer (default 30)",
    )  # fmt: skip
    d.set_defaults(func=_cmd_demo)
    return p


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one QpcError or KeyboardInterrupt a nursery wrapped, however deep (e.g. NodeBusy
    from ``nursery.start(node.run)``, or Ctrl-C while a REPL command runs).

    Trio's strict exception groups would otherwise turn a clear refusal, or a Ctrl-C, into a
    traceback.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, (QpcError, KeyboardInterrupt)) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args.func = _cmd_default
        args.data = None
    try:
        try:
            rc: int = args.func(args)
        except BaseExceptionGroup as group:
            raise _sole_error(group) or group from None
    except QpcError as exc:
        print(f"qpc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
