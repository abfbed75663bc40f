async def test_a_failing_route_is_a_500_not_a_crash() -> None:
    import trio.testing

    from qpc_node.ops.http import HttpServer

    async def broken() -> object:
        raise ValueError("collector bug")

    server = HttpServer({"/metrics": broken})  # type: ignore[dict-item]
    client, srv = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        n.start_soon(server.handle, srv)
        await client.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in got:
                got += await client.receive_some(4096)
        await client.aclose()
    assert got.startswith(b"HTTP/1.1 500")
    assert server.statistics().route_errors == 1
