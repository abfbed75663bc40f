"""RPC benchmark: qpc_node.rpc over qpc_node.quic vs the same load on aioquic's asyncio API.

    .venv/bin/python bench/rpc_bench.py                 # ~40 s, all figures
    .venv/bin/python bench/rpc_bench.py --rpc-seconds 20 --bulk-seconds 10 --hs-seconds 10

Server and client run in separate processes (loopback, 127.0.0.1), with mutual
TLS on ALPN ``qpc-fed/1`` and one throwaway community CA for both sides. Loads:

* rpc:  1 KiB request / 1 KiB reply, 64 calls in flight on one connection;
        calls/s, p50/p99 latency (client-side, per call).
* bulk: 4 MiB calls one after the other (each one stream); MB/s of request bytes.
* hs:   connect (full mTLS handshake) + close, 4 at a time; handshakes/s.

The reference speaks the same frames (varint length prefix, rpc.proto
Request/Response, BytesValue bodies) through ``aioquic.asyncio`` serve/connect;
its server asks for and verifies the client certificate against the same CA
(stock aioquic does neither, see _ref_mtls). The last line is
``rpc calls/s ratio=<ours/reference>``: the median of per-round ratios, rounds
interleaved (``--rounds``) because the machine is shared. Every phase is bounded
by its seconds and by a call count; the orchestrator kills only the processes it
started.

Per call the table also shows user+system CPU of client and server over the rpc
phase (the load-independent figure on a busy machine; ratio ref/qpc printed) and
both processes' RSS at its end. ``--qh3`` adds a third column: the reference code
on qh3's asyncio API (``pip install qh3`` in the bench environment; qh3 is not a
dependency), with P-256 certificates for all three (qh3 2.1 refuses Ed25519).
Figures and what they mean: docs/performance.md, "RPC and QUIC".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from google.protobuf.wrappers_pb2 import BytesValue, UInt64Value  # noqa: E402
from pairs import steal_percent, steal_ticks  # noqa: E402  (bench/, the script's own directory)

from qpc_node.rpc.framing import FrameDecoder, encode_frame  # noqa: E402
from qpc_node.wire.gen.qpc.v1 import rpc_pb2  # noqa: E402

ALPN = "qpc-fed/1"
ECHO = "bench.Echo"
BULK = "bench.Bulk"
REQ_SIZE = 1024
BULK_SIZE = 4 * 1024 * 1024
MAX_RPC_CALLS = 200_000
MAX_BULK_CALLS = 2_000
MAX_HANDSHAKES = 5_000


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))
    return sorted_values[k]


# --------------------------------------------------------------------------- PKI


def write_pki(directory: Path, key_type: str = "ed25519") -> None:
    from qpc_node.quic.testing import make_test_pki

    pki = make_test_pki(key_type="p256" if key_type == "p256" else "ed25519")
    files = {
        "ca.pem": pki.ca.certificate_pem,
        "server.pem": pki.server.certificate_pem,
        "server.key": pki.server.private_key_pem,
        "client.pem": pki.client.certificate_pem,
        "client.key": pki.client.private_key_pem,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)


def creds(directory: Path, who: str) -> Any:
    from qpc_node.quic import NodeCredentials

    return NodeCredentials(
        (directory / f"{who}.pem").read_bytes(), (directory / f"{who}.key").read_bytes()
    )


# --------------------------------------------------------------------------- ours


def ours_server(a: argparse.Namespace) -> None:
    import trio

    from qpc_node.ops.memory import freeze_startup_heap
    from qpc_node.quic import ServerTLS, open_endpoint
    from qpc_node.rpc import CallContext, MethodTable, RpcServer, ServerConfig
    from qpc_node.rpc.quic import QuicRpcHandler

    async def echo(req: BytesValue, ctx: CallContext) -> BytesValue:
        return BytesValue(value=b"r" * len(req.value))

    async def bulk(req: BytesValue, ctx: CallContext) -> UInt64Value:
        return UInt64Value(value=len(req.value))

    methods = MethodTable()
    methods.register(ECHO, BytesValue, BytesValue, echo)
    methods.register(BULK, BytesValue, UInt64Value, bulk)
    # 64 in flight by design: the default per-connection limit (32) would refuse half.
    server = RpcServer(methods, ServerConfig(max_concurrent_calls=128))
    d = Path(a.certs)
    tls = ServerTLS(creds(d, "server"), federation_ca=(d / "ca.pem").read_bytes())

    async def main() -> None:
        with trio.move_on_after(a.lifetime):
            async with (
                open_endpoint("127.0.0.1", 0, server_tls=tls) as ep,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(ep.serve, QuicRpcHandler(server))
                # as `qpc node` does once it serves (cli.py): start-up objects out of the
                # collector's full scans (the reference processes keep Python's default;
                # the client freezes too, as a REPL does)
                freeze_startup_heap()
                print("PORT", ep.local_address[1], flush=True)
                await trio.sleep_forever()

    trio.run(main)


def ours_client(a: argparse.Namespace) -> dict[str, Any]:
    import trio

    from qpc_node.ops.memory import freeze_startup_heap
    from qpc_node.quic import ClientTLS, open_endpoint
    from qpc_node.rpc import NO_RETRY, RpcClient

    d = Path(a.certs)
    ctls = ClientTLS(
        ALPN,
        ca=(d / "ca.pem").read_bytes(),
        credentials=creds(d, "client"),
        server_name="localhost",
    )
    out: dict[str, Any] = {}

    async def main() -> None:
        async with open_endpoint("127.0.0.1", 0) as ep:
            conn = await ep.connect("127.0.0.1", a.port, ctls)
            client = RpcClient(conn.open_stream, retry_policy=NO_RETRY)
            # as a REPL does once its session is open (cli.py: qpc repl, qpc)
            freeze_startup_heap()
            req = BytesValue(value=b"q" * REQ_SIZE)
            lat: list[float] = []
            issued = 0
            stop = time.perf_counter() + a.rpc_seconds

            async def worker() -> None:
                nonlocal issued
                while issued < MAX_RPC_CALLS and time.perf_counter() < stop:
                    issued += 1
                    t = time.perf_counter()
                    reply = await client.call(ECHO, req, BytesValue)
                    lat.append(time.perf_counter() - t)
                    assert len(reply.value) == REQ_SIZE

            t0 = time.perf_counter()
            cpu = CpuMeter(a.server_pid)
            async with trio.open_nursery() as nursery:
                for _ in range(a.concurrency):
                    nursery.start_soon(worker)
            out["rpc"] = summarize(lat, time.perf_counter() - t0, cpu)

            big = BytesValue(value=b"x" * BULK_SIZE)
            sent = 0
            stop = time.perf_counter() + a.bulk_seconds
            t0 = time.perf_counter()
            for _ in range(MAX_BULK_CALLS):
                got = await client.call(BULK, big, UInt64Value)
                assert got.value == BULK_SIZE
                sent += BULK_SIZE
                if time.perf_counter() >= stop:
                    break
            out["bulk"] = {"MB_per_s": sent / (time.perf_counter() - t0) / 1e6}
            await conn.aclose()

            done = 0
            stop = time.perf_counter() + a.hs_seconds

            async def dialer() -> None:
                nonlocal done
                while done < MAX_HANDSHAKES and time.perf_counter() < stop:
                    done += 1
                    c = await ep.connect("127.0.0.1", a.port, ctls)
                    await c.aclose()

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(dialer)
            out["hs"] = {"per_s": done / (time.perf_counter() - t0)}

    trio.run(main)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` so far (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (Linux /proc; 0.0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class CpuMeter:
    """CPU of this process (client) and of the server process over one phase.

    Wall-clock rates on a shared machine measure the scheduler as much as the
    code; CPU seconds per call (both processes) is the load-independent figure.
    """

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.client0 = time.process_time()
        self.server0 = cpu_seconds(server_pid)

    def per_call_us(self, calls: int) -> dict[str, float]:
        client = time.process_time() - self.client0
        server = cpu_seconds(self.server_pid) - self.server0
        n = max(calls, 1)
        return {
            "client_cpu_us": client / n * 1e6,
            "server_cpu_us": server / n * 1e6,
            # at the end of the rpc phase: 64 calls' streams and buffers are live
            "client_rss_mib": rss_mib(os.getpid()),
            "server_rss_mib": rss_mib(self.server_pid),
        }


def summarize(lat: list[float], elapsed: float, cpu: CpuMeter) -> dict[str, float]:
    lat.sort()
    return {
        "calls": len(lat),
        "calls_per_s": len(lat) / elapsed,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        **cpu.per_call_us(len(lat)),
    }


# --------------------------------------------------------------------------- reference


def _ref_mtls(ca_pem: bytes) -> None:
    """Make aioquic.asyncio's server request and verify client certificates.

    Stock aioquic 1.7.2 never asks a client for a certificate; without this the
    reference would skip work ours does. Verification uses aioquic's own chain
    check (the one its clients run on servers) against our CA.
    """
    import aioquic.asyncio.server as aserver
    from aioquic import tls as atls
    from aioquic.quic.connection import QuicConnection

    class VerifyingContext(atls.Context):
        def _server_handle_certificate_verify(self, input_buf: Any) -> None:
            super()._server_handle_certificate_verify(input_buf)
            atls.verify_certificate(
                certificate=self._peer_certificate,
                chain=self._peer_certificate_chain,
                cadata=ca_pem,
            )

    class MTLSServerConnection(QuicConnection):
        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            self.tls.__class__ = VerifyingContext
            self.tls._request_client_certificate = True

    aserver.QuicConnection = MTLSServerConnection  # type: ignore[misc]


def _ref_lib(a: argparse.Namespace) -> str:
    """The reference's QUIC library: aioquic, or (``--impl qh3``) the qh3 fork."""
    return "qh3" if a.impl == "qh3" else "aioquic"


