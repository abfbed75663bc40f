"""Fail loudly when an aioquic upgrade moves the private hooks we rely on.

``qpc_node.quic._aioquic`` overrides or reads these to add client-certificate
verification, consumption-driven flow control and send backpressure. If any of
them moved, our subclass would silently stop verifying or bounding memory --
so check the exact names and signatures, then prove the hooks bite with a
sans-IO handshake (no sockets).
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import aioquic
import aioquic.quic.connection
import pytest
from aioquic import tls as atls
from aioquic.quic.connection import Limit, QuicConnection
from aioquic.quic.stream import QuicStream as AioquicStream

from qpc_node.quic import ALPN_CLIENT, ALPN_FEDERATION, ClientTLS, ServerTLS, events
from qpc_node.quic._aioquic import AioquicBackend, AioquicCore
from qpc_node.quic.settings import QuicSettings
from qpc_node.quic.testing import PkiFixture, make_test_pki


def params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_aioquic_is_the_pinned_version() -> None:
    assert version("aioquic") == "1.7.2", "re-audit qpc_node/quic/_aioquic.py hooks, then bump"
    assert aioquic.__version__ == "1.7.2"


def test_tls_context_hooks_exist_with_expected_signatures() -> None:
    C = atls.Context
    assert params(C._server_handle_certificate) == ["self", "input_buf"]
    assert params(C._server_handle_certificate_verify) == ["self", "input_buf"]
    assert params(C._client_handle_certificate_verify) == ["self", "input_buf"]
    ctx = C(is_client=False)
    for attr in ("_request_client_certificate", "_peer_certificate", "_peer_certificate_chain"):
        assert hasattr(ctx, attr), attr
    assert ctx._request_client_certificate is False
    assert ctx._supported_versions == [atls.TLS_VERSION_1_3]  # TLS 1.3 only
    assert params(atls.verify_certificate)[:3] == ["certificate", "chain", "server_name"]
    # The server decides on CertificateRequest *after* calling alpn_cb: our
    # _alpn_handler override flips the flag from there.
    src = inspect.getsource(C._server_handle_hello)
    assert src.index("self.alpn_cb(") < src.index("if self._request_client_certificate")


def test_connection_hooks_exist_with_expected_signatures() -> None:
    Q = QuicConnection
    assert params(Q._initialize) == ["self", "peer_cid"]
    assert params(Q._alpn_handler) == ["self", "alpn_protocol"]
    assert params(Q._write_stream_limits) == ["self", "builder", "space", "stream"]
    assert params(Q._write_connection_limits) == ["self", "builder", "space"]
    assert "highest_offset * 2 > stream.max_stream_data_local" in inspect.getsource(
        Q._write_stream_limits
    )
    assert "max_data.used * 2 > max_data.value" in inspect.getsource(Q._write_connection_limits)
    assert {"value", "sent", "used"} <= set(vars(Limit(0, "x", 1)))
    stream = AioquicStream(stream_id=0, max_stream_data_local=1, max_stream_data_remote=1)
    assert hasattr(stream.sender, "_buffer") and hasattr(stream.receiver, "highest_offset")
    assert hasattr(stream, "max_stream_data_local")
    # MAX_STREAM_DATA is written from the connection-limits hook for the streams
    # we list; that needs: the per-stream hook called from _write_application
    # only, after the connection-limits hook in the same packet; a lost frame
    # reported to _on_max_stream_data_delivery (which zeroes ``_sent``).
    assert stream.max_stream_data_local_sent == stream.max_stream_data_local
    assert params(Q._on_max_stream_data_delivery) == ["self", "delivery", "stream"]
    assert "stream.max_stream_data_local_sent = 0" in inspect.getsource(
        Q._on_max_stream_data_delivery
    )
    assert inspect.getsource(aioquic.quic.connection).count("._write_stream_limits(") == 1
    # _write_stream_frame returns 0 before asking when no frame header fits:
    # exact only while aioquic's smallest header is 3 + the stream id's varint
    # and get_frame() gives up on max_size < 0 before touching any state.
    assert params(Q._write_stream_frame) == ["self", "builder", "space", "stream", "max_offset"]
    wsf = inspect.getsource(Q._write_stream_frame)
    assert "frame_overhead = (\n            3\n            + size_uint_var(stream.stream_id)" in wsf
    assert "builder.remaining_flight_space - frame_overhead" in wsf
    get_frame = inspect.getsource(type(stream.sender).get_frame)
    assert get_frame.index("if max_size < 0:\n            return None") < get_frame.index(
        "self._pending"
    )
    src = inspect.getsource(Q._write_application)
    conn_limits = src.index("self._write_connection_limits(builder=builder, space=space)")
    stream_loop = src.index("for stream in self._streams.values():")
    assert conn_limits < stream_loop < src.index("self._write_stream_limits(builder=builder")
    assert src.index("builder.start_packet(") < conn_limits  # once per packet
    # Only streams with work are queued for datagrams_to_send(): the loop over
    # the queue must act on nothing else, move only streams that sent new
    # bytes (_write_stream_frame > 0), and nothing else may use the queue.
    loop = src[src.index("for stream in self._streams_queue:") :]
    for cond in (
        "if stream.is_finished:",
        "if stream.receiver.stop_pending:",
        "if stream.sender.reset_pending:",
        "elif not stream.is_blocked and not stream.sender.buffer_is_empty:",
        "if used > 0:\n                            sent.add(stream)",
        "self._streams_queue.extend(sent)",
    ):
        assert cond in loop, cond
    assert inspect.getsource(aioquic.quic.connection).count("_streams_queue") == 7
    # ...and for the call the stream map holds only those (plus streams listed
    # for MAX_STREAM_DATA): no method on the send path may read it otherwise.
    assert _methods_using(QuicConnection, "_streams") == {
        "__init__",
        "_get_or_create_stream",  # receive path
        "_get_or_create_stream_for_send",  # send_stream_data / reset_stream
        "_stream_is_discarded",  # send_stream_data
        "_write_application",  # the two loops above
        "stop_stream",
    }
    assert "return self.receiver.is_finished and self.sender.is_finished" in inspect.getsource(
        AioquicStream.is_finished.fget
    )


def _methods_using(cls: type, attr: str) -> set[str]:
    """Methods of ``cls`` whose source reads or writes ``self.<attr>``."""
    import ast

    tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))  # type: ignore[arg-type]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and any(
                    isinstance(n, ast.Attribute)
                    and n.attr == attr
                    and isinstance(n.value, ast.Name)
                    and n.value.id == "self"
                    for n in ast.walk(fn)
                ):
                    found.add(fn.name)
    return found


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_test_pki()


def handshake(
    server_tls: ServerTLS, client_tls: ClientTLS, *, offer_no_alpn: bool = False
) -> tuple[AioquicCore, list[object], list[object]]:
    """Run a handshake in memory; return the server core and both sides' events."""
    backend, settings = AioquicBackend(), QuicSettings()
    client = backend.create_client(client_tls, settings)
    if offer_no_alpn:
        client._q.configuration.alpn_protocols = None
    now = 0.0
    client.connect(("10.0.0.2", 4201), now)
    pending = client.datagrams_to_send(now)
    header = backend.parse_header(pending[0][0])
    assert header is not None and header.is_initial
    server = backend.create_server(server_tls, settings, header.destination_cid)
    c_events: list[object] = []
    s_events: list[object] = []
    for _ in range(20):
        now += 0.01
        for data, _addr in pending:
            server.receive_datagram(data, ("10.0.0.1", 5000), now)
        replies = server.datagrams_to_send(now)
        for data, _addr in replies:
            client.receive_datagram(data, ("10.0.0.2", 4201), now)
        pending = client.datagrams_to_send(now)
        for core, sink in ((client, c_events), (server, s_events)):
            while (e := core.next_event()) is not None:
                sink.append(e)
        if not pending and not replies:
            break
    return server, c_events, s_events


