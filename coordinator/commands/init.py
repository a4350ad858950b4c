"""``synthfed-coordinator init``: create a coordinator home."""

from __future__ import annotations

from typing import Annotated

import typer

from coordinator.commands.options import CoordinatorHomeOption, JsonOption
from protocols.cli_support import emit
from protocols.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("init")
    def init_command(
        home: CoordinatorHomeOption = None,
        consortium: Annotated[str, typer.Option(help="consortium name")] = "consortium",
        json_out: JsonOption = False,
    ) -> None:
        """Create a coordinator home: coordinator.yaml, key, trust store, policy, audit log."""
        from coordinator.home import init_coordinator_home
        from protocols.keys import load_public_key

        if home is None:
            raise UsageError("no coordinator home given: pass --home DIR")
        paths = init_coordinator_home(home, consortium)
        pub = load_public_key(paths.coordinator_pub)
        emit(json_out,
             {"home": str(paths.root), "coordinator_key": pub.hex, "keyid": pub.keyid},
             f"initialised coordinator home at {paths.root}\n"
             f"coordinator key (put it in each node.yaml, policy.coordinator_key): {pub.hex}")
