"""``synthfed-coordinator policy show | set FILE``: what a bundle must satisfy (audited)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from coordinator.commands.options import CoordinatorHomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    policy = typer.Typer(help="The bundle policy (changes are audited).", no_args_is_help=True)
    app.add_typer(policy, name="policy")

    @policy.command("show")
    def show_command(home: CoordinatorHomeOption = None, json_out: JsonOption = False) -> None:
        """Print the policy."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.home import policy_show

        data = policy_show(resolve_coordinator_home(home))
        emit(json_out, data, json.dumps(data, indent=2, sort_keys=True))

    @policy.command("set")
    def set_command(
        file: Annotated[Path, typer.Argument(help="policy JSON file")],
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Replace the policy with FILE (validated; a policy requiring nothing is refused)."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.home import policy_set

        data = policy_set(resolve_coordinator_home(home), file)
        emit(json_out, data, "policy updated\n" + json.dumps(data, indent=2, sort_keys=True))