def _ref_config(d: Path, *, is_client: bool, lib: str = "aioquic") -> Any:
    import importlib

    QuicConfiguration = importlib.import_module(f"{lib}.quic.configuration").QuicConfiguration
    cfg = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN])
    who = "client" if is_client else "server"
    cfg.load_cert_chain(d / f"{who}.pem", d / f"{who}.key")
    if is_client:
        cfg.load_verify_locations(cadata=(d / "ca.pem").read_bytes())
        cfg.server_name = "localhost"
    return cfg


async def _ref_read_frame(reader: Any) -> bytes:
    decoder = FrameDecoder()
    while True:
        data = await reader.read(65536)
        if not data:
            decoder.close()
            raise ConnectionError("stream ended before a frame")
        frames = decoder.feed(data)
        if frames:
            return frames[0]


def ref_server(a: argparse.Namespace) -> None:
    import asyncio
    import importlib

    lib = _ref_lib(a)
    serve = importlib.import_module(f"{lib}.asyncio").serve
    d = Path(a.certs)
    if lib == "aioquic":
        # qh3 2.1 has no server-side client certificates at all (its TLS is a
        # different class, and the PyPI patch for it is a third-party monkey
        # patch): its figures are without mTLS, which only the handshake pays.
        _ref_mtls((d / "ca.pem").read_bytes())

    async def handle(reader: Any, writer: Any) -> None:
        request = rpc_pb2.Request.FromString(await _ref_read_frame(reader))
        body = BytesValue.FromString(request.body)
        if request.method == ECHO:
            payload = BytesValue(value=b"r" * len(body.value)).SerializeToString()
        else:
            payload = UInt64Value(value=len(body.value)).SerializeToString()
        response = rpc_pb2.Response(version=1, call_id=request.call_id, body=payload)
        writer.write(encode_frame(response.SerializeToString()))
        writer.write_eof()

    async def main() -> None:
        server = await serve(
            "127.0.0.1",
            0,
            configuration=_ref_config(d, is_client=False, lib=lib),
            stream_handler=lambda r, w: asyncio.ensure_future(handle(r, w)),
        )
        print("PORT", server._transport.get_extra_info("sockname")[1], flush=True)
        await asyncio.sleep(a.lifetime)
        server.close()

    asyncio.run(main())


