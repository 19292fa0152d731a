"""Errors of the nextturn spine.

Foreign exceptions (kafka, sqlite3, sqlalchemy, pydantic) are translated into these at the edge with
``raise ... from exc``; the CLI and, later, the gateway map them to one clear line or OpenAI-style JSON.

    NextturnError
    ├── ConfigError                  settings that cannot work; the message says how to fix them
    ├── EventError                   a payload on the log that is not an event this version reads
    │   ├── UnknownEventType
    │   ├── UnsupportedSchemaVersion
    │   └── MalformedEvent
    ├── EventLogError
    │   ├── EventLogUnavailable      broker down or unreachable, SQLite file locked past the timeout
    │   ├── UnknownTopic
    │   ├── EventTooLarge            over the log's per-event limit; nothing of the batch was appended
    │   ├── CommitFailed             the group moved on; records since the last commit come again
    │   └── UndecodableRecord        raised by the crash policy for a record that is not an event
    ├── StoreError
    │   ├── StoreUnavailable
    │   └── SchemaOutOfDate          the database is not at the migrations' head
    ├── DeploymentError
    │   ├── DeploymentConflict       the deployment changed since it was read (someone else acted)
    │   └── InvalidChange            a change that does not apply (no canary to promote, no such version)
    └── ErasureError
        ├── NothingToForget          no such session of this tenant (another tenant's is as missing)
        └── CannotForget             an erasure that is refused (the keyless gateway's tenant, a forgotten name)
"""

from __future__ import annotations


class NextturnError(Exception):
    """Base of every error nextturn raises on purpose."""


class ConfigError(NextturnError):
    pass


class EventError(NextturnError):
    pass


class UnknownEventType(EventError):
    pass


class UnsupportedSchemaVersion(EventError):
    pass


class MalformedEvent(EventError):
    pass


class EventLogError(NextturnError):
    pass


class EventLogUnavailable(EventLogError):
    pass


class UnknownTopic(EventLogError):
    pass


class EventTooLarge(EventLogError):
    pass


class CommitFailed(EventLogError):
    pass


class UndecodableRecord(EventLogError):
    pass


class StoreError(NextturnError):
    pass


class StoreUnavailable(StoreError):
    pass


class SchemaOutOfDate(StoreError):
    pass


class DeploymentError(NextturnError):
    pass


class DeploymentConflict(DeploymentError):
    pass


class InvalidChange(DeploymentError):
    pass


class ErasureError(NextturnError):
    pass


class NothingToForget(ErasureError):
    pass


class CannotForget(ErasureError):
    pass
