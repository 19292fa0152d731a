"""The embedded event log: an append-only table in a WAL-mode SQLite file.

Several processes may share one file. Writers serialize on SQLite's write lock (``BEGIN IMMEDIATE``), so
the AUTOINCREMENT ``seq`` that serves as the offset becomes visible in order: a reader never sees offset
11 before offset 10. ``synchronous=FULL`` makes an append durable against power loss, not only against a
crashed process; batches amortize the fsync.

Consumer groups live in the same file. Each member heartbeats into ``group_members`` when it polls; a
member silent for longer than the session timeout is dropped. Partition ``p`` (of every topic) is meant
for the ``p mod n``-th live member in name order; a member takes a partition only once its previous owner
has let go of it or died, so a partition never has two owners and per-key order holds across a rebalance.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from nextturn import events
from nextturn.bus.log import (
    SCOPE_KEYED,
    SESSION_KEYED,
    BadRecordPolicy,
    DeadLetter,
    Delivery,
    Record,
    Row,
    Start,
    check_rows,
    check_topics,
    decode_records,
    encode_batch,
)
from nextturn.erasure import Subject
from nextturn.errors import CommitFailed, EventLogError, EventLogUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    key TEXT,
    value BLOB NOT NULL,
    appended_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_partition ON records (topic, partition, seq);
CREATE TABLE IF NOT EXISTS group_offsets (
    grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    grp TEXT NOT NULL, member TEXT NOT NULL, heartbeat_at REAL NOT NULL,
    PRIMARY KEY (grp, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS partition_owners (
    grp TEXT NOT NULL, partition INTEGER NOT NULL, member TEXT NOT NULL,
    PRIMARY KEY (grp, partition)
) WITHOUT ROWID;
"""


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as exc:
        raise EventLogUnavailable(f"cannot open the event log at {path}: {exc}") from exc
    return conn


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on error; SQLite errors become EventLogUnavailable."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise EventLogUnavailable(f"the event log is unavailable: {exc}") from exc
        return self._conn

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            try:
                self._conn.execute("COMMIT")
                return
            except sqlite3.Error as commit_exc:
                self._conn.execute("ROLLBACK")
                raise EventLogUnavailable(f"the event log is unavailable: {commit_exc}") from commit_exc
        self._conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise EventLogUnavailable(f"the event log is unavailable: {exc}") from exc


