"""The one error family of synthfed.

Every package raises a subclass of :class:`SynthfedError`; the command-line apps turn it into
one line on stderr (``error: <what> (<where>)``) and an exit code. ``privacy`` keeps its own
``GuardError`` (it may not import this package) and the CLIs map that one too.
"""

from __future__ import annotations

__all__ = [
    "SynthfedError",
    "UsageError",
    "ConfigError",
    "VerificationError",
    "OperationError",
]


class SynthfedError(Exception):
    """Base of every expected failure. ``exit_code`` follows the command-line contract."""

    exit_code: int = 1

    def __init__(self, what: str, where: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.where = where

    def diagnostics(self) -> str:
        """The one-line message the CLI prints after ``error: ``."""
        return f"{self.what} ({self.where})" if self.where else self.what


class UsageError(SynthfedError):
    """Bad usage or bad input: a missing path, an empty folder, an unknown option value."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file that does not validate; ``where`` names the file and key."""


class VerificationError(SynthfedError):
    """A signature, digest, schema or policy check failed. Fail-closed: exit code 2."""

    exit_code = 2

    def __init__(self, reason: str, where: str | None = None) -> None:
        super().__init__(reason, where)
        self.reason = reason


class OperationError(SynthfedError):
    """The operation itself failed (exit code 1)."""

    exit_code = 1