def ref_client(a: argparse.Namespace) -> dict[str, Any]:
    import asyncio
    import importlib

    lib = _ref_lib(a)
    connect = importlib.import_module(f"{lib}.asyncio").connect
    d = Path(a.certs)
    out: dict[str, Any] = {}
    call_ids = iter(range(1, 1 << 62))

    async def call(proto: Any, method: str, body: bytes) -> bytes:
        reader, writer = await proto.create_stream()
        req = rpc_pb2.Request(version=1, method=method, call_id=next(call_ids), body=body)
        writer.write(encode_frame(req.SerializeToString()))
        writer.write_eof()
        response = rpc_pb2.Response.FromString(await _ref_read_frame(reader))
        return bytes(response.body)

    async def main() -> None:
        cfg = _ref_config(d, is_client=True, lib=lib)
        async with connect("127.0.0.1", a.port, configuration=cfg) as proto:
            req = BytesValue(value=b"q" * REQ_SIZE).SerializeToString()
            lat: list[float] = []
            issued = 0
            stop = time.perf_counter() + a.rpc_seconds

            async def worker() -> None:
                nonlocal issued
                while issued < MAX_RPC_CALLS and time.perf_counter() < stop:
                    issued += 1
                    t = time.perf_counter()
                    reply = BytesValue.FromString(await call(proto, ECHO, req))
                    lat.append(time.perf_counter() - t)
                    assert len(reply.value) == REQ_SIZE

            t0 = time.perf_counter()
            cpu = CpuMeter(a.server_pid)
            await asyncio.gather(*(worker() for _ in range(a.concurrency)))
            out["rpc"] = summarize(lat, time.perf_counter() - t0, cpu)

            big = BytesValue(value=b"x" * BULK_SIZE).SerializeToString()
            sent = 0
            stop = time.perf_counter() + a.bulk_seconds
            t0 = time.perf_counter()
            for _ in range(MAX_BULK_CALLS):
                got = UInt64Value.FromString(await call(proto, BULK, big))
                assert got.value == BULK_SIZE
                sent += BULK_SIZE
                if time.perf_counter() >= stop:
                    break
            out["bulk"] = {"MB_per_s": sent / (time.perf_counter() - t0) / 1e6}

        done = 0
        stop = time.perf_counter() + a.hs_seconds

        async def dialer() -> None:
            nonlocal done
            while done < MAX_HANDSHAKES and time.perf_counter() < stop:
                done += 1
                async with connect("127.0.0.1", a.port, configuration=cfg, wait_connected=True):
                    pass

        t0 = time.perf_counter()
        await asyncio.gather(*(dialer() for _ in range(4)))
        out["hs"] = {"per_s": done / (time.perf_counter() - t0)}

    asyncio.run(asyncio.wait_for(main(), a.lifetime))
    return out


