"""An HTTP/1.1 origin and its pool of keep-alive connections: how engines talk to a model server.

Why not httpx: the gateway's budget is 0.5 ms added at p50 (DESIGN), and on the machine we measure on,
``httpx.AsyncClient.post`` alone costs about 0.95 ms per request and httpcore's pool about 0.65 ms,
where this client, built on asyncio's protocol interface and ``httptools`` (the HTTP parser uvicorn
uses, already installed with ``uvicorn[standard]``), costs about 0.25 ms. An engine needs little of
HTTP: POST a JSON body to one origin and read the answer whole or as it streams, so this stays small.

What it does and does not do:
- ``http`` and ``https`` (the system's CA store), keep-alive, at most ``max_connections`` open at once
  (a request beyond that waits its turn, counted in its connect timeout), ``max_idle`` kept for reuse.
- Bodies with a Content-Length, chunked, or ending with the connection (httptools decodes chunking).
- Timeouts: ``connect_timeout_s`` to get a connection, ``read_timeout_s`` for each wait on the server
  (its head, then every piece of its body), so a stream may run as long as it keeps producing.
- A reused connection that the server closed before it answered anything is retried once on a new one
  (a server may drop an idle keep-alive connection just as a request goes out). A model request that
  was never answered is safe to send again.
- No proxies, redirects, cookies, compression or HTTP/2: model servers do not need them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

# Unread streamed bytes above which the connection stops reading from the server until they are consumed.
_HIGH_WATER = 1 << 20


class OriginError(Exception):
    """The request failed below HTTP: no connection, a timeout, or a connection cut mid-answer."""


class ConnectFailed(OriginError):
    pass


class OriginTimeout(OriginError):
    pass


class ConnectionBroken(OriginError):
    pass


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


class Origin:
    def __init__(
        self,
        base_url: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 120.0,
        max_connections: int = 256,
        max_idle: int = 64,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        default_port = self._port == (443 if parts.scheme == "https" else 80)
        authority = self._host if default_port else f"{self._host}:{self._port}"
        if ":" in self._host:  # an IPv6 literal
            authority = f"[{self._host}]" if default_port else f"[{self._host}]:{self._port}"
        lines = [f"Host: {authority}", "Content-Type: application/json", "Accept-Encoding: identity",
                 *(f"{name}: {value}" for name, value in headers)]
        self._head = "\r\n".join(lines).encode("latin-1")
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle
        self._closed = False

    async def post(self, path: str, body: bytes) -> Response:
        """POST a JSON body and read the whole answer."""
        streamed = await self.stream("POST", path, body)
        chunks = [chunk async for chunk in streamed]
        return Response(streamed.status, b"".join(chunks))

    async def get(self, path: str) -> Response:
        streamed = await self.stream("GET", path, None)
        chunks = [chunk async for chunk in streamed]
        return Response(streamed.status, b"".join(chunks))

    async def stream(self, method: str, path: str, body: bytes | None) -> StreamedResponse:
        """Send a request and return once the answer's head has arrived; iterate it for the body."""
        if self._closed:
            raise ConnectFailed("the origin's client is closed")
        request = self._request(method, path, body)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise OriginTimeout(f"no free connection to {self._host}:{self._port} within "
                                f"{self._connect_timeout_s} s") from None
        connection: _Connection | None = None
        try:
            connection, reused = await self._connection()
            try:
                status = await connection.send(request, self._read_timeout_s)
            except _NothingAnswered:
                if not reused:
                    raise self._unanswered() from None
                connection, _ = await self._open()
                try:
                    status = await connection.send(request, self._read_timeout_s)
                except _NothingAnswered:
                    raise self._unanswered() from None
        except BaseException:
            if connection is not None:
                connection.close()
            self._slots.release()
            raise
        return StreamedResponse(status, connection, self)

    def _unanswered(self) -> ConnectionBroken:
        return ConnectionBroken(f"{self._host}:{self._port} closed the connection without answering")

    def _request(self, method: str, path: str, body: bytes | None) -> bytes:
        length = b"" if body is None else b"\r\nContent-Length: %d" % len(body)
        start = f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1")
        return start + self._head + length + b"\r\n\r\n" + (body or b"")

    async def _connection(self) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to have timed out
            if connection.usable:
                return connection, True
        return await self._open()

    async def _open(self) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None)
        except TimeoutError:
            raise OriginTimeout(f"cannot connect to {self._host}:{self._port} within "
                                f"{self._connect_timeout_s} s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        return connection, False

    def _release(self, connection: _Connection, reusable: bool) -> None:
        self._slots.release()
        if reusable and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class StreamedResponse:
    """An answer whose head has arrived: ``status``, then its body by iteration (each piece as it comes).

    Iterating to the end, or ``aclose()``, gives the connection back; stopping early closes it.
    """

    def __init__(self, status: int, connection: _Connection, origin: Origin) -> None:
        self.status = status
        self._connection: _Connection | None = connection
        self._origin = origin

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        try:
            while (chunk := await connection.read(self._origin._read_timeout_s)) is not None:
                yield chunk
        except BaseException:
            await self.aclose()
            raise
        self._finish(reusable=connection.keep_alive)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        self._finish(reusable=False)

    def _finish(self, reusable: bool) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            self._origin._release(connection, reusable)


class _NothingAnswered(Exception):
    """The connection closed before a single byte of the answer."""


class _Connection(asyncio.Protocol):
    """One TCP connection; one request at a time. httptools calls the ``on_*`` methods as bytes arrive."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._lost = False
        self._answered = False  # any byte of the current answer has arrived
        self._status = 0
        self._head_done = False
        self._complete = False
        self._body_until_close = False
        self._has_length = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._failure: OriginError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.keep_alive = False

    @property
    def usable(self) -> bool:
        return not self._lost and self._transport is not None and not self._transport.is_closing()

    async def send(self, request: bytes, timeout_s: float) -> int:
        """Write a request; wait for the answer's head and return its status."""
        assert self._transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._answered = self._head_done = self._complete = self._body_until_close = False
        self._chunks.clear()
        self._buffered = 0
        self._transport.write(request)
        while not self._head_done:
            if self._lost:
                if not self._answered:
                    raise _NothingAnswered()
                raise self._failure or ConnectionBroken("the server closed the connection mid-answer")
            if self._failure is not None:
                raise self._failure
            await self._wait(timeout_s)
        return self._status

    async def read(self, timeout_s: float) -> bytes | None:
        """The next piece of the body, or None at its end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _HIGH_WATER // 2 and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                return chunk
            if self._complete:
                return None
            if self._failure is not None:
                raise self._failure
            if self._lost:
                raise ConnectionBroken("the server closed the connection mid-answer")
            await self._wait(timeout_s)

    async def _wait(self, timeout_s: float) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._waiter
        except TimeoutError:
            self.close()
            raise OriginTimeout(f"the server sent nothing for {timeout_s} s") from None
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        self._lost = True
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._failure = ConnectionBroken(f"the server's answer is not valid HTTP: {exc}")
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._head_done and self._body_until_close and not self._complete:
            self._complete = True  # a body without a length ends with its connection
        self.keep_alive = False
        self._wake()

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._has_length = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._has_length = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._head_done = True
        self._body_until_close = not self._has_length and self._status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        self._complete = True
        self.keep_alive = self._parser.should_keep_alive() and not self._lost
