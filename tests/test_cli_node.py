import json
import subprocess
import sys
from pathlib import Path

from freshkit import imported_after
from typer.testing import CliRunner

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