def closing(evs: list[object]) -> events.ConnectionClosing:
    return next(e for e in evs if isinstance(e, events.ConnectionClosing))


def test_hooks_bite_without_sockets(pki: PkiFixture) -> None:
    server_tls = ServerTLS(pki.server, federation_ca=pki.ca.certificate_pem)
    pin = pki.server.fingerprint
    # Accepted: the server saw and recorded the client's chain.
    server, c_ev, _ = handshake(
        server_tls, ClientTLS(ALPN_FEDERATION, pin=pin, credentials=pki.client)
    )
    assert events.HandshakeConfirmed() in c_ev
    assert server.peer_certificate_chain()[0] == pki.client.certificate_der
    # Refused: no certificate (stock aioquic would carry on without one).
    _, _, s_ev = handshake(server_tls, ClientTLS(ALPN_FEDERATION, pin=pin))
    assert closing(s_ev).error_code == 0x100 + 116


def test_missing_alpn_refused(pki: PkiFixture) -> None:
    client_tls = ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint)
    _, _, s_ev = handshake(ServerTLS(pki.server), client_tls, offer_no_alpn=True)
    assert closing(s_ev).error_code == 0x100 + 120


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x40",
        b"\x40" + b"c" * 7,
        b"\x40" + b"c" * 8,
        b"\x5f" + bytes(range(40)),
        b"\x00" + b"c" * 20,  # fixed bit zero
        b"\x3f" + b"c" * 20,
    ],
)
def test_short_header_routing_matches_aioquic(data: bytes) -> None:
    from aioquic._buffer import Buffer
    from aioquic.quic.packet import pull_quic_header

    from qpc_node.quic._aioquic import CID_LENGTH

    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
    except ValueError:
        expected = None
    else:
        expected = (header.destination_cid, False, True)
    got = AioquicBackend().parse_header(data)
    assert (
        None if got is None else (got.destination_cid, got.is_initial, got.version_supported)
    ) == expected