# --------------------------------------------------------------------------- orchestration


def run_pair(impl: str, a: argparse.Namespace, certs: Path) -> dict[str, Any]:
    base = [sys.executable, __file__, "--impl", impl, "--certs", str(certs)]
    lifetime = a.rpc_seconds + a.bulk_seconds + a.hs_seconds + 30
    server = subprocess.Popen(
        [*base, "--role", "server", "--lifetime", str(lifetime)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        line = server.stdout.readline()
        if not line.startswith("PORT"):
            raise RuntimeError(f"{impl} server failed: {line}{server.stderr.read()[-3000:]}")
        port = line.split()[1]
        client = subprocess.run(
            [
                *base,
                "--role",
                "client",
                "--port",
                port,
                "--lifetime",
                str(lifetime),
                "--rpc-seconds",
                str(a.rpc_seconds),
                "--bulk-seconds",
                str(a.bulk_seconds),
                "--hs-seconds",
                str(a.hs_seconds),
                "--concurrency",
                str(a.concurrency),
                "--server-pid",
                str(server.pid),
            ],
            capture_output=True,
            text=True,
            timeout=lifetime + 10,
        )
        for out_line in client.stdout.splitlines():
            if out_line.startswith("RESULT "):
                result: dict[str, Any] = json.loads(out_line[7:])
                return result
        raise RuntimeError(f"{impl} client failed: {client.stdout[-2000:]}{client.stderr[-3000:]}")
    finally:
        if server.poll() is None:
            server.terminate()  # our own child, by its handle
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--impl", choices=["qpc", "ref", "qh3"])
    p.add_argument("--role", choices=["server", "client"])
    p.add_argument("--certs", default="")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--lifetime", type=float, default=60.0)
    p.add_argument("--rpc-seconds", type=float, default=8.0)
    p.add_argument("--bulk-seconds", type=float, default=3.0)
    p.add_argument("--hs-seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians reported")
    p.add_argument(
        "--qh3",
        action="store_true",
        help="also run the reference code on qh3's asyncio API (pip install qh3: bench only);\n"
        "qh3 2.1 refuses Ed25519 node certificates, so all three then use P-256",
    )
    p.add_argument("--key-type", choices=["ed25519", "p256"], default="")
    a = p.parse_args()

    if a.role == "server":
        (ours_server if a.impl == "qpc" else ref_server)(a)
        return
    if a.role == "client":
        result = (ours_client if a.impl == "qpc" else ref_client)(a)
        print("RESULT", json.dumps(result), flush=True)
        return

    impls = ["qpc", "ref", *(["qh3"] if a.qh3 else [])]
    results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    load_before = os.getloadavg()[0]
    steal_before = steal_ticks()
    with tempfile.TemporaryDirectory(prefix="qpc-rpc-bench-") as tmp:
        certs = Path(tmp)
        key_type = a.key_type or ("p256" if a.qh3 else "ed25519")
        write_pki(certs, key_type)
        for n in range(a.rounds):
            # Interleaved, and the order alternates: neither side always runs
            # first after a quiet (or busy) spell of the shared machine.
            order = impls if n % 2 == 0 else impls[::-1]
            for impl in order:
                results[impl].append(run_pair(impl, a, certs))
    load_after = os.getloadavg()[0]
    steal_pct = steal_percent(steal_before, steal_ticks())

    def med(impl: str, phase: str, key: str) -> float:
        return statistics.median(r[phase][key] for r in results[impl])

    print(
        f"rpc bench: {REQ_SIZE} B request/reply, {a.concurrency} in flight, mTLS ({ALPN}), "
        f"loopback, separate processes, {a.rounds} round(s), {key_type} certificates, "
        f"pid {os.getpid()}"
    )
    print(
        f"{'':12}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'bulk MB/s':>11}{'hs/s':>8}"
        f"{'cli us/call':>13}{'srv us/call':>13}{'cli MiB':>9}{'srv MiB':>9}"
    )
    labels = {"qpc": "qpc (trio)", "ref": "aioquic-aio", "qh3": "qh3-aio"}
    for impl in impls:
        label = labels[impl]
        print(
            f"{label:12}{med(impl, 'rpc', 'calls_per_s'):>10.0f}"
            f"{med(impl, 'rpc', 'p50_ms'):>9.2f}{med(impl, 'rpc', 'p99_ms'):>9.2f}"
            f"{med(impl, 'bulk', 'MB_per_s'):>11.1f}{med(impl, 'hs', 'per_s'):>8.1f}"
            f"{med(impl, 'rpc', 'client_cpu_us'):>13.0f}{med(impl, 'rpc', 'server_cpu_us'):>13.0f}"
            f"{med(impl, 'rpc', 'client_rss_mib'):>9.1f}{med(impl, 'rpc', 'server_rss_mib'):>9.1f}"
        )

    def ratio(phase: str, key: str) -> float:
        """Median of the per-round ratios (each round's pair ran back to back)."""
        return statistics.median(
            float(q[phase][key] / r[phase][key])
            for q, r in zip(results["qpc"], results["ref"], strict=True)
        )

    per_round = [
        q["rpc"]["calls_per_s"] / r["rpc"]["calls_per_s"]
        for q, r in zip(results["qpc"], results["ref"], strict=True)
    ]
    print(f"rpc calls/s ratio per round: {' '.join(f'{x:.2f}' for x in per_round)}")
    cpu_ratio = statistics.median(
        (r["rpc"]["client_cpu_us"] + r["rpc"]["server_cpu_us"])
        / max(q["rpc"]["client_cpu_us"] + q["rpc"]["server_cpu_us"], 1e-9)
        for q, r in zip(results["qpc"], results["ref"], strict=True)
    )
    p99_ratio = statistics.median(
        float(r["rpc"]["p99_ms"] / q["rpc"]["p99_ms"])
        for q, r in zip(results["qpc"], results["ref"], strict=True)
    )
    if a.qh3:
        qh3_calls = statistics.median(
            float(h["rpc"]["calls_per_s"] / r["rpc"]["calls_per_s"])
            for h, r in zip(results["qh3"], results["ref"], strict=True)
        )
        qh3_cpu = statistics.median(
            (r["rpc"]["client_cpu_us"] + r["rpc"]["server_cpu_us"])
            / max(h["rpc"]["client_cpu_us"] + h["rpc"]["server_cpu_us"], 1e-9)
            for h, r in zip(results["qh3"], results["ref"], strict=True)
        )
        print(
            f"qh3-aio vs aioquic-aio: calls/s ratio={qh3_calls:.2f} cpu per call ratio={qh3_cpu:.2f}"
        )
    print(
        f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after;"
        f" cpu steal {steal_pct:.1f} %"
    )
    print(f"rpc p99 ratio ref/qpc={p99_ratio:.2f} (qpc p99_ms={med('qpc', 'rpc', 'p99_ms'):.1f})")
    print(f"rpc cpu per call (client+server) ratio ref/qpc={cpu_ratio:.2f}")
    print(f"bulk MB/s ratio={ratio('bulk', 'MB_per_s'):.2f}")
    print(f"handshakes/s ratio={ratio('hs', 'per_s'):.2f}")
    print(f"rpc calls/s ratio={ratio('rpc', 'calls_per_s'):.2f}")


if __name__ == "__main__":
    main()
