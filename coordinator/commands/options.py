"""Options shared by coordinator commands: --home (SYNTHFED_COORDINATOR_HOME) and --json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["CoordinatorHomeOption", "JsonOption", "public_key_arg"]

CoordinatorHomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="SYNTHFED_COORDINATOR_HOME", help="coordinator home folder",
                 show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]


def public_key_arg(value: str, where: str):  # type: ignore[no-untyped-def]
    """A public key given as 64 hex characters or as the path of a ``.pub`` file."""
    from protocols.errors import UsageError
    from protocols.keys import load_public_key, public_key_from_hex

    text = value.strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return public_key_from_hex(text)
    if Path(text).is_file():
        return load_public_key(Path(text))
    raise UsageError("not a hex public key nor a key file", where)
