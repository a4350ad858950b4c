"""Errors of the node side; each maps to one CLI line and an exit code."""

from __future__ import annotations

from protocols.errors import OperationError, SynthfedError, UsageError

__all__ = ["NodeError", "IngestError", "StoreError", "HomeError", "TrainingError"]


class NodeError(SynthfedError):
    exit_code = 1


class HomeError(UsageError):
    """The node home is missing, incomplete or already exists."""


class IngestError(UsageError):
    """A source path cannot be ingested at all (missing, empty, unreadable)."""


class StoreError(UsageError):
    """The store is empty, inconsistent, or does not fit the request."""


class TrainingError(OperationError):
    """Generator training or sampling failed or was refused."""
