"""How ``/mesh peers`` shows the node's discovery state and the strings a node sends."""

from __future__ import annotations

from qpc_node.repl.runner import format_discovery, format_mesh
from qpc_node.wire.gen.qpc.v1 import ops_pb2


def test_discovery_running_failing_and_starting() -> None:
    on = ops_pb2.MeshDiscovery(
        running=True, interfaces=["br-lan", "mesh0"], peers=1, announced=True
    )
    assert format_discovery(on) == "  mDNS: on br-lan,mesh0, 1 node seen, announced"
    off = ops_pb2.MeshDiscovery(
        interfaces=["mesh0"], start_failures=2, last_error="no usable interface: mesh0"
    )
    assert format_discovery(off) == (
        "  mDNS: not running on mesh0: no usable interface: mesh0 (2 failed starts; retrying)"
    )
    assert format_discovery(ops_pb2.MeshDiscovery()) == "  mDNS: starting on all interfaces"


def test_node_strings_cannot_drive_the_terminal() -> None:
    """A node (possibly someone else's: /mesh server) sends these strings; escape
    sequences and newlines must not reach the terminal, and they are bounded."""
    evil = "\x1b[2J\x1b]0;pwned\x07" + "x" * 500
    shown = format_discovery(ops_pb2.MeshDiscovery(start_failures=1, last_error=evil))
    assert "\x1b" not in shown and "\x07" not in shown and len(shown) < 300
    resp = ops_pb2.MeshResponse(
        on_mesh=True,
        node_id=bytes(32),
        peers=[
            ops_pb2.MeshPeer(node_id=bytes(32), address="10.0.0.2:4201\n  ffff", state="up\x1b")
        ],
        discovery=ops_pb2.MeshDiscovery(running=True),
    )
    table = format_mesh(resp, "peers")
    assert "\x1b" not in table
    assert len(table.splitlines()) == 3, table  # head, mDNS line, one peer: no injected line
    assert "mDNS" not in format_mesh(resp, "routes")  # the routes view stays as it was
