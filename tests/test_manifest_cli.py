"""``synthfed-manifest keygen | verify | show``: exit codes, --json, and a light import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.bundle_factory import configure, export_small, trust_of

from node.export import approve_bundle
from protocols.cli import app
from protocols.cli_support import run_app
from protocols.policy import Policy

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_app(app, args)
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), out, err


@pytest.fixture
def approved(node_home: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(bundle, trust store file, policy file) for an approved bundle of site-a."""
    paths, config, reviewers = configure(node_home, reviewers=1)
    bundle = approve_bundle(paths, export_small(paths, config, round_id="r1", nonce="n1"),
                            reviewers[0])
    trust_of(paths, config).save(tmp_path / "trust.json")
    (tmp_path / "policy.json").write_text(json.dumps(
        Policy(required_reviewer_signatures=1, min_thresholds={"CT": {"rmse": 0.05}}).to_dict()
    ))
    return bundle, tmp_path / "trust.json", tmp_path / "policy.json"


def test_keygen_writes_private_0600_and_public(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["keygen", "--out", str(tmp_path / "rev"), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert oct((tmp_path / "rev.ed25519").stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "rev.pub").read_text().strip() == info["public_hex"]
    code, _, err = run(["keygen", "--out", str(tmp_path / "rev")], capsys)
    assert code == 2 and "refusing to overwrite" in err


def test_keygen_records_the_key_in_an_audit_log(node_home: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from protocols.audit import verify_audit_log

    log = node_home / "audit.jsonl"
    code, out, _ = run(["keygen", "--out", str(tmp_path / "rev"), "--audit-log", str(log),
                        "--json"], capsys)
    assert code == 0
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "key_created"
    assert last["details"] == {"role": "reviewer", "keyid": json.loads(out)["keyid"]}
    verify_audit_log(log)


def test_verify_with_trust_store_and_policy_exits_0(
    approved: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, trust, policy = approved
    code, out, _ = run(["verify", str(bundle), "--trust-store", str(trust), "--policy",
                        str(policy), "--round", "r1", "--nonce", "n1"], capsys)
    assert code == 0
    assert f"bundle {bundle.name} verified" in out and "policy: checked" in out


def test_verify_json_prints_one_object(
    approved: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, trust, policy = approved
    code, out, _ = run(["verify", str(bundle), "--trust-store", str(trust), "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["ok"] is True and summary["images"] == 3
    assert summary["reviewer_signatures"] == 1 and summary["policy_checked"] is False


def test_verify_with_site_key_file(node_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths, config, _ = configure(node_home)
    bundle = export_small(paths, config)
    code, out, _ = run(["verify", str(bundle), "--key", str(paths.site_pub)], capsys)
    assert code == 0 and "policy: none given" in out


def test_verify_tampered_bundle_exits_2_with_the_reason(
    approved: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, trust, policy = approved
    (bundle / "extra.bin").write_bytes(b"x")
    code, out, err = run(["verify", str(bundle), "--trust-store", str(trust)], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"error: file extra.bin is not listed in the manifest (added after signing) ({bundle})\n"
    )


def test_verify_with_policy_needing_two_reviewers_exits_2(
    approved: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, trust, _ = approved
    (tmp_path / "strict.yaml").write_text("required_reviewer_signatures: 2\n")
    code, _, err = run(["verify", str(bundle), "--trust-store", str(trust), "--policy",
                        str(tmp_path / "strict.yaml")], capsys)
    assert code == 2 and "the policy requires 2" in err


def test_verify_with_empty_policy_exits_2(
    approved: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, trust, _ = approved
    (tmp_path / "empty.json").write_text('{"required_reviewer_signatures": 0}')
    code, _, err = run(["verify", str(bundle), "--trust-store", str(trust), "--policy",
                        str(tmp_path / "empty.json")], capsys)
    assert code == 2 and "policy requires nothing" in err


def test_verify_needs_exactly_one_source_of_trust(
    approved: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, _, _ = approved
    code, _, err = run(["verify", str(bundle)], capsys)
    assert code == 2 and "--trust-store" in err


def test_show_prints_the_unverified_statement(
    approved: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, _, _ = approved
    code, out, _ = run(["show", str(bundle), "--json"], capsys)
    assert code == 0
    obj = json.loads(out)
    assert obj["verified"] is False
    assert obj["statement"]["predicate"]["round"] == {"id": "r1", "nonce": "n1"}
    assert len(obj["signature_keyids"]) == 2
    code, out, _ = run(["show", str(bundle)], capsys)
    assert out.startswith("UNVERIFIED manifest")


def test_verify_loads_no_heavy_module(approved: tuple[Path, Path, Path]) -> None:
    """`synthfed-manifest verify` in a fresh interpreter: no torch, ray, faiss, numpy."""
    bundle, trust, policy = approved
    code = (
        "import sys\n"
        "from protocols.cli import app\n"
        "from protocols.cli_support import run_app\n"
        "try:\n"
        f"    run_app(app, ['verify', {str(bundle)!r}, '--trust-store', {str(trust)!r},"
        f" '--policy', {str(policy)!r}, '--json'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = {'torch', 'ray', 'faiss', 'numpy', 'scipy', 'monai', 'flwr', 'pydicom'}\n"
        "print('LOADED', sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["ok"] is True
    assert done.stdout.splitlines()[-1] == "LOADED []"


def test_console_script_runs_as_module(approved: tuple[Path, Path, Path]) -> None:
    bundle, trust, _ = approved
    done = subprocess.run(
        [sys.executable, "-m", "protocols.cli", "verify", str(bundle), "--trust-store",
         str(trust)], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout
