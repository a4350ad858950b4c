"""``synthfed-node run``: the node daemon — a Flower SuperNode running this node's ClientApp.

It starts ``flower-supernode`` with TLS and SuperNode authentication and hands it this home in
the node config; the SuperNode runs ``node.client_app:app`` (query.round, evaluate) for every
run the coordinator starts. ``--print-command`` shows the command without running it.
``--status`` prints the state of every round this node has seen.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit
from protocols.errors import UsageError


def supernode_command(
    home: Path,
    superlink: str,
    root_certificates: Path | None,
    auth_key: Path | None,
    insecure: bool = False,
) -> list[str]:
    """The flower-supernode command line for this node home."""
    exe = shutil.which("flower-supernode") or str(Path(sys.executable).parent / "flower-supernode")
    cmd = [exe, "--superlink", superlink, "--node-config", f'home="{home}"']
    if insecure:
        cmd.append("--insecure")
    else:
        if root_certificates is None:
            raise UsageError("TLS needs --root-certificates (or --insecure for a local test)")
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_command(
        superlink: Annotated[
            str, typer.Option(help="the coordinator's SuperLink Fleet API, host:port")
        ] = "127.0.0.1:9092",
        root_certificates: Annotated[
            Path | None, typer.Option(help="CA certificate (PEM) of the SuperLink's TLS")
        ] = None,
        auth_key: Annotated[
            Path | None, typer.Option(help="SuperNode authentication private key (PEM)")
        ] = None,
        insecure: Annotated[
            bool, typer.Option(help="no TLS: for a loopback test only, never between sites")
        ] = False,
        print_command: Annotated[
            bool, typer.Option("--print-command", help="print the command, do not run it")
        ] = False,
        status: Annotated[bool, typer.Option("--status", help="print round states and exit")]
        = False,
        home: HomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Answer pooling rounds: run this home as a Flower SuperNode (ClientApp)."""
        import os

        from node.config import resolve_home
        from protocols.audit import append_audit

        paths = resolve_home(home)
        if status:
            from node.rounds import list_node_rounds

            rounds = [
                {k: v for k, v in r.to_dict().items() if k != "history"}
                for r in list_node_rounds(paths)
            ]
            lines = [f"{r['round_id']}: {r['state']}"
                     + (f" — {r['reason']}" if r["reason"] else "") for r in rounds]
            emit(json_out, {"rounds": rounds}, "\n".join(lines) or "no rounds")
            return
        cmd = supernode_command(paths.root, superlink, root_certificates, auth_key, insecure)
        if print_command:
            emit(json_out, {"command": cmd}, shlex.join(cmd))
            return
        append_audit(paths.audit, "daemon_start", {"superlink": superlink, "tls": not insecure,
                                                   "node_auth": auth_key is not None})
        os.execv(cmd[0], cmd)
