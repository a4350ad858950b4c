"""``synthfed-coordinator trust add | list | remove``: the sites whose bundles we accept."""

from __future__ import annotations

from typing import Annotated

import typer

from coordinator.commands.options import CoordinatorHomeOption, JsonOption, public_key_arg
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    trust = typer.Typer(help="Trusted sites and their keys (changes are audited).",
                        no_args_is_help=True)
    app.add_typer(trust, name="trust")

    @trust.command("add")
    def add_command(
        site: Annotated[str, typer.Argument(help="site id")],
        site_key: Annotated[str, typer.Option("--site-key", help="site public key (hex or file)")],
        reviewer_key: Annotated[
            list[str] | None,
            typer.Option("--reviewer-key", help="reviewer public key (hex or file); repeatable"),
        ] = None,
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Trust a site: its site key and its reviewers' keys."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.home import trust_add

        paths = resolve_coordinator_home(home)
        key = public_key_arg(site_key, "--site-key")
        reviewers = [public_key_arg(k, "--reviewer-key") for k in reviewer_key or []]
        trust_add(paths, site, key, reviewers)
        emit(json_out, {"site": site, "site_keyid": key.keyid,
                        "reviewer_keyids": [k.keyid for k in reviewers]},
             f"trusted site {site} (site key {key.keyid[:16]}, {len(reviewers)} reviewer keys)")

    @trust.command("list")
    def list_command(home: CoordinatorHomeOption = None, json_out: JsonOption = False) -> None:
        """List trusted sites."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.home import trust_entries

        entries = trust_entries(resolve_coordinator_home(home))
        lines = [f"{e['site']}: site key {e['site_keyid'][:16]}, "
                 f"{len(e['reviewer_keyids'])} reviewer keys" for e in entries]
        emit(json_out, {"sites": entries}, "\n".join(lines) or "no trusted sites")

    @trust.command("remove")
    def remove_command(
        site: Annotated[str, typer.Argument(help="site id")],
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Stop trusting a site."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.home import trust_remove

        trust_remove(resolve_coordinator_home(home), site)
        emit(json_out, {"removed": site}, f"removed site {site}")
