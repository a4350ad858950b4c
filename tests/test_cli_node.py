import inspect
import json
import subprocess
import sys
from pathlib import Path

import click
import typer
from freshkit import imported_after
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from node.cli import app

runner = CliRunner()


def test_init_then_audit_json(tmp_path: Path) -> None:
    home = tmp_path / "h"
    result = runner.invoke(app, ["init", "--site", "s1", "--home", str(home), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["site"] == "s1"
    result = runner.invoke(app, ["audit", "--home", str(home), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["records"] == 3


def test_every_command_summary_is_one_line_in_the_command_lists() -> None:
    """Rich help keeps a docstring's line breaks: a wrapped first paragraph splits the list."""
    wrapped = []
    for root in (app, coordinator_app):
        stack: list[tuple[str, click.Command]] = [("", typer.main.get_command(root))]
        while stack:
            path, command = stack.pop()
            if isinstance(command, click.Group):
                stack.extend((f"{path} {n}", c) for n, c in command.commands.items())
            first = inspect.cleandoc(command.help or "").split("\n\n")[0]
            if "\n" in first or not first:
                wrapped.append(path or "(root)")
    assert wrapped == []


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "audit", "--home", str(tmp_path / "none")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: not a node home")
    assert "Traceback" not in proc.stderr


def test_help_does_not_import_torch() -> None:
    code = "import node.cli\ntry:\n    node.cli.app(['--help'])\nexcept SystemExit:\n    pass\n"
    assert imported_after(code, ("torch", "faiss", "ray", "monai")) == []
