"""The coordinator CLI wiring: init, trust, policy, round, receive, pool (exit codes, --json)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
from roundkit import answer_by_file, make_site
from typer.testing import CliRunner

from coordinator.cli import app
from protocols.audit import verify_audit_log
from protocols.cli_support import run_app
from protocols.keys import generate_keypair

runner = CliRunner()


def _run(*args: str) -> tuple[int, str, str]:
    """Through run_app, the error contract of the real console script."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_app(app, list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _json(*args: str) -> dict:
    code, out, err = _run(*args, "--json")
    assert code == 0, (out, err)
    return json.loads(out)


def test_init_writes_a_complete_fail_closed_home(tmp_path: Path) -> None:
    home = tmp_path / "c"
    info = _json("init", "--home", str(home))
    assert len(info["coordinator_key"]) == 64
    text = (home / "coordinator.yaml").read_text()
    assert "request_ttl_hours: 72.0" in text and text.count("#") >= 6
    assert stat.S_IMODE((home / "keys" / "coordinator.ed25519").stat().st_mode) == 0o600
    policy = json.loads((home / "policy.json").read_text())
    assert policy["required_reviewer_signatures"] == 1
    assert policy["allow_demo_auto_approved"] is False
    assert json.loads((home / "trust.json").read_text())["sites"] == {}
    assert verify_audit_log(home / "audit.jsonl").records == 3
    code, _, err = _run("init", "--home", str(home))
    assert code == 2 and "already exists" in err


def test_trust_add_list_remove_are_audited(tmp_path: Path) -> None:
    home = tmp_path / "c"
    _json("init", "--home", str(home))
    site, reviewer = generate_keypair(), generate_keypair()
    key_file = tmp_path / "site.pub"
    key_file.write_text(site.public.hex + "\n")
    added = _json("trust", "add", "site-a", "--site-key", str(key_file),
                  "--reviewer-key", reviewer.public.hex, "--home", str(home))
    assert added["site_keyid"] == site.public.keyid
    listed = _json("trust", "list", "--home", str(home))
    assert listed["sites"] == [{"site": "site-a", "site_keyid": site.public.keyid,
                                "reviewer_keyids": [reviewer.public.keyid]}]
    _json("trust", "remove", "site-a", "--home", str(home))
    assert _json("trust", "list", "--home", str(home))["sites"] == []
    events = [json.loads(line)["event"] for line in (home / "audit.jsonl").read_text().split("\n")
              if line]
    assert events[-2:] == ["trust_add", "trust_remove"]
    code, _, err = _run("trust", "add", "site-b", "--site-key", "nothex", "--home", str(home))
    assert code == 2 and "error: not a hex public key" in err


