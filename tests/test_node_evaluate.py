"""Contract E: a node scores a shared model on its own holdout and returns numbers only."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.restore.degrade import DegradationConfig, degrade_batch
from coordinator.restore.metrics import MetricWindow, image_metrics
from coordinator.restore.testing import make_site_home
from coordinator.restore.train import (
    Normalisation,
    make_pairs,
    settings_for,
    train_network,
)
from node.config import NodePaths, load_node_config
from node.errors import StoreError
from node.evaluate import (
    check_reply_is_numbers_only,
    evaluate_model,
    flatten_reply,
    holdout_physical,
)
from protocols.errors import UsageError


def tiny_model(tmp_path: Path, task: str, modality: str, size: int = 32) -> Path:
    from coordinator.restore.testing import phantom_slices

    s = replace(settings_for("redcnn", task, modality, "tiny"), steps=4)
    images = phantom_slices(6, size, modality, seed=5)
    inputs, targets, _, _ = make_pairs(images, DegradationConfig.from_dict(s.degradation),
                                       Normalisation.from_dict(s.normalisation))
    out = tmp_path / f"model-{task}"
    train_network(inputs, targets, s, out, progress=False)
    return out / "model.pt"


@pytest.fixture(scope="module")
def ct_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[NodePaths, Path]:
    root = tmp_path_factory.mktemp("eval")
    home = make_site_home(root, "site-ct", "CT", patients=4, slices_per_patient=3)
    return NodePaths(home), tiny_model(root, "denoise", "CT")


def test_reply_carries_no_array_larger_than_a_metric_vector(ct_site) -> None:
    paths, model = ct_site
    reply = evaluate_model(paths, load_node_config(paths), model.read_bytes(), "denoise")
    n = reply["n_images"]
    assert n == 3  # one of four patients held out, three slices each

    def leaves(value, key=""):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from leaves(v, f"{key}.{k}")
        else:
            yield key, value

    for key, value in leaves(reply):
        if isinstance(value, list):
            assert len(value) <= max(n, 2), key
            assert all(isinstance(v, float | int) for v in value), key
        else:
            assert value is None or isinstance(value, bool | int | float | str), key
            if isinstance(value, str):
                assert len(value) <= 200, key
    for metric in ("psnr_db", "ssim", "rmse"):
        assert len(reply[metric]) == n and len(reply[f"input_{metric}"]) == n
        assert reply[f"mean_{metric}"] == pytest.approx(float(np.mean(reply[metric])))
    assert reply["unit"] == "HU" and reply["window_hu"] == [-1024.0, 3071.0]
    assert reply["site"] == "site-ct" and reply["task"] == "denoise"


def test_flower_records_hold_only_scalars_and_flat_lists(ct_site) -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    paths, model = ct_site
    reply = evaluate_model(paths, load_node_config(paths), model.read_bytes(), "denoise")
    metrics, config = flatten_reply(reply)
    content = RecordDict({"metrics": MetricRecord(metrics), "config": ConfigRecord(config)})
    n = reply["n_images"]
    for key, value in content["metrics"].items():
        assert isinstance(value, int | float) or (
            isinstance(value, list) and len(value) <= max(n, 2)
            and all(isinstance(v, float) for v in value)
        ), key
        if key in ("psnr_db", "ssim", "rmse", "input_psnr_db", "input_ssim", "input_rmse"):
            assert len(value) == n, key
    for value in content["config"].values():
        assert isinstance(value, str | bool | int | float)
    assert content["metrics"]["psnr_db"] == reply["psnr_db"]
    assert content["config"]["degradation.task"] == "denoise"


def test_site_degrades_its_holdout_exactly_as_degrade_py(ct_site) -> None:
    paths, model = ct_site
    reply = evaluate_model(paths, load_node_config(paths), model.read_bytes(), "denoise",
                           seed=3)
    clean, _ = holdout_physical(paths, "CT")
    degraded = degrade_batch(clean, DegradationConfig(task="denoise"), seed=3)
    expected = image_metrics(degraded, clean, MetricWindow.ct())
    for metric in ("psnr_db", "ssim", "rmse"):
        assert np.allclose(reply[f"input_{metric}"], expected[metric], atol=1e-9)


def test_same_seed_same_numbers_other_seed_other_noise(ct_site) -> None:
    paths, model = ct_site
    config = load_node_config(paths)
    a = evaluate_model(paths, config, model.read_bytes(), "denoise", seed=1)
    b = evaluate_model(paths, config, model.read_bytes(), "denoise", seed=1)
    c = evaluate_model(paths, config, model.read_bytes(), "denoise", seed=2)
    assert a == b
    assert a["input_rmse"] != c["input_rmse"]


def test_model_for_another_task_or_modality_is_refused(ct_site, tmp_path: Path) -> None:
    paths, model = ct_site
    config = load_node_config(paths)
    with pytest.raises(UsageError, match="trained for task denoise, not sr"):
        evaluate_model(paths, config, model.read_bytes(), "sr")
    mr_model = tiny_model(tmp_path, "sr", "MR")
    with pytest.raises(StoreError, match="no holdout slices of modality MR"):
        evaluate_model(paths, config, mr_model.read_bytes(), "sr")
    with pytest.raises(UsageError, match="unreadable"):
        evaluate_model(paths, config, b"garbage", "denoise")


def test_mr_site_scores_each_slice_by_its_own_span(tmp_path: Path) -> None:
    home = make_site_home(tmp_path, "site-mr", "MR", patients=4, slices_per_patient=2)
    paths = NodePaths(home)
    reply = evaluate_model(paths, load_node_config(paths),
                           tiny_model(tmp_path, "sr", "MR").read_bytes(), "sr")
    assert reply["window_hu"] is None and reply["n_images"] == 2
    assert reply["degradation"] == {"task": "sr", "sr": {"factor": 4, "anti_alias": True}}


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"n_images": 2, "image": [[0.0, 1.0], [1.0, 0.0]]}, "non-number"),
        ({"n_images": 2, "pixels": [0.0] * 64}, "longer than the number of images"),
        ({"n_images": 2, "blob": b"\x00" * 10}, "type bytes"),
        ({"n_images": 2, "text": "x" * 5000}, "long string"),
        ({"n_images": 2, "array": np.zeros(2)}, "type ndarray"),
    ],
)
def test_reply_that_could_carry_an_image_is_refused(reply: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_reply_is_numbers_only(reply)


def test_cli_evaluate_json(ct_site) -> None:
    from node.cli import app

    paths, model = ct_site
    result = CliRunner().invoke(app, ["evaluate", str(model), "--home", str(paths.root),
                                      "--json"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert reply["n_images"] == 3 and len(reply["ssim"]) == 3
    human = CliRunner().invoke(app, ["evaluate", str(model), "--home", str(paths.root)])
    assert "holdout slices" in human.stdout and "degraded input" in human.stdout


def coordinator_with_round(tmp_path: Path, round_id: str = "R1") -> Path:
    from coordinator.home import init_coordinator_home

    paths = init_coordinator_home(tmp_path / "coordinator")
    (paths.rounds / round_id).mkdir(parents=True, exist_ok=True)
    return paths.root


def test_flower_evaluate_message_reply_holds_numbers_only(tmp_path: Path) -> None:
    from coordinator.restore.site_eval import evaluate_locally, evaluate_over_flower

    homes = [make_site_home(tmp_path, f"site-{c}", "CT", patients=4, slices_per_patient=2,
                            seed=i) for i, c in enumerate("ab")]
    blob = tiny_model(tmp_path, "denoise", "CT").read_bytes()
    replies, errors = evaluate_over_flower(homes, blob, "denoise")
    assert errors == [] and sorted(replies) == ["site-a", "site-b"]  # labelled by site id
    local = evaluate_locally(homes, blob, "denoise")
    for numbers in replies.values():
        n = int(numbers["n_images"])
        for key, value in numbers.items():
            assert isinstance(value, float | int) or (
                isinstance(value, list) and len(value) <= max(n, 2)
                and all(isinstance(v, float) for v in value)), key
    # the numbers that crossed Flower are the site's own contract-E numbers
    assert sorted(r["psnr_db"] for r in replies.values()) == sorted(
        r["psnr_db"] for r in local.values())


def test_coordinator_evaluate_local_is_labelled_and_recorded(tmp_path: Path) -> None:
    from coordinator.cli import app

    home = make_site_home(tmp_path, "site-a", "CT", patients=4, slices_per_patient=2)
    model = tiny_model(tmp_path, "denoise", "CT")
    coordinator = coordinator_with_round(tmp_path)
    result = CliRunner().invoke(app, [
        "evaluate", str(model), "--round", "R1", "--site", str(home), "--transport", "local",
        "--home", str(coordinator), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["transport"].startswith("LOCAL")
    assert summary["sites"]["site-a"]["n_images"] == 2
    assert Path(summary["written"]).is_file()
    missing = CliRunner().invoke(app, [
        "evaluate", str(model), "--round", "NOPE", "--site", str(home), "--home",
        str(coordinator)])
    assert missing.exit_code != 0 and "no such round" in str(missing.exception)
