"""Options shared by node commands (the contract: --home / SYNTHFED_HOME, --json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["HomeOption", "JsonOption"]

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="SYNTHFED_HOME", help="node home folder", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
