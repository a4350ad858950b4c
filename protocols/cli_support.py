"""What the three command-line apps share: the error handler and the output helpers.

Command functions only declare options and call library functions; every expected failure is a
:class:`~protocols.errors.SynthfedError` (or privacy's ``GuardError``), which :func:`run_app`
turns into one line ``error: <what> (<where>)`` on stderr and the contract's exit code. A
traceback is printed only with ``--debug`` (or ``SYNTHFED_DEBUG=1``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from protocols.errors import SynthfedError

__all__ = ["run_app", "emit", "fail", "register_commands"]


def _is_guard_error(exc: BaseException) -> bool:
    # privacy may not be imported here (and must not be loaded by a --help); match by name.
    return type(exc).__module__.startswith("privacy") and any(
        c.__name__ == "GuardError" for c in type(exc).__mro__
    )


def register_commands(app: Any, package: str, names: tuple[str, ...]) -> None:
    """Import ``<package>.<name>`` for each name and let it ``register(app)`` its command."""
    import importlib

    for name in names:
        importlib.import_module(f"{package}.{name}").register(app)


def run_app(app: Any, argv: list[str] | None = None) -> None:
    """Run a Typer app with the one-line error contract; exits the process."""
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("SYNTHFED_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        # Outside standalone mode click *returns* the exit code of a ``typer.Exit`` and of an
        # interrupt (Ctrl-C is 130) instead of raising; a command's own return value is None.
        code = app(args=args, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            if code == 130:
                print("error: interrupted", file=sys.stderr)
            sys.exit(code)
    except SynthfedError as exc:
        if debug:
            raise
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if _is_guard_error(exc):
            if debug:
                raise
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(int(getattr(exc, "exit_code", 1)))
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug)", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


def emit(as_json: bool, obj: dict[str, Any], human: str) -> None:
    """Print exactly one JSON object (``--json``) or the human summary, on stdout."""
    if as_json:
        print(json.dumps(obj, sort_keys=True, default=str))
    else:
        print(human)


def fail(what: str, where: str | None = None, code: int = 2) -> SynthfedError:
    err = SynthfedError(what, where)
    err.exit_code = code
    return err
