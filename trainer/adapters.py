"""Adapter versions: numbered PEFT directories with ``meta.json``, published atomically, pruned with care.

Layout: ``<root>/<scope>/<version>/``, the version an integer written with six digits (``000007``), holding
what peft's ``save_pretrained`` writes (``adapter_config.json``, ``adapter_model.safetensors``: what vLLM
and the embedded engine load) and ``meta.json`` (base model, parent version, training config, data window,
counts, metrics, collapse guards).

Publish: the caller writes the adapter into a fresh ``.tmp-…`` directory; then ``meta.json`` is written,
every file and the directory are fsynced, the directory is renamed to the next version number and the
parent directory is fsynced; only then is ``AdapterPublished`` appended to the event log. A rename is
atomic, so a reader sees a whole version or none. Two trainers racing for one number: a rename onto an
existing version fails, and the loser takes the next number. A crash before the rename leaves a ``.tmp-``
directory that the next publish removes; a crash after it leaves a version without its event, which the
next publish of that scope announces before its own.

Prune: keep the newest ``keep`` versions and every version a deployment references (stable or canary, from
the store); delete the rest, oldest first.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from nextturn import tables
from nextturn.bus import EventLog
from nextturn.events import DEFAULT_SCOPE, AdapterPublished, utc_now
from nextturn.store import Store
from trainer.errors import AdapterError

META = "meta.json"
_TMP = ".tmp-"
_ANNOUNCED = ".announced"  # the highest version whose AdapterPublished is on the event log


class AdapterShelf:
    """The published versions of one scope."""

    def __init__(self, root: Path, scope: str = DEFAULT_SCOPE) -> None:
        self.scope = scope
        self.dir = root / scope
        self.dir.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[int]:
        if not self.dir.is_dir():
            return []  # removed by an erasure
        return sorted(int(entry.name) for entry in self.dir.iterdir() if entry.name.isdigit() and entry.is_dir())

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: int) -> Path:
        return self.dir / f"{version:06d}"

    def remove_written_before(self, moment: float) -> None:
        """Remove the versions written before ``moment`` (epoch seconds): the scope was removed then
        (nextturn.erasure); versions of the lineage begun since stay."""
        for version in self.versions():
            if (self.path(version) / META).stat().st_mtime < moment:
                shutil.rmtree(self.path(version), ignore_errors=True)
        marker = self.dir / _ANNOUNCED
        if marker.exists() and marker.stat().st_mtime < moment:
            marker.unlink()

    def meta(self, version: int) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads((self.path(version) / META).read_text())
        except (OSError, ValueError) as exc:
            raise AdapterError(f"version {version} of scope {self.scope!r} has no readable {META}: {exc}") from exc
        return meta

    def publish(self, write: Callable[[Path], None], *, base_model: str, parent_version: int | None,
                meta: dict[str, Any], event_log: EventLog) -> AdapterPublished:
        """Write a new version (``write`` saves the adapter into the directory it is given) and announce it."""
        self._remove_partial()
        staging = self.dir / f"{_TMP}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            write(staging)
            full_meta = {**meta, "scope": self.scope, "base_model": base_model, "parent_version": parent_version,
                         "created_at": utc_now().isoformat()}
            (staging / META).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
            _fsync_tree(staging)
            version = self._claim(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        announced = self._announce(event_log)
        return next((event for event in announced if event.version == version), self.event(version))

    def _announce(self, event_log: EventLog) -> list[AdapterPublished]:
        """Append AdapterPublished for every version newer than the last one announced (normally just the one
        published now; more after a crash between a rename and its event). Event ids are derived from the
        version, so announcing one twice is harmless to idempotent readers."""
        marker = self.dir / _ANNOUNCED
        done = int(marker.read_text()) if marker.exists() else 0
        pending = [v for v in self.versions() if v > done]
        announced = [self.event(version) for version in pending]
        event_log.append(announced)
        if pending:
            (self.dir / f"{_TMP}announced").write_text(str(pending[-1]))
            os.replace(self.dir / f"{_TMP}announced", marker)
        return announced

    def event(self, version: int) -> AdapterPublished:
        meta = self.meta(version)
        return AdapterPublished(
            event_id=f"adapter-{self.scope}-{version}", scope=self.scope, version=version,
            parent_version=meta.get("parent_version"), base_model=meta["base_model"],
            path=str(self.path(version).resolve()), meta={**meta, "version": version},
        )

    def _claim(self, staging: Path) -> int:
        """Rename the staging directory to the next free version number; return that number."""
        version = (self.latest() or 0) + 1
        while True:
            try:
                os.rename(staging, self.path(version))  # fails if the target exists and is not empty
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise AdapterError(f"cannot publish version {version} in {self.dir}: {exc}") from exc
                version += 1
                continue
            _fsync_dir(self.dir)
            return version

    def _remove_partial(self) -> None:
        """Remove what a dead trainer on this host left half-written. Another trainer may be writing its own
        staging directory right now: only one whose process is gone is removed."""
        self.dir.mkdir(parents=True, exist_ok=True)  # an erasure may have removed it
        for entry in self.dir.iterdir():
            if entry.name.startswith(_TMP) and entry.is_dir() and _abandoned(entry.name.removeprefix(_TMP)):
                shutil.rmtree(entry, ignore_errors=True)

    def prune(self, keep: int, referenced: Iterable[int]) -> list[int]:
        """Delete versions beyond the newest ``keep`` that nothing references; return the deleted ones."""
        pinned = set(referenced)
        versions = self.versions()
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v not in pinned]
        for version in doomed:
            shutil.rmtree(self.path(version))
        if doomed:
            _fsync_dir(self.dir)
        return doomed


def referenced_versions(store: Store, scope: str = DEFAULT_SCOPE) -> set[int]:
    """The versions a deployment of the scope serves now (stable and canary)."""
    with store.session() as db:
        rows = db.exec(select(tables.Deployment).where(col(tables.Deployment.scope) == scope)).all()
    return {v for row in rows for v in (row.stable_version, row.canary_version) if v is not None}


def _abandoned(tag: str) -> bool:
    """``tag`` is host-pid-id: abandoned when the host is this one and that process is gone."""
    parts = tag.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False  # another host's, or not ours to judge
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _fsync_tree(directory: Path) -> None:
    for entry in directory.rglob("*"):
        if entry.is_file():
            with entry.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