def test_policy_set_is_validated_and_audited(tmp_path: Path) -> None:
    home = tmp_path / "c"
    _json("init", "--home", str(home))
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"required_reviewer_signatures": 2,
                                "min_thresholds": {"CT": {"rmse": 0.05}}}))
    assert _json("policy", "set", str(good), "--home", str(home))[
        "required_reviewer_signatures"] == 2
    assert _json("policy", "show", "--home", str(home))["min_thresholds"] == {
        "CT": {"rmse": 0.05}}
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"required_reviewer_signatures": 0}))
    code, _, err = _run("policy", "set", str(empty), "--home", str(home))
    assert code == 2 and "requires nothing" in err
    assert _json("policy", "show", "--home", str(home))["required_reviewer_signatures"] == 2
    last = json.loads((home / "audit.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "policy_set"


def test_round_open_status_receive_pool_end_to_end(tmp_path: Path) -> None:
    from coordinator.config import CoordinatorPaths
    from coordinator.rounds import load_round

    home = tmp_path / "c"
    _json("init", "--home", str(home))
    coord = CoordinatorPaths(home.resolve())
    site = make_site(tmp_path, "site-a", coord)
    opened = _json("round", "open", "--modality", "CT", "--count", "3", "--home", str(home))
    status = _json("round", "status", opened["round"], "--home", str(home))
    assert status["sites"]["site-a"]["state"] == "asked"
    folder = answer_by_file(site, load_round(coord, opened["round"]).request_bytes(),
                            tmp_path / "drop")
    received = _json("receive", str(folder), "--home", str(home))
    assert received["rejected"] == 0 and received["results"][0]["site"] == "site-a"
    code, out, err = _run("receive", str(folder), "--home", str(home))
    assert code == 2 and "REJECTED — replay" in out and "1 of 1 bundles rejected" in err
    pooled = _json("pool", opened["round"], "--home", str(home))
    assert pooled["total"] == 3 and pooled["bundles"] == 1
    assert np.load(Path(pooled["pool"]) / "images.npy", mmap_mode="r").shape == (3, 64, 64)
    code, out, _ = _run("round", "status", "--home", str(home))
    assert code == 0 and "site-a: verified, 3 images" in out


def test_round_open_refuses_an_unknown_modality_with_exit_2(tmp_path: Path) -> None:
    home = tmp_path / "c"
    _json("init", "--home", str(home))
    code, _, _ = _run("round", "open", "--modality", "XR", "--count", "3", "--home", str(home))
    assert code == 2


def test_commands_need_a_home(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "round", "status"],
        capture_output=True, text=True, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: no coordinator home given: pass --home DIR or set SYNTHFED_COORDINATOR_HOME")


def test_simulate_help_marks_the_auto_approve_switch_as_a_demo(tmp_path: Path) -> None:
    code, out, _ = _run("simulate", "--help")
    assert code == 0 and "DEMO SWITCH" in out and "NEVER FOR REAL DATA" in out


def test_node_run_builds_a_tls_supernode_command(node_home: Path, tmp_path: Path) -> None:
    from node.cli import app as node_app

    result = runner.invoke(node_app, ["run", "--home", str(node_home), "--superlink",
                                      "link.example:9092", "--root-certificates", "/ca.pem",
                                      "--auth-key", "/k.pem", "--print-command", "--json"])
    assert result.exit_code == 0, result.stderr
    cmd = json.loads(result.stdout)["command"]
    assert cmd[1:] == ["--superlink", "link.example:9092", "--node-config",
                       f'home="{node_home.resolve()}"', "--root-certificates", "/ca.pem",
                       "--auth-supernode-private-key", "/k.pem"]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_app(node_app, ["run", "--home", str(node_home), "--print-command"])
        except SystemExit as exc:
            assert exc.code == 2
    assert "TLS needs --root-certificates" in err.getvalue()


def test_simulate_with_the_demo_switch_needs_a_demo_policy(tmp_path: Path, node_home: Path
                                                           ) -> None:
    home = tmp_path / "c"
    _json("init", "--home", str(home))
    key = tmp_path / "reviewer.ed25519"
    from protocols.keys import write_keypair

    write_keypair(generate_keypair(), key, tmp_path / "reviewer.pub")
    code, _, err = _run("simulate", "--site", str(node_home), "--modality", "CT", "--count", "2",
                        "--auto-approve-with", str(key), "--home", str(home))
    assert code == 2
    assert "error: the coordinator policy refuses demo-approved bundles" in err


def test_node_run_status_lists_each_round_with_its_state_and_reason(node_home: Path) -> None:
    from node.cli import app as node_app
    from node.config import resolve_home
    from node.rounds import NodeRound, save_node_round

    result = runner.invoke(node_app, ["run", "--home", str(node_home), "--status"])
    assert result.exit_code == 0 and result.stdout == "no rounds\n"
    paths = resolve_home(node_home)
    save_node_round(paths, NodeRound(round_id="r1", nonce="n1", request_sha256="0" * 64,
                                     modality="MR", count=8, state="awaiting_review"))
    save_node_round(paths, NodeRound(round_id="r2", nonce="n2", request_sha256="1" * 64,
                                     modality="MR", count=8, state="failed",
                                     reason="the generator copies", history=[{"state": "x"}]))
    result = runner.invoke(node_app, ["run", "--home", str(node_home), "--status"])
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["r1: awaiting_review",
                                          "r2: failed — the generator copies"]
    result = runner.invoke(node_app, ["run", "--home", str(node_home), "--status", "--json"])
    rounds = json.loads(result.stdout)["rounds"]
    assert [(r["round_id"], r["state"], r["count"]) for r in rounds] == [
        ("r1", "awaiting_review", 8), ("r2", "failed", 8)]
    assert all("history" not in r for r in rounds)  # the state log stays in the home


def test_init_policy_and_trust_refusals_exit_2_and_change_nothing(tmp_path: Path) -> None:
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("someone else's file\n")
    code, _, err = _run("init", "--home", str(crowded))
    assert code == 2 and err.startswith("error: folder is not empty")
    assert sorted(p.name for p in crowded.iterdir()) == ["notes.txt"]
    home = tmp_path / "c"
    _json("init", "--home", str(home))
    policy = (home / "policy.json").read_bytes()
    audit = (home / "audit.jsonl").read_bytes()
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{not json")
    for source, message in ((tmp_path / "missing.json", "error: policy file not found"),
                            (tmp_path / "list.json", "error: policy must be a JSON object"),
                            (tmp_path / "broken.json", "error: policy file is not JSON")):
        code, _, err = _run("policy", "set", str(source), "--home", str(home))
        assert code == 2 and err.startswith(message), err
    code, _, err = _run("trust", "remove", "site-z", "--home", str(home))
    assert code == 2 and err.startswith("error: site 'site-z' is not in the trust store")
    assert (home / "policy.json").read_bytes() == policy
    assert (home / "audit.jsonl").read_bytes() == audit