# Every aioquic private name qpc_node/quic/_aioquic.py reads, writes or overrides,
# with the reason it stays (docs/performance.md, "aioquic internals"). A new one
# must be added here (and justified there); one that aioquic drops fails below.
AIOQUIC_PRIVATE = {
    # client certificates: aioquic's server never asks for or verifies them
    "_initialize": "creates tls.Context: the one place to swap in our subclass",
    "_alpn_handler": "ALPN decides whether a client certificate is required",
    "_request_client_certificate": "read by the server hello right after the ALPN callback",
    "_server_handle_certificate": "empty client Certificate: our policy refuses it",
    "_server_handle_certificate_verify": "client key possession proven: run our policy",
    "_client_handle_certificate_verify": "server key possession proven: run pin/CA policy",
    "_peer_certificate": "the verified peer chain (leaf)",
    "_peer_certificate_chain": "the verified peer chain (rest)",
    # flow control by consumption, not arrival
    "_write_connection_limits": "MAX_DATA / MAX_STREAM_DATA as the reader consumes",
    "_write_stream_limits": "replaced by a no-op; listed streams are served above",
    "_on_max_stream_data_delivery": "a lost MAX_STREAM_DATA is listed again",
    "_local_max_data": "the Limit whose `used` disarms grow-on-arrival",
    "_local_max_streams_bidi": "our stream credit (aioquic hardcodes 128)",
    "_local_max_streams_uni": "no unidirectional streams (0)",
    # stream credit, backlog, reset buffers
    "_streams": "send backlog and reset buffers of one stream",
    "_local_next_stream_id_bidi": "can_open_stream: next id against the peer's limit",
    "_remote_max_streams_bidi": "can_open_stream: the peer's MAX_STREAMS",
    "_buffer": "send backlog (unsent + unacked bytes): send_all's high-water mark",
    "_buffer_start": "freeing a reset stream's send buffer",
    "_buffer_stop": "freeing a reset stream's send buffer",
    "_pending": "freeing a reset stream's send buffer",
    "_acked": "freeing a reset stream's send buffer",
    "_reset_error_code": "only a reset stream's buffer is freed",
    "_handle_stop_sending_frame": "a STOP_SENDING resets the sender: free its buffer",
    # connection state aioquic has no event for
    "_close_event": "ConnectionClosing the moment a close is decided (no draining wait)",
    "_handshake_confirmed": "client: the server accepted our certificate (HANDSHAKE_DONE)",
    "_state": "a stateless reset is acted on only while the connection is alive",
    "_close_end": "a stateless reset ends the connection without a closing period",
    # stateless reset tokens derived from a static key
    "_host_cids": "our CIDs' reset tokens are derived, not random",
    "_replenish_connection_ids": "new CIDs get derived tokens too",
    "_peer_cid": "the peer's reset token, to recognise its stateless reset",
    # packet building
    "_write_stream_frame": "no frame asked of a stream when none fits the packet; records sends",
    "_streams_queue": "per transmit only streams with something to write are walked",
}
OURS = {"_q", "_confirmed_reported", "_closing_reported", "_translate"}


def test_every_aioquic_private_access_is_listed() -> None:
    import ast

    import qpc_node.quic._aioquic as adapter

    tree = ast.parse(inspect.getsource(adapter))
    methods = {
        fn.name
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for fn in cls.body
        if isinstance(fn, ast.FunctionDef)
    }
    touched = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
    } | {m for m in methods if m.startswith("_") and not m.startswith("__")}
    ours = OURS | {name for name in touched if name.startswith("_qpc")}
    assert touched - ours == set(AIOQUIC_PRIVATE)


def test_listed_private_names_exist_on_a_live_connection(pki: PkiFixture) -> None:
    server_tls = ServerTLS(pki.server, federation_ca=pki.ca.certificate_pem)
    client_tls = ClientTLS(ALPN_FEDERATION, pin=pki.server.fingerprint, credentials=pki.client)
    server, _, _ = handshake(server_tls, client_tls)
    q = server._q
    stream = AioquicStream(stream_id=0, max_stream_data_local=1, max_stream_data_remote=1)
    holders: list[object] = [q, q.tls, stream.sender, stream.receiver]
    missing = [n for n in AIOQUIC_PRIVATE if not any(hasattr(h, n) for h in holders)]
    assert not missing, f"aioquic dropped {missing}: re-audit qpc_node/quic/_aioquic.py"
