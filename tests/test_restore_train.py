"""Training restoration networks: pairs, model files, checkpoints, exact resume, torchrun DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import coordinator.restore.train as train_mod
from coordinator.restore.degrade import DegradationConfig
from coordinator.restore.train import (
    Normalisation,
    learning_rate,
    load_model,
    make_pairs,
    model_bytes,
    save_model,
    settings_for,
    train_network,
)
from protocols.errors import UsageError


def ct_images(n: int = 6, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    out = []
    for i in range(n):
        image = np.full((size, size), -1000.0)
        image[xx**2 + yy**2 < (size / 3 + i % 3) ** 2] = 40.0
        out.append(image + rng.normal(0, 10, image.shape))
    return np.stack(out).astype(np.float32)


def tiny_pairs(task: str = "sr", n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    modality = "CT" if task == "denoise" else "MR"
    s = settings_for("redcnn", task, modality, "tiny")
    images = ct_images(n) if task == "denoise" else ct_images(n) + 1000.0
    inputs, targets, _, _ = make_pairs(
        images, DegradationConfig.from_dict(s.degradation),
        Normalisation.from_dict(s.normalisation),
    )
    return inputs, targets


def test_ct_pairs_use_the_fixed_window_and_mr_pairs_each_image_span() -> None:
    images = ct_images()
    ct = Normalisation.for_modality("CT")
    _, targets, scale, offset = make_pairs(images, DegradationConfig(task="denoise"), ct)
    assert np.all(scale == 4095.0) and np.all(offset == -1024.0)
    assert np.allclose(targets, np.clip((images + 1024.0) / 4095.0, 0, 1), atol=1e-6)
    mr = Normalisation.for_modality("MR")
    inputs, targets, scale, offset = make_pairs(images * 2 + 5000, DegradationConfig(task="sr"),
                                                mr)
    assert np.allclose(targets.min(axis=(1, 2)), 0.0) and np.allclose(
        targets.max(axis=(1, 2)), 1.0)
    assert inputs.shape == targets.shape == images.shape


def test_denoise_needs_ct_and_unknown_preset_is_refused() -> None:
    with pytest.raises(UsageError, match="needs CT"):
        settings_for("redcnn", "denoise", "MR")
    with pytest.raises(UsageError, match="unknown preset"):
        settings_for("redcnn", "sr", "MR", "huge")


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    inputs, targets = tiny_pairs("sr")
    s = replace(settings_for("srcnn", "sr", "MR", "tiny"), steps=60, log_every=10)
    _, summary = train_network(inputs, targets, s, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [9, 19, 29, 39, 49, 59]
    assert lines[-1]["loss_mse"] < lines[0]["loss_mse"]
    assert summary["final_loss_mse"] == lines[-1]["loss_mse"]


def test_cosine_rate_decays_to_zero_and_fedavg_slices_follow_one_schedule(
    tmp_path: Path,
) -> None:
    default = settings_for("srcnn", "sr", "MR", "tiny")
    assert default.lr_schedule == "cosine" and default.decay_fraction == 0.2
    s = replace(default, steps=40, log_every=1, decay_fraction=1.0)
    rates = [learning_rate(s, k) for k in range(s.steps)]
    assert rates[0] == s.lr
    assert all(b < a for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] < 0.01 * s.lr
    assert learning_rate(s, 20) == pytest.approx(s.lr / 2)
    # four FedAvg rounds of 10 local steps run the 40-step schedule slice by slice
    sliced = [learning_rate(replace(s, steps=10, schedule_offset=10 * r, schedule_steps=40), k)
              for r in range(4) for k in range(10)]
    assert sliced == pytest.approx(rates)
    with pytest.raises(ValueError, match="run past"):
        replace(s, steps=10, schedule_offset=35, schedule_steps=40)
    with pytest.raises(ValueError, match="lr_schedule"):
        replace(s, lr_schedule="step")
    # decay_fraction 0.25: flat for the first 30 steps, then the cosine over the last 10
    late = replace(s, decay_fraction=0.25)
    late_rates = [learning_rate(late, k) for k in range(s.steps)]
    assert set(late_rates[:31]) == {s.lr}
    assert all(b < a for a, b in zip(late_rates[30:], late_rates[31:], strict=False))
    assert late_rates[35] == pytest.approx(s.lr / 2)
    with pytest.raises(ValueError, match="decay_fraction"):
        replace(s, decay_fraction=0.0)
    constant = replace(s, lr_schedule="constant")
    assert {learning_rate(constant, k) for k in range(s.steps)} == {s.lr}
    # the rate the optimiser used is the one logged
    inputs, targets = tiny_pairs("sr")
    train_network(inputs, targets, s, tmp_path, progress=False)
    logged = [json.loads(x)["lr"] for x in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(rates)


def test_model_file_rebuilds_the_same_network(tmp_path: Path) -> None:
    inputs, targets = tiny_pairs("denoise")
    s = settings_for("redcnn", "denoise", "CT", "tiny")
    net, summary = train_network(inputs, targets, s, tmp_path, progress=False,
                                 extra={"source": "test"})
    again, info = load_model(tmp_path / "model.pt")
    x = torch.from_numpy(inputs[:2, None])
    assert torch.equal(net(x), again(x))
    assert info["net"] == "redcnn" and info["task"] == "denoise" and info["modality"] == "CT"
    assert info["net_config"] == {"features": 8, "num_layers": 3}
    assert info["degradation"]["low_dose"]["photons_per_ray"] == 1e4
    assert info["normalisation"]["ct_window_hu"] == [-1024.0, 3071.0]
    assert info["data"] == {"source": "test"}
    assert info["digest"] == summary["model_digest"]
    # the same bytes travel as a blob
    blob_net, blob_info = load_model(model_bytes(net, s))
    assert torch.equal(blob_net(x), net(x))
    # loaded with weights_only: the file holds plain data only
    torch.load(tmp_path / "model.pt", weights_only=True)


def test_damaged_or_foreign_model_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="unreadable"):
        load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "state_dict": {}}, other)
    with pytest.raises(UsageError, match="not a synthfed-restore-model/1 file"):
        load_model(other)
    broken = tmp_path / "broken.pt"
    save_model(broken, {"net": "redcnn", "net_config": {"features": 0}, "state_dict": {}})
    with pytest.raises(UsageError, match="does not rebuild"):
        load_model(broken)
    with pytest.raises(UsageError, match="not found"):
        load_model(tmp_path / "missing.pt")


def test_killed_run_resumed_equals_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs, targets = tiny_pairs("sr")
    s = replace(settings_for("edsr", "sr", "MR", "tiny"), steps=10, checkpoint_every=4,
                log_every=1)
    straight, _ = train_network(inputs, targets, s, tmp_path / "a", progress=False)

    real_augment = train_mod._augment

    def killed(x, y, seed, step):
        if step == 6:
            raise KeyboardInterrupt
        return real_augment(x, y, seed, step)

    monkeypatch.setattr(train_mod, "_augment", killed)
    with pytest.raises(KeyboardInterrupt):
        train_network(inputs, targets, s, tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "model.pt").exists()
    monkeypatch.setattr(train_mod, "_augment", real_augment)
    resumed, summary = train_network(inputs, targets, s, tmp_path / "b", resume=True,
                                     progress=False)
    assert summary["resumed_from"] == 4
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "losses.jsonl").read_text()
             .splitlines()]
    assert steps == list(range(10))


def test_resume_with_other_settings_or_nothing_is_refused(tmp_path: Path) -> None:
    inputs, targets = tiny_pairs("sr")
    s = settings_for("edsr", "sr", "MR", "tiny")
    with pytest.raises(UsageError, match="nothing to resume"):
        train_network(inputs, targets, s, tmp_path, resume=True, progress=False)
    train_network(inputs, targets, s, tmp_path, progress=False)
    with pytest.raises(UsageError, match="other settings"):
        train_network(inputs, targets, replace(s, lr=0.1), tmp_path, resume=True,
                      progress=False)


def test_torchrun_ddp_trains_with_rank_zero_writing(tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    np.savez(tmp_path / "pairs.npz", *tiny_pairs("sr", n=8))
    script.write_text(textwrap.dedent(f"""
        import json, os, numpy as np
        from pathlib import Path
        from coordinator.restore.train import settings_for, train_network
        data = np.load({str(tmp_path / 'pairs.npz')!r})
        s = settings_for("srcnn", "sr", "MR", "tiny")
        _, summary = train_network(data["arr_0"], data["arr_1"], s,
                                   Path({str(tmp_path / 'out')!r}), progress=False)
        # one file per rank: two processes printing into one pipe may interleave
        Path({str(tmp_path)!r}, "summary-" + os.environ["RANK"] + ".json").write_text(
            json.dumps(summary))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        # --standalone: torchrun picks a free local rendezvous port
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = {p.stem.split("-")[1]: json.loads(p.read_text())
                 for p in tmp_path.glob("summary-*.json")}
    assert set(summaries) == {"0", "1"}
    assert summaries["0"]["world_size"] == 2
    assert "model_digest" in summaries["0"] and "model_digest" not in summaries["1"]
    net, info = load_model(tmp_path / "out" / "model.pt")
    assert info["net"] == "srcnn"


def test_coordinator_train_uses_the_pool_only_and_resumes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app
    from coordinator.home import init_coordinator_home
    from coordinator.pool import write_pool

    paths = init_coordinator_home(tmp_path / "coordinator")
    images = ct_images(6, 16)
    write_pool(paths.pools / "R1", "R1", [(
        {"site": "site-a", "bundle_digest": "ab" * 32, "modality": "CT", "unit": "HU"}, images)])
    args = ["train", "--pool", "R1", "--task", "denoise", "--preset", "tiny",
            "--home", str(paths.root), "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["n_images"] == 6 and summary["modality"] == "CT" and summary["round"] == "R1"
    _, info = load_model(Path(summary["model"]))
    assert info["data"]["source"] == "pool" and info["data"]["bundles"] == ["ab" * 32]
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "pass --resume or --overwrite" in str(again.exception)
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 12
    mr = CliRunner().invoke(app, ["train", "--pool", "R1", "--task", "sr", "--net", "unet",
                                  "--home", str(paths.root)])
    assert mr.exit_code != 0 and "unknown network" in str(mr.exception)
