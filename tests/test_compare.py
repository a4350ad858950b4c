"""The arm comparison runs end to end (machinery only) and reports honestly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from coordinator.restore.compare import load_compare_config, run_comparison
from coordinator.restore.testing import make_site_home, stand_in_synthetic
from protocols.errors import ConfigError


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sites")
    return [
        make_site_home(root, f"site-{c}", "CT", patients=4, slices_per_patient=2, size=32,
                       seed=i)
        for i, c in enumerate("abc")
    ]


def write_config(tmp_path: Path, homes: list[Path], **overrides) -> Path:
    config = {
        "task": "denoise", "modality": "CT", "preset": "tiny", "steps": 6, "batch_size": 4,
        "sites": [{"name": h.name, "home": str(h)} for h in homes],
        "fedavg": {"rounds": 2},
        "low_dose": {"n_angles": 32},
        **overrides,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_tiny_comparison_runs_every_arm_end_to_end(homes: list[Path], tmp_path: Path) -> None:
    config = load_compare_config(write_config(tmp_path, homes))
    out = tmp_path / "report"
    results = run_comparison(config, out, synthetic_source=stand_in_synthetic("CT"),
                             synthetic_label="stand-in phantoms (test only, not guarded)",
                             progress=False)
    assert results["arms_run"] == ["S", "R", "L", "F", "0"]
    assert results["notes"] == {}
    # every arm is scored on the same images of every site, in the same order
    for arm in results["arms_run"]:
        for site in ("site-a", "site-b", "site-c"):
            assert len(results["per_image"][arm][site]["psnr_db"]) == 2
    assert results["per_image"]["0"] == {
        s: results["per_image"]["0"][s] for s in ("site-a", "site-b", "site-c")
    }
    assert set(results["tests"]) == {"S vs R", "S vs F", "F vs R", "S vs L"}
    sr = results["tests"]["S vs R"]["psnr_db"]["overall"]
    assert sr["n"] == 6 and sr["margin"] == 0.5
    assert sr["verdict"] in {"equivalent", "different", "different but within margin",
                             "inconclusive"}
    fed = results["provenance"]["F"]
    assert fed["total_steps"] == 6 and fed["sites"] == 3  # summed budget: 2 rounds x 1 x 3
    assert not list((out / "fedavg-work").glob("*.npz"))
    for name in ("report.md", "report.html", "results.json", "boxplots.png", "examples.png"):
        assert (out / name).is_file(), name
    markdown = (out / "report.md").read_text()
    assert "stand-in phantoms (test only, not guarded)" in markdown
    assert "| site-a | 6 | 3 | 2 | 1 |" in markdown  # split and counts stated
    assert "TOST" in markdown and "not* evidence of equivalence" in markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r'src="(?!data:)', page)  # self-contained
    assert json.loads((out / "results.json").read_text())["arms_run"] == results["arms_run"]
    # run again into the same folder: every trained arm is reused, the numbers are identical
    again = run_comparison(config, out, synthetic_source=stand_in_synthetic("CT"),
                           synthetic_label="stand-in phantoms (test only, not guarded)",
                           progress=False)
    assert all(again["timings_s"][a].get("reused") == 1.0 for a in ("S", "R", "L", "F"))
    assert again["per_image"] == results["per_image"]
    assert "model reused from an earlier run" in (out / "report.md").read_text()


def test_arm_s_without_a_generator_is_reported_missing_not_faked(
    homes: list[Path], tmp_path: Path
) -> None:
    config = load_compare_config(write_config(tmp_path, homes, arms=["S", "R", "0"]))
    results = run_comparison(config, tmp_path / "r", progress=False)
    assert results["arms_run"] == ["R", "0"]
    assert results["notes"]["S"].startswith("not run: ")
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "S vs R: not tested (arm S did not run)" in markdown


def test_a_site_whose_guard_refuses_everything_sends_nothing_to_arm_s(
    homes: list[Path], tmp_path: Path
) -> None:
    from privacy.errors import GuardError

    stand_in = stand_in_synthetic("CT")

    def source(site, count, seed):  # type: ignore[no-untyped-def]
        if site.name == "site-a":  # as generate_and_screen says when every candidate copies
            raise GuardError("no candidate passed the guard in 64 tries")
        return stand_in(site, count, seed)

    config = load_compare_config(write_config(tmp_path, homes, arms=["S", "R", "0"]))
    results = run_comparison(config, tmp_path / "r", synthetic_source=source,
                             synthetic_label="stand-in", progress=False)
    assert results["arms_run"] == ["S", "R", "0"]
    sites = results["provenance"]["S"]["sites"]
    assert sites["site-a"] == {
        "accepted": 0, "refused": "no candidate passed the guard in 64 tries"
    }
    assert sites["site-b"]["accepted"] > 0

    def refuse(site, count, seed):  # type: ignore[no-untyped-def]
        raise GuardError("no candidate passed the guard in 64 tries")

    none = run_comparison(config, tmp_path / "none", synthetic_source=refuse,
                          synthetic_label="stand-in", progress=False)
    assert none["arms_run"] == ["R", "0"]
    assert none["notes"]["S"] == "not run: no site's guard accepted any synthetic image"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arms": ["S", "X"]}, "unknown arms"),
        ({"bogus": 1}, "unknown key bogus"),
        ({"steps": -1}, "steps and batch_size"),
        ({"task": "deblur"}, "task"),
    ],
)
def test_bad_config_is_refused_naming_the_key(
    homes: list[Path], tmp_path: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_compare_config(write_config(tmp_path, homes, **overrides))


def test_fedavg_needs_two_sites_and_names_are_unique(homes: list[Path], tmp_path: Path) -> None:
    one = load_compare_config(write_config(tmp_path, homes[:1], arms=["F"]))
    with pytest.raises(ConfigError, match="at least two sites"):
        run_comparison(one, tmp_path / "x", progress=False)
    twice = load_compare_config(write_config(
        tmp_path, homes[:1], sites=[{"name": "a", "home": str(homes[0])}] * 2, arms=["R"]))
    with pytest.raises(ConfigError, match="site names repeat"):
        run_comparison(twice, tmp_path / "y", progress=False)


def test_cli_compare_json(
    homes: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.cli import app
    from protocols.cli_support import run_app

    path = write_config(tmp_path, homes, arms=["R", "0"])
    result = CliRunner().invoke(app, ["compare", "--config", str(path), "--out",
                                      str(tmp_path / "cli"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["arms_run"] == ["R", "0"]
    assert set(summary["overall"]) == {"R", "0"}
    with pytest.raises(SystemExit) as stop:
        run_app(app, ["compare", "--config", str(tmp_path / "none.yaml")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: comparison config not found (")


def test_config_overrides_reach_the_training_settings(homes: list[Path], tmp_path: Path) -> None:
    from coordinator.restore.compare import _settings

    config = load_compare_config(write_config(
        tmp_path, homes, net="dncnn", net_config={"batch_norm": False},
        low_dose={"photons_per_ray": "1e5", "n_angles": 48.0}))
    settings = _settings(config)
    assert settings.net == "dncnn"
    assert settings.net_config == {"features": 8, "depth": 4, "batch_norm": False}
    assert settings.degradation["low_dose"]["photons_per_ray"] == 1e5
    assert settings.degradation["low_dose"]["n_angles"] == 48
    assert settings.steps == 6 and settings.batch_size == 4


def test_bench_configs_load_and_name_real_sites() -> None:
    from conftest import REPO

    for name, task in (("compare_ct.yaml", "denoise"), ("compare_mr.yaml", "sr")):
        config = load_compare_config(REPO / "bench" / name)
        assert config.task == task and len(config.sites) == 3
        assert config.synthetic.source == "guard"  # real guarded synthetic data, never a stand-in
        assert config.margins == {"psnr_db": 0.5, "ssim": 0.01}


def test_a_model_made_with_another_schedule_or_before_it_existed_is_not_reused(
    homes: list[Path], tmp_path: Path
) -> None:
    import io

    import torch

    out = tmp_path / "r"
    cosine = load_compare_config(write_config(tmp_path, homes, arms=["R", "0"]))
    assert cosine.lr_schedule == "cosine"
    first = run_comparison(cosine, out, progress=False)
    assert "reused" not in first["timings_s"]["R"]
    constant = load_compare_config(write_config(tmp_path, homes, arms=["R", "0"],
                                                lr_schedule="constant"))
    second = run_comparison(constant, out, progress=False)
    assert "reused" not in second["timings_s"]["R"]
    assert second["per_image"]["R"] != first["per_image"]["R"]
    # a file written before lr_schedule was recorded (constant-rate training) is retrained
    path = out / "models" / "R.pt"
    state = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    for key in ("lr_schedule", "schedule_offset", "schedule_steps"):
        del state["train"][key]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())
    third = run_comparison(constant, out, progress=False)
    assert "reused" not in third["timings_s"]["R"]
    assert third["per_image"]["R"] == second["per_image"]["R"]  # seeded: the same run again
    fourth = run_comparison(constant, out, progress=False)
    assert fourth["timings_s"]["R"].get("reused") == 1.0
