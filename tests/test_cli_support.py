"""protocols.cli_support.run_app: one line on stderr and the contract's exit code, every way."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from privacy.errors import GuardError
from protocols.cli_support import run_app
from protocols.errors import UsageError


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.command()
    def go(what: str = typer.Option("ok", "--what")) -> None:
        if what == "usage":
            raise UsageError("the count must be positive", "--count")
        if what == "guard":
            raise GuardError("a canary passed", "canaries", 1)
        if what == "interrupt":
            raise KeyboardInterrupt
        if what == "bug":
            raise ZeroDivisionError("division by zero")
        if what == "exit3":
            raise typer.Exit(3)
        print("done")

    @app.command()
    def other() -> None:  # a second command, so commands are named on the line
        print("other")

    return app


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        run_app(_app(), argv)
    out, err = capsys.readouterr()
    code = done.value.code
    assert isinstance(code, int)
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "code", "err"),
    [
        (["go"], 0, ""),
        (["go", "--what", "usage"], 2, "error: the count must be positive (--count)\n"),
        (["go", "--what", "guard"], 1, "error: a canary passed (canaries)\n"),
        (["go", "--what", "interrupt"], 130, "error: interrupted\n"),
        (["go", "--what", "bug"], 1,
         "error: unexpected ZeroDivisionError: division by zero (run with --debug)\n"),
        (["go", "--what", "exit3"], 3, ""),
        (["go", "--colour"], 2, "error: No such option '--colour'.\n"),
        (["nothing"], 2, "error: No such command 'nothing'.\n"),
        (["go", "--what"], 2, "error: Option '--what' requires an argument.\n"),
    ],
    ids=["ok", "usage-error", "guard-error", "ctrl-c", "bug", "typer-exit", "bad-option",
         "bad-command", "missing-value"],
)
def test_every_outcome_is_one_line_and_its_exit_code(
    argv: list[str], code: int, err: str, capsys: pytest.CaptureFixture[str]
) -> None:
    got_code, out, got_err = _run(argv, capsys)
    assert (got_code, got_err) == (code, err)
    assert "Traceback" not in got_err
    assert out == ("done\n" if argv == ["go"] else "")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_exception_itself(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["go", "--what", "bug"]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("SYNTHFED_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run_app(_app(), argv)
    with pytest.raises(UsageError):
        run_app(_app(), ["go", "--what", "usage"] + (["--debug"] if how == "flag" else []))


def test_ctrl_c_in_a_real_command_exits_130_not_0(
    node_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Click returns (does not raise) the code of an interrupt outside standalone mode; an
    # interrupted ingest once exited 0 with no word, so a script took it for a success.
    import node.ingest
    from node.cli import app

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(node.ingest, "ingest_sources", interrupted)
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit) as done:
        run_app(app, ["ingest", str(tmp_path / "src"), "--home", str(node_home)])
    assert done.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"
