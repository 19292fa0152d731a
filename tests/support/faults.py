"""Faults for tests/faults/: a broker that goes away and comes back with its data, and steady client traffic
that keeps count of what it was answered.

Tansu keeps its data in memory, so killing it loses every record (a Kafka cluster that lost all its replicas,
not a broker restart). :class:`TcpProxy` stands in front of it instead: stopping the proxy closes every
connection and refuses new ones, as a broker process that died does, while the records stay, as a restarted
Kafka broker's do on its disk.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from support.services import free_port


class TcpProxy:
    """Forwards a loopback port to ``target_port``; ``stop`` drops every connection, ``start`` listens again.
    With ``tls``, it is the TLS end of the connections (a broker's TLS listener in front of a plain one)."""

    def __init__(self, target_port: int, port: int | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.port = port or free_port()
        self._target = target_port
        self._tls = tls
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            doomed, self._open = self._open, set()
        if listener is not None:
            listener.close()
        for sock in doomed:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            if self._tls is not None:
                try:
                    client.settimeout(10)  # a client that never shakes hands does not hold the listener
                    client = self._tls.wrap_socket(client, server_side=True)
                    client.settimeout(None)
                except (OSError, ssl.SSLError):
                    client.close()  # a client that fails the handshake (no certificate, an unknown CA)
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class Traffic:
    """Clients asking at a steady rate in a thread, each turn on a session of its own, half of them streamed,
    with a rating after each answer; what was answered and what failed are kept."""

    url: str
    key: str
    rate_per_s: float = 20.0
    model: str = "upstream-model"
    max_tokens: int = 8
    answered: list[str] = field(default_factory=list)  # turn ids
    failures: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=60) as http:
            n = 0
            while not self._stop.is_set():
                began = time.monotonic()
                n += 1
                try:
                    turn_id = self._ask(http, n)
                    rated = http.post("/v1/feedback", json={"turn_id": turn_id, "kind": "rating", "value": 1})
                    if rated.status_code != 200:
                        self.failures[f"feedback {rated.status_code}"] += 1
                except httpx.HTTPError as exc:
                    self.failures[type(exc).__name__] += 1
                self._stop.wait(max(0.0, 1 / self.rate_per_s - (time.monotonic() - began)))

    def _ask(self, http: httpx.Client, n: int) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": f"question {n}"}],
                "stream": n % 2 == 0, "max_tokens": self.max_tokens}
        if not body["stream"]:
            answered = http.post("/v1/chat/completions", json=body)
            if answered.status_code != 200:
                self.failures[f"chat {answered.status_code}"] += 1
                raise httpx.HTTPError(f"chat {answered.status_code}")
            turn_id: str = answered.json()["id"]
        else:
            with http.stream("POST", "/v1/chat/completions", json=body) as answered:
                lines = [line for line in answered.iter_lines() if line.startswith("data: {")]
                if answered.status_code != 200 or not lines or '"error"' in lines[-1]:
                    self.failures[f"stream {answered.status_code}"] += 1
                    raise httpx.HTTPError(f"stream {answered.status_code}")
                turn_id = lines[0].split('"id": "', 1)[1].split('"', 1)[0]
        self.answered.append(turn_id)
        return turn_id