class SqliteEventLog:
    def __init__(
        self,
        path: Path,
        *,
        partitions: int = 8,
        session_timeout_s: float = 10.0,
        busy_timeout_s: float = 10.0,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._session_timeout_s = session_timeout_s
        self._conn = _connect(path, busy_timeout_s)
        self._lock = threading.Lock()
        try:
            self._conn.executescript(_SCHEMA)  # idempotent; runs in autocommit mode
        except sqlite3.Error as exc:
            raise EventLogUnavailable(f"cannot create the event log at {path}: {exc}") from exc
        # The partition count is fixed when the file is created, so that every process agrees on where a
        # key lives.
        with self._lock, _Transaction(self._conn) as conn:
            conn.execute("INSERT OR IGNORE INTO log_meta VALUES ('partitions', ?)", (str(partitions),))
            (stored,) = conn.execute("SELECT value FROM log_meta WHERE name = 'partitions'").fetchone()
        self.partitions = int(stored)

    def append(self, batch: Iterable[events.Event]) -> None:
        self._insert(encode_batch(batch))

    def append_raw(self, topic: str, key: str | None, payload: bytes) -> None:
        self._insert([(topic, key, payload)])

    def _insert(self, rows: Sequence[Row]) -> None:
        check_rows(rows)
        if not rows:
            return
        now = time.time()
        values = [(topic, self.partition_of(key), key, value, now) for topic, key, value in rows]
        with self._lock, _Transaction(self._conn) as conn:
            conn.executemany(
                "INSERT INTO records (topic, partition, key, value, appended_at) VALUES (?, ?, ?, ?, ?)", values
            )

    def erase(self, subject: Subject) -> int:
        by_json = "CAST(value AS TEXT) LIKE '{%' AND json_extract(CAST(value AS TEXT), ?)"
        deleted = 0
        with self._lock, _Transaction(self._conn) as conn:
            for keys, topics in ((sorted(subject.sessions), SESSION_KEYED), (sorted(subject.scopes), SCOPE_KEYED)):
                for start in range(0, len(keys), 500):
                    chunk = keys[start:start + 500]
                    marks = ",".join("?" * len(chunk))
                    deleted += conn.execute(
                        f"DELETE FROM records WHERE topic IN ({','.join('?' * len(topics))}) AND key IN ({marks})",
                        (*topics, *chunk)).rowcount
                    if topics is SESSION_KEYED:  # a session's signals are keyed by their scope
                        deleted += conn.execute(
                            f"DELETE FROM records WHERE topic = ? AND {by_json} IN ({marks})",
                            (events.SIGNALS, "$.session_id", *chunk)).rowcount
            if subject.tenant is not None:
                deleted += conn.execute(
                    f"DELETE FROM records WHERE topic IN (?, ?, ?) AND {by_json} = ?",
                    (events.TURNS, events.FEEDBACK, events.SIGNALS, "$.tenant", subject.tenant)).rowcount
        return deleted

    def partition_of(self, key: str | None) -> int:
        return zlib.crc32(key.encode()) % self.partitions if key is not None else 0

    def consumer(
        self,
        group: str | None,
        topics: Sequence[str],
        *,
        start: Start = "committed",
        on_bad_record: BadRecordPolicy | None = None,
    ) -> SqliteConsumer:
        check_topics(topics)
        return SqliteConsumer(
            _connect(self._path, self._busy_timeout_s),
            partitions=self.partitions,
            group=group,
            topics=tuple(topics),
            start=start,
            on_bad_record=on_bad_record or DeadLetter(self),
            session_timeout_s=self._session_timeout_s,
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqliteConsumer:
    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        partitions: int,
        group: str | None,
        topics: tuple[str, ...],
        start: Start,
        on_bad_record: BadRecordPolicy,
        session_timeout_s: float,
    ) -> None:
        self._conn = conn
        self._partitions = partitions
        self._group = group
        self._topics = topics
        self._start = start
        self._on_bad_record = on_bad_record
        self._session_timeout_s = session_timeout_s
        self._member = uuid.uuid4().hex
        self._owned: set[int] = set(range(partitions)) if group is None else set()
        self._ever_owned: set[int] = set()
        self._position: dict[tuple[str, int], int] = {}  # next offset to read
        self._uncommitted: dict[tuple[str, int], int] = {}  # next offset, for commit()
        self._last_heartbeat = float("-inf")
        self._rotation = 0
        # Every record up to this seq has been read (-1: unknown). While the log's newest seq equals it,
        # a poll costs one query instead of one per partition and topic.
        self._read_through = -1
        if group is None:
            self._take(self._owned)

    # -- group membership -----------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        if self._group is None or time.monotonic() - self._last_heartbeat < self._session_timeout_s / 3:
            return
        now = time.time()
        with _Transaction(self._conn) as conn:
            grp = self._group
            conn.execute("INSERT OR REPLACE INTO group_members VALUES (?, ?, ?)", (grp, self._member, now))
            conn.execute(
                "DELETE FROM group_members WHERE grp = ? AND heartbeat_at < ?", (grp, now - self._session_timeout_s)
            )
            conn.execute(
                "DELETE FROM partition_owners WHERE grp = ? AND member NOT IN "
                "(SELECT member FROM group_members WHERE grp = ?)",
                (grp, grp),
            )
            members = [
                m for (m,) in conn.execute("SELECT member FROM group_members WHERE grp = ? ORDER BY member", (grp,))
            ]
            mine = {p for p in range(self._partitions) if members[p % len(members)] == self._member}
            conn.executemany(
                "DELETE FROM partition_owners WHERE grp = ? AND partition = ? AND member = ?",
                [(grp, p, self._member) for p in range(self._partitions) if p not in mine],
            )
            conn.executemany(
                "INSERT OR IGNORE INTO partition_owners VALUES (?, ?, ?)", [(grp, p, self._member) for p in mine]
            )
            owned = {p for (p,) in conn.execute(
                "SELECT partition FROM partition_owners WHERE grp = ? AND member = ?", (grp, self._member)
            )}
        self._last_heartbeat = time.monotonic()
        for p in self._owned - owned:
            for topic in self._topics:
                self._position.pop((topic, p), None)
        self._take(owned - self._owned)
        self._owned = owned

    def _take(self, partitions: set[int]) -> None:
        """Set the read position of newly held partitions."""
        if partitions:
            self._read_through = -1
        for p in partitions:
            first_time = p not in self._ever_owned
            self._ever_owned.add(p)
            for topic in self._topics:
                self._position[(topic, p)] = self._initial_offset(topic, p, first_time)

    def _initial_offset(self, topic: str, partition: int, first_time: bool) -> int:
        if first_time and self._start == "beginning":
            return 0
        if first_time and self._start == "end":
            (last,) = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
            return int(last) + 1
        if self._group is None:
            return 0
        row = self._conn.execute(
            "SELECT next_offset FROM group_offsets WHERE grp = ? AND topic = ? AND partition = ?",
            (self._group, topic, partition),
        ).fetchone()
        return int(row[0]) if row else 0

    # -- reading --------------------------------------------------------------------------------------

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        pause = 0.002
        while True:
            self._heartbeat()
            records = self._fetch(max_records)
            if records or time.monotonic() >= deadline:
                break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.05)
        for record in records:
            position = (record.topic, record.partition)
            self._position[position] = self._uncommitted[position] = record.offset + 1
        return decode_records(records, self._on_bad_record)

    def _fetch(self, max_records: int) -> list[Record]:
        slots = sorted(self._position)
        if not slots:
            return []
        self._rotation = (self._rotation + 1) % len(slots)
        records: list[Record] = []
        try:
            (newest,) = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
            if newest == self._read_through:
                return []
            for topic, p in slots[self._rotation:] + slots[: self._rotation]:
                if len(records) >= max_records:
                    break
                rows = self._conn.execute(
                    "SELECT seq, key, value FROM records WHERE topic = ? AND partition = ? AND seq >= ? "
                    "ORDER BY seq LIMIT ?",
                    (topic, p, self._position[(topic, p)], max_records - len(records)),
                ).fetchall()
                records.extend(Record(topic, p, seq, key, bytes(value)) for seq, key, value in rows)
        except sqlite3.Error as exc:
            raise EventLogUnavailable(f"the event log is unavailable: {exc}") from exc
        if len(records) < max_records:  # every partition was read to its end
            self._read_through = newest
        return records

    def commit(self) -> None:
        if self._group is None:
            raise CommitFailed("a consumer without a group has nothing to commit to")
        if not self._uncommitted:
            return
        rows = [(self._group, topic, p, offset) for (topic, p), offset in self._uncommitted.items()]
        # MAX: a member that lost a partition may still commit what it processed; never move back.
        with _Transaction(self._conn) as conn:
            conn.executemany(
                "INSERT INTO group_offsets VALUES (?, ?, ?, ?) ON CONFLICT (grp, topic, partition) "
                "DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)",
                rows,
            )
        self._uncommitted.clear()

    def seek(self, topic: str, partition: int, offset: int) -> None:
        if (topic, partition) not in self._position:
            raise EventLogError(f"{topic}[{partition}] is not held by this consumer")
        self._position[(topic, partition)] = offset
        self._read_through = -1

    def held(self) -> frozenset[int]:
        return frozenset(self._owned)

    def close(self) -> None:
        """Leave the group at once, so that the others take over without waiting for the timeout."""
        if self._group is not None:
            try:
                with _Transaction(self._conn) as conn:
                    conn.execute("DELETE FROM group_members WHERE grp = ? AND member = ?", (self._group, self._member))
                    conn.execute(
                        "DELETE FROM partition_owners WHERE grp = ? AND member = ?", (self._group, self._member)
                    )
            finally:
                self._conn.close()
        else:
            self._conn.close()
