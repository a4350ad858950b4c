"""The guard's one error type. ``privacy`` may not import ``protocols``; the CLIs map it by name.

A :class:`GuardError` means the guard refused to vouch for something: a calibrated threshold
below the site's floor, a canary that slipped through, inputs of the wrong shape. It is a
``ValueError`` so library callers can catch it without importing this package.
"""

from __future__ import annotations

__all__ = ["GuardError"]


class GuardError(ValueError):
    """A refusal of the guard, with the command-line exit code it maps to (1 or 2)."""

    def __init__(self, what: str, where: str | None = None, exit_code: int = 1) -> None:
        super().__init__(f"{what} ({where})" if where else what)
        self.what = what
        self.where = where
        self.exit_code = exit_code

    def diagnostics(self) -> str:
        return f"{self.what} ({self.where})" if self.where else self.what
