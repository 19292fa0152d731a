"""Checkpoints: the trainer's adapter, optimizer and bookkeeping, so that a killed trainer resumes.

Layout under ``<data dir>/trainer/<scope>/``::

    checkpoints/000012/adapter/     the adapter in PEFT format
    checkpoints/000012/optimizer.pt
    checkpoints/000012/state.json   the bookkeeping (see trainer.worker.State)
    CURRENT                         "000012": the checkpoint to resume from
    lock                            held (flock) by the running trainer of this scope

A new checkpoint is written to a fresh numbered directory, fsynced, and then ``CURRENT`` is replaced
atomically (write a temporary file, fsync, rename), so a crash leaves the previous checkpoint or the new
one, never half of one. Bookkeeping alone (no new weights) is rewritten the same way inside the current
checkpoint. Older checkpoints are removed once a newer one is current.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from trainer.errors import CheckpointError, TrainerBusy

STATE = "state.json"
ADAPTER = "adapter"
OPTIMIZER = "optimizer.pt"


class Checkpoints:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._lock: IO[bytes] | None = None

    def lock(self) -> None:
        """Claim the scope: two trainers on one lineage would publish versions from different weights."""
        handle = (self.dir / "lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise TrainerBusy(f"another trainer holds {self.dir}; run one trainer per scope") from exc
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the lock
            self._lock = None

    def current(self) -> Path | None:
        pointer = self.dir / "CURRENT"
        if not pointer.exists():
            return None
        path = self.dir / "checkpoints" / pointer.read_text().strip()
        if not (path / STATE).exists():
            raise CheckpointError(f"{pointer} names {path}, which holds no {STATE}; remove CURRENT to start over")
        return path

    def state(self) -> dict[str, Any] | None:
        path = self.current()
        if path is None:
            return None
        try:
            state: dict[str, Any] = json.loads((path / STATE).read_text())
        except ValueError as exc:
            raise CheckpointError(f"{path / STATE} is not JSON: {exc}") from exc
        return state

    def save(self, write_weights: Callable[[Path], None], state: dict[str, Any]) -> Path:
        """A new checkpoint: ``write_weights`` fills the directory it is given (adapter/, optimizer.pt)."""
        previous = self.current()
        number = int(previous.name) + 1 if previous is not None else 1
        path = self.dir / "checkpoints" / f"{number:06d}"
        shutil.rmtree(path, ignore_errors=True)  # a crash between mkdir and CURRENT left it half-written
        path.mkdir(parents=True)  # parents: an erasure may have removed the scope's checkpoints
        write_weights(path)
        _write_atomic(path / STATE, json.dumps(state))
        for entry in path.rglob("*"):
            if entry.is_file():
                _fsync_file(entry)
        _write_atomic(self.dir / "CURRENT", path.name)
        for old in (self.dir / "checkpoints").iterdir():
            if old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def clear(self, before: float) -> None:
        """Remove the checkpoint if it was written before ``before`` (epoch seconds): the scope was removed
        then (nextturn.erasure). The lock stays with its holder."""
        pointer = self.dir / "CURRENT"
        if pointer.exists() and pointer.stat().st_mtime < before:
            pointer.unlink()
            shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)
            (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    def save_state(self, state: dict[str, Any]) -> None:
        """Rewrite the bookkeeping of the current checkpoint (its weights stay)."""
        path = self.current()
        if path is None:
            raise CheckpointError("no checkpoint to update; save() one first")
        _write_atomic(path / STATE, json.dumps(state))


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
