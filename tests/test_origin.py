"""The engines' HTTP client against real sockets: scripted servers that misbehave on purpose, and uvicorn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from gateway.engines.origin import ConnectFailed, ConnectionBroken, Origin, OriginTimeout

from support.services import Uvicorn, free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length")), 0)
    return await reader.readexactly(length)


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Server:
    """A TCP server on loopback whose handler gets (reader, writer, connection number)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0

    async def __aenter__(self) -> str:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.open += 1
            self.most_open = max(self.most_open, self.open)
            try:
                await self.handler(reader, writer, self.connections)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                self.open -= 1
                writer.close()

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *_: object) -> None:
        self._server.close()


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
    while True:
        body = await read_request(reader)
        writer.write(answer(body))


def test_requests_reuse_one_connection_and_see_the_path_prefix() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b"\r\n")[0])
            writer.write(answer(b'{"ok": true}'))

    async def main() -> None:
        server = Server(handler)
        async with server as url:
            origin = Origin(url, [("Authorization", "Bearer sk-up")])
            for _ in range(5):
                response = await origin.get("/models")
                assert (response.status, json.loads(response.body)) == (200, {"ok": True})
            await origin.close()
        assert server.connections == 1
        assert seen == [b"GET /v1/models HTTP/1.1"] * 5

    asyncio.run(main())


def test_a_stream_is_readable_piece_by_piece_as_the_server_sends() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await release.wait()  # the second piece only after the client has the first
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    async def main() -> None:
        async with Server(handler) as url:
            origin = Origin(url)
            response = await origin.stream("POST", "/chat/completions", b"{}")
            pieces = []
            async for piece in response:
                pieces.append(piece)
                release.set()
            assert b"".join(pieces) == b"firstsecond" and pieces[0] == b"first"
            await origin.close()

    asyncio.run(main())


def test_a_keep_alive_connection_the_server_dropped_is_retried_on_a_new_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        body = await read_request(reader)
        writer.write(answer(body))
        await writer.drain()
        if number == 1:  # the first connection reads the next request, then hangs up without a word
            await reader.readuntil(b"\r\n\r\n")
            return
        await echo_forever(reader, writer, number)

    async def main() -> None:
        server = Server(handler)
        async with server as url:
            origin = Origin(url)
            assert (await origin.post("/x", b"one")).body == b"one"
            assert (await origin.post("/x", b"two")).body == b"two"
            await origin.close()
        assert server.connections == 2

    asyncio.run(main())


def test_a_new_connection_closed_without_an_answer_is_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)

    async def main() -> None:
        server = Server(handler)
        async with server as url:
            origin = Origin(url)
            with pytest.raises(ConnectionBroken, match="without answering"):
                await origin.post("/x", b"{}")
        assert server.connections == 1

    asyncio.run(main())


@pytest.mark.parametrize("script, error", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", ConnectionBroken),  # cut mid-body
    (b"this is not HTTP\r\n\r\n", ConnectionBroken),
])
def test_a_broken_answer_is_a_clean_error(script: bytes, error: type[Exception]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(script)
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as url:
            with pytest.raises(error):
                await Origin(url).post("/x", b"{}")

    asyncio.run(main())


def test_a_body_without_a_length_ends_with_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async def main() -> None:
        server = Server(handler)
        async with server as url:
            origin = Origin(url)
            assert (await origin.post("/x", b"{}")).body == b"until the end"
            assert (await origin.post("/x", b"{}")).body == b"until the end"  # not reused: a new connection
        assert server.connections == 2

    asyncio.run(main())


def test_a_silent_server_times_out_before_its_head_and_mid_body() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await asyncio.sleep(30)

    async def main() -> None:
        async with Server(silent) as url:
            with pytest.raises(OriginTimeout):
                await Origin(url, read_timeout_s=0.2).post("/x", b"{}")
        async with Server(stalls) as url:
            response = await Origin(url, read_timeout_s=0.2).stream("POST", "/x", b"{}")
            pieces = []
            with pytest.raises(OriginTimeout):
                async for piece in response:
                    pieces.append(piece)
            assert pieces == [b"first"]

    asyncio.run(main())


def test_nothing_listening_is_connect_failed() -> None:
    async def main() -> None:
        with pytest.raises(ConnectFailed):
            await Origin(f"http://127.0.0.1:{free_port()}").post("/x", b"{}")

    asyncio.run(main())


def test_connections_are_capped_and_a_request_waits_for_a_free_one() -> None:
    async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while True:
            body = await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(answer(body))

    async def main() -> None:
        server = Server(slow_echo)
        async with server as url:
            origin = Origin(url, max_connections=2)
            bodies = await asyncio.gather(*(origin.post("/x", b"%d" % n) for n in range(8)))
            assert [response.body for response in bodies] == [b"%d" % n for n in range(8)]
            await origin.close()
        assert server.most_open == 2 and server.connections == 2

    asyncio.run(main())


def test_a_stream_left_early_closes_its_connection_and_frees_its_slot() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await asyncio.sleep(30)

    async def main() -> None:
        server = Server(handler)
        async with server as url:
            origin = Origin(url, max_connections=1)
            for _ in range(3):  # each would wait forever for the slot if leaving did not free it
                response = await origin.stream("POST", "/x", b"{}")
                async for _piece in response:
                    break
                await response.aclose()
        assert server.connections == 3

    asyncio.run(main())


def test_against_uvicorn_json_and_a_large_streamed_body() -> None:
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return {"got": await request.json()}

    @app.post("/v1/big")
    async def big() -> StreamingResponse:
        return StreamingResponse(iter([b"x" * 65536] * 64))  # 4 MiB: above the pause threshold

    async def main(url: str) -> None:
        origin = Origin(url)
        response = await origin.post("/echo", json.dumps({"a": [1, 2]}).encode())
        assert json.loads(response.body) == {"got": {"a": [1, 2]}}
        streamed = await origin.stream("POST", "/big", b"{}")
        assert len(await streamed.read()) == 4 * 2**20
        assert (await origin.post("/echo", b'"again"')).body == b'{"got":"again"}'  # the connection survived
        await origin.close()

    with Uvicorn(app) as server:
        asyncio.run(main(f"{server.url}/v1"))


def test_waiting_for_a_free_connection_is_bounded_by_the_connect_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async def main() -> None:
        async with Server(silent) as url:
            origin = Origin(url, max_connections=1, connect_timeout_s=0.2, read_timeout_s=30)
            holding = asyncio.ensure_future(origin.post("/x", b"{}"))
            await asyncio.sleep(0.05)
            with pytest.raises(OriginTimeout, match="no free connection"):
                await origin.post("/x", b"{}")
            holding.cancel()

    asyncio.run(main())
