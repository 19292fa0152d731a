"""Errors of the trainer.

    NextturnError (nextturn.errors)
    └── TrainerError
        ├── AdapterError        a version on disk that cannot be read or published
        ├── CheckpointError     a checkpoint that cannot be read back
        └── TrainerBusy         another trainer holds this scope's lineage

Samples the trainer does not admit (stale, without logprobs, from an adapter it does not know) are not
errors: they are counted, and shown by ``nextturn trainer status``.
"""

from __future__ import annotations

from nextturn.errors import NextturnError


class TrainerError(NextturnError):
    pass


class AdapterError(TrainerError):
    pass


class CheckpointError(TrainerError):
    pass


class TrainerBusy(TrainerError):
    pass
