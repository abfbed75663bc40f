"""Reload is honest: every changed key is applied to the running node or reported as
needing a restart (qpc_node.node.RELOAD). Each live key is checked by what the node
does afterwards; each restart key by the report and by the value staying in effect;
SIGHUP on a real ``qpc node`` process prints what happened."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import trio
from node_harness import running_node

from qpc_node.errors import StatusCode
from qpc_node.node import RELOAD, RESTART, NodeInfo
from qpc_node.ops.clock import ManualWallClock
from qpc_node.ops.config import Config
from qpc_node.quic import ALPN_CLIENT, ClientTLS, HandshakeError, open_endpoint
from qpc_node.rpc import RpcClient, RpcError
from qpc_node.rpc.client import NO_RETRY
from qpc_node.store.errors import QuotaExceeded
from qpc_node.store.records import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2

pytestmark = pytest.mark.timeout(120)
DAY_MS = 86_400_000


def changed(cfg: Config, **keys: object) -> Config:
    """``cfg`` with ``section__key=value`` replaced (what a reloaded file would give)."""
    by_section: dict[str, dict[str, object]] = {}
    for dotted, value in keys.items():
        section, name = dotted.split("__")
        by_section.setdefault(section, {})[name] = value
    return msgspec.structs.replace(
        cfg,
        **{s: msgspec.structs.replace(getattr(cfg, s), **vals) for s, vals in by_section.items()},
    )


def other_value(key: str, value: object) -> object:
    """A valid value different from ``value`` for ``key``."""
    if key == "federation.mode":
        return "managed"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, list):
        if key == "mesh.static_peers":
            return [*value, "10.0.0.9:4201#" + "ab" * 32]
        return [*value, 2] if key == "mls.ciphersuites" else [*value, "10.0.0.9:4201"]
    assert isinstance(value, str), key
    return "127.0.0.1:1" if key.endswith("listen") else f"/nonexistent/{key}"


@pytest.fixture
def qpc_logging() -> Iterator[None]:
    """setup_logging changes the process's qpc loggers; put them back afterwards."""
    saved = {
        name: (lg.level, list(lg.handlers), lg.propagate)
        for name in ("qpc", "qpc_node")
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (level, handlers, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


# -- restart keys ----------------------------------------------------------------------


async def test_every_restart_key_is_reported_and_keeps_its_running_value(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    restart_keys = [k for k, d in RELOAD.items() if d is RESTART]
    assert "limits.max_payload" in restart_keys and "mls.ciphersuites" in restart_keys
    async with running_node(tmp_path, wall) as (node, _):
        for key in restart_keys:
            section, name = key.split(".")
            running = getattr(getattr(node.cfg, section), name)
            new = changed(node.cfg, **{f"{section}__{name}": other_value(key, running)})
            report = await node.reload(new)
            assert report.needs_restart == (key,), key
            assert report.applied == () and report.errors == (), key
            # node.cfg says what is in effect: the running value, reported again next time.
            assert getattr(getattr(node.cfg, section), name) == running, key
            again = await node.reload(new)
            assert again.needs_restart == (key,), key


async def test_restart_key_is_not_half_applied_with_a_live_one(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """Quotas are live, the payload cap is not: applying the quotas keeps the store's
    payload cap (and KeyPackage TTL) at what the RPC server and directory run with."""
    async with running_node(tmp_path, wall) as (node, _):
        assert node.store is not None
        before = await node.store.run(lambda s: s.limits)
        report = await node.reload(
            changed(
                node.cfg,
                limits__mailbox_max_messages=3,
                limits__max_payload=1000,
                limits__keypackage_ttl_s=60,
            )
        )
        assert report.applied == ("limits.mailbox_max_messages",)
        assert set(report.needs_restart) == {"limits.max_payload", "limits.keypackage_ttl_s"}
        after = await node.store.run(lambda s: s.limits)
        assert after.mailbox_max_messages == 3
        assert after.max_payload_bytes == before.max_payload_bytes
        assert after.keypackage_ttl_ms == before.keypackage_ttl_ms


# -- live keys, each by what the running node does ----------------------------------------


def envelope(wall: ManualWallClock, recipient: bytes, size: int = 100) -> Envelope:
    return Envelope(os.urandom(16), recipient, wall() + DAY_MS, 4, b"x" * size)


async def test_quotas_and_retention_apply_live(tmp_path: Path, wall: ManualWallClock) -> None:
    async with running_node(tmp_path, wall) as (node, _):
        store = node.store
        assert store is not None
        alice, bob = bytes(32), bytes([1]) * 32
        await store.enqueue([envelope(wall, alice)], wall())
        await store.enqueue([envelope(wall, alice)], wall())  # defaults: 10,000 messages

        report = await node.reload(changed(node.cfg, limits__mailbox_max_messages=2))
        assert report.applied == ("limits.mailbox_max_messages",)
        with pytest.raises(QuotaExceeded):
            await store.enqueue([envelope(wall, alice)], wall())

        report = await node.reload(changed(node.cfg, limits__mailbox_max_bytes=150))
        assert report.applied == ("limits.mailbox_max_bytes",)
        await store.enqueue([envelope(wall, bob, 100)], wall())
        with pytest.raises(QuotaExceeded):
            await store.enqueue([envelope(wall, bob, 100)], wall())

        # Retention: a day-long envelope stored after the reload expires after a minute.
        report = await node.reload(
            changed(node.cfg, limits__retention_s=60, limits__mailbox_max_messages=100)
        )
        assert set(report.applied) == {"limits.retention_s", "limits.mailbox_max_messages"}
        carol = bytes([2]) * 32
        await store.enqueue([envelope(wall, carol)], wall())
        wall.advance(61_000)
        expired, _ = await node.sweep_once()
        assert expired == 1
        assert (await store.depth(carol)).messages == 0
        assert (await store.depth(alice)).messages == 2  # stored under the 7-day horizon


async def challenges(info: NodeInfo, n: int, source: str = "127.0.0.1") -> list[StatusCode]:
    """``n`` unauthenticated Auth.Challenge calls from ``source`` (rate-limited per IP)."""
    codes: list[StatusCode] = []
    async with open_endpoint(source, 0) as ep:
        conn = await ep.connect(
            info.host, info.port, ClientTLS(ALPN_CLIENT, pin=info.cert_fingerprint)
        )
        rpc = RpcClient(conn.open_stream, retry_policy=NO_RETRY)
        for _ in range(n):
            try:
                await rpc.call(
                    "qpc.v1.Auth/Challenge",
                    service_pb2.AuthChallengeRequest(),
                    service_pb2.AuthChallengeResponse,
                )
                codes.append(StatusCode.OK)
            except RpcError as exc:
                codes.append(exc.code)
        await conn.aclose()
    return codes


async def test_rate_limits_apply_live(tmp_path: Path, wall: ManualWallClock) -> None:
    ok, refused = StatusCode.OK, StatusCode.RESOURCE_EXHAUSTED
    async with running_node(tmp_path, wall) as (node, info):
        # Defaults (50/s, burst 100): a handful of calls pass.
        assert await challenges(info, 4) == [ok] * 4
        report = await node.reload(
            changed(node.cfg, limits__rate_per_second=0.001, limits__rate_burst=3)
        )
        assert set(report.applied) == {"limits.rate_per_second", "limits.rate_burst"}
        # A fresh source gets the new burst, then nothing (0.001 tokens/s).
        assert await challenges(info, 5, "127.0.0.2") == [ok, ok, ok, refused, refused]
        # Rate alone: a fast refill lets the exhausted source through again.
        report = await node.reload(changed(node.cfg, limits__rate_per_second=100_000.0))
        assert report.applied == ("limits.rate_per_second",)
        assert await challenges(info, 5, "127.0.0.2") == [ok] * 5
        # Burst alone: back to a slow rate, a fresh source gets exactly the new burst.
        await node.reload(changed(node.cfg, limits__rate_per_second=0.001))
        report = await node.reload(changed(node.cfg, limits__rate_burst=5))
        assert report.applied == ("limits.rate_burst",)
        assert await challenges(info, 6, "127.0.0.3") == [ok] * 5 + [refused]


async def test_connection_caps_apply_live(tmp_path: Path, wall: ManualWallClock) -> None:
    """The endpoint's admission gate takes the new caps from the next Initial on; a
    connection already admitted stays."""
    async with running_node(tmp_path, wall) as (node, info):
        tls = ClientTLS(ALPN_CLIENT, pin=info.cert_fingerprint)
        async with open_endpoint("127.0.0.4", 0) as ep:
            first = await ep.connect(info.host, info.port, tls)
            assert await challenges(info, 1, "127.0.0.4") == [StatusCode.OK]  # 2 per IP: fine
            report = await node.reload(changed(node.cfg, limits__max_connections_per_ip=1))
            assert report.applied == ("limits.max_connections_per_ip",)
            with pytest.raises(HandshakeError):
                await challenges(info, 1, "127.0.0.4")  # a second one from that IP: refused
            assert await challenges(info, 1, "127.0.0.5") == [StatusCode.OK]  # others: fine
            rpc = RpcClient(first.open_stream, retry_policy=NO_RETRY)
            await rpc.call(  # the admitted connection still serves
                "qpc.v1.Auth/Challenge",
                service_pb2.AuthChallengeRequest(),
                service_pb2.AuthChallengeResponse,
            )
            await first.aclose()
        assert node.endpoint is not None
        assert node.endpoint.statistics().refusals.per_ip >= 1


async def http_status(port: int, path: str) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = b""
        with trio.fail_after(10):
            while b"\r\n" not in got:
                chunk = await stream.receive_some(4096)
                assert chunk
                got += chunk
    return int(got.split(b" ", 2)[1])


async def test_metrics_address_applies_live(tmp_path: Path, wall: ManualWallClock) -> None:
    async with running_node(tmp_path, wall) as (node, _):  # metrics off in the harness
        assert node.metrics_http is None
        report = await node.reload(changed(node.cfg, metrics__listen="127.0.0.1:0"))
        assert report.applied == ("metrics.listen",) and report.errors == ()
        assert node.metrics_http is not None
        port = node.metrics_http.port
        assert await http_status(port, "/readyz") == 200

        # A taken address: reported, the node goes on (without metrics).
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        try:
            taken = listeners[0].socket.getsockname()[1]
            report = await node.reload(changed(node.cfg, metrics__listen=f"127.0.0.1:{taken}"))
        finally:
            for lst in listeners:
                await lst.aclose()
        assert report.applied == ("metrics.listen",)
        assert len(report.errors) == 1 and report.errors[0].startswith("metrics.listen")
        assert node.metrics_http is None
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)  # the old listener is closed

        report = await node.reload(changed(node.cfg, metrics__listen=""))
        assert report.applied == ("metrics.listen",) and node.metrics_http is None


async def test_log_level_and_format_apply_live(
    tmp_path: Path, wall: ManualWallClock, qpc_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_node(tmp_path, wall) as (node, _):
        probe = logging.getLogger("qpc.test_reload")
        report = await node.reload(changed(node.cfg, log__level="error"))
        assert report.applied == ("log.level",)
        assert not probe.isEnabledFor(logging.WARNING)
        report = await node.reload(changed(node.cfg, log__level="debug"))
        assert probe.isEnabledFor(logging.DEBUG)

        report = await node.reload(changed(node.cfg, log__format="json"))
        assert report.applied == ("log.format",)
        capsys.readouterr()
        probe.warning("probe line", extra={"n": 7})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["n"] == 7


async def test_drain_grace_applies_live(tmp_path: Path, wall: ManualWallClock) -> None:
    """The grace the drain runs with (logged next to ep.close) is the reloaded one."""
    seen: list[float] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "draining":
                seen.append(record.__dict__["grace_s"])

    node_log = logging.getLogger("qpc.node")
    grab, level = Grab(), node_log.level
    node_log.addHandler(grab)
    node_log.setLevel(logging.INFO)
    try:
        async with running_node(tmp_path, wall) as (node, _):
            report = await node.reload(changed(node.cfg, node__drain_grace_s=0.25))
            assert report.applied == ("node.drain_grace_s",)
    finally:
        node_log.removeHandler(grab)
        node_log.setLevel(level)
    assert seen == [0.25]


async def test_production_is_a_load_time_check(tmp_path: Path, wall: ManualWallClock) -> None:
    """node.production is enforced by load_config on every (re)load; the node applies it
    by keeping it in cfg (nothing else reads it), and reports it as applied."""
    async with running_node(tmp_path, wall) as (node, _):
        report = await node.reload(changed(node.cfg, node__production=True))
        assert report.applied == ("node.production",)
        assert node.cfg.node.production


async def test_no_change_reports_nothing(tmp_path: Path, wall: ManualWallClock) -> None:
    async with running_node(tmp_path, wall) as (node, _):
        report = await node.reload(node.cfg)
        assert (report.applied, report.needs_restart, report.errors) == ((), (), ())


# -- SIGHUP on a real process ---------------------------------------------------------------


async def read_line(proc: trio.Process, buf: bytearray) -> str:
    assert proc.stdout is not None
    with trio.fail_after(30):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, f"node exited; output so far: {bytes(buf)!r}"
            buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


async def test_sighup_prints_what_was_applied_and_what_needs_a_restart(tmp_path: Path) -> None:
    conf = tmp_path / "qpc.toml"
    conf.write_text('[metrics]\nlisten = ""\n[log]\nlevel = "info"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPC_")}
    argv = [sys.executable, "-m", "qpc_node.cli", "node", "--listen", "127.0.0.1:0"]
    argv += ["--data", str(tmp_path / "node"), "--config", str(conf)]
    proc = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    buf = bytearray()
    try:
        assert (await read_line(proc, buf)).startswith("qpc node listening on ")
        conf.write_text(
            '[metrics]\nlisten = ""\n[log]\nlevel = "warning"\n'
            "[limits]\nrate_burst = 7\nmax_payload = 100000\n"
        )
        proc.send_signal(signal.SIGHUP)
        assert await read_line(proc, buf) == (
            "config reloaded; applied live: log.level, limits.rate_burst; "
            "restart needed for: limits.max_payload"
        )
        # A refused file (production mode, metrics on a public address) keeps the old one.
        conf.write_text('[node]\nproduction = true\n[metrics]\nlisten = "0.0.0.0:0"\n')
        proc.send_signal(signal.SIGHUP)
        refused = await read_line(proc, buf)
        assert refused.startswith("config reload refused; keeping the old one:"), refused
        assert "metrics.listen" in refused
        # The refused file changed nothing: log.level is still warning; rate_burst goes
        # back to its default; max_payload is back to the running value (no restart).
        conf.write_text('[metrics]\nlisten = ""\n[log]\nlevel = "warning"\n')
        proc.send_signal(signal.SIGHUP)
        assert await read_line(proc, buf) == "config reloaded; applied live: limits.rate_burst"
        proc.send_signal(signal.SIGHUP)
        assert await read_line(proc, buf) == "config reloaded; no changes"
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await proc.wait()
    assert proc.returncode == 0
