"""Generator training: presets, config precedence, refusals, exact resume, checkpoint contents,
the holdout never read, and the tiny preset end to end through the CLI."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.config import NodeConfig, NodePaths, load_node_config
from node.errors import StoreError, TrainingError
from node.generator.checkpoint import checkpoint_path, load_checkpoint
from node.generator.presets import PRESETS, resolve_config
from node.generator.settings import GeneratorSettings
from node.generator.train import batch_indices, train_generator
from node.store import NewSlice, SliceRecord, Store
from protocols.errors import ConfigError
from protocols.typed import from_dict

SIZE = 32


def phantoms(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Smooth ellipse phantoms: a body outline with a few brighter round structures."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        a, b = rng.uniform(0.6, 0.9, 2)
        img = ((xx / a) ** 2 + (yy / b) ** 2 <= 1) * 0.5
        for _ in range(3):
            cx, cy, r = rng.uniform(-0.4, 0.4, 2).tolist() + [rng.uniform(0.08, 0.25)]
            img = img + ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) * rng.uniform(0.1, 0.4)
        out[i] = np.clip(img, 0, 1)
    return out


def fill_store(home: Path, n: int = 40, size: int = SIZE, seed: int = 0,
               modality: str = "MR") -> NodePaths:
    paths = NodePaths(home.resolve())
    px = phantoms(n, size, seed)
    batch = [
        NewSlice(modality=modality, patient=f"patient-{seed}-{i % 8}", series=f"s{i % 8}",
                 position=float(i), source_digest=f"d{seed}-{i}",
                 instance_key=f"{modality}-{seed}-{size}-{i}", pixels=px[i],
                 unit="a.u.", scale=100.0, offset=0.0)
        for i in range(n)
    ]
    with Store(paths.store) as store:
        store.add_batch(batch)
        store.assign_split(0.25, lambda p: p)
    return paths


def small_config(paths: NodePaths, **overrides: object) -> NodeConfig:
    config = load_node_config(paths)
    values: dict[str, object] = {"preset": "tiny", "ae_steps": 10, "diffusion_steps": 10,
                                 "checkpoint_every": 5, **overrides}
    gen = dataclasses.replace(config.generator, **values)  # type: ignore[arg-type]
    return dataclasses.replace(config, generator=gen)


def loss_lines(paths: NodePaths, summary: dict[str, Any]) -> list[dict[str, Any]]:
    text = (Path(summary["run_dir"]) / "losses.jsonl").read_text().splitlines()
    return [json.loads(line) for line in text]


# ---- presets and config -----------------------------------------------------------------


def test_every_preset_sets_every_hyperparameter_and_builds() -> None:
    fields = {f.name for f in dataclasses.fields(GeneratorSettings)} - {"preset", "seed"}
    for name, values in PRESETS.items():
        assert set(values) == fields, name
        assert resolve_config(GeneratorSettings(), name).preset == name


def test_value_in_node_yaml_wins_over_the_preset() -> None:
    settings = from_dict(GeneratorSettings, {"preset": "cpu", "ae_steps": 7})
    cfg = resolve_config(settings)
    assert cfg.ae_steps == 7
    assert cfg.diffusion_steps == PRESETS["cpu"]["diffusion_steps"]


def test_command_line_preset_beats_node_yaml_preset() -> None:
    cfg = resolve_config(GeneratorSettings(preset="cpu"), "tiny")
    assert cfg.preset == "tiny"
    assert cfg.unet_channels == tuple(PRESETS["tiny"]["unet_channels"])


def test_generated_node_yaml_loads_back_with_nulls_meaning_preset() -> None:
    import yaml

    data = yaml.safe_load(NodeConfig().to_yaml())
    assert data["generator"]["ae_steps"] is None
    config = from_dict(NodeConfig, data)
    assert config.generator.ae_steps is None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"ae_channels": [8, 10]}, "generator.ae_channels"),
        ({"unet_attention_levels": [True]}, "generator.unet_attention_levels"),
        ({"condition_dropout": 1.5}, "generator.condition_dropout"),
        ({"beta_start": 0.5, "beta_end": 0.1}, "generator.beta_end"),
        ({"min_snr_gamma": 0.0}, "generator.min_snr_gamma"),
        ({"unet_patch": 0}, "generator.unet_patch"),
    ],
)
def test_impossible_settings_are_refused_naming_the_key(
    overrides: dict[str, Any], key: str
) -> None:
    settings = from_dict(GeneratorSettings, {"preset": "tiny", **overrides})
    with pytest.raises(ConfigError) as info:
        resolve_config(settings)
    assert key in info.value.what


def test_wrong_type_in_node_yaml_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(NodeConfig, {"generator": {"ae_steps": "many"}})
    assert "generator.ae_steps" in info.value.what


def test_unknown_loss_weighting_in_node_yaml_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(NodeConfig, {"generator": {"loss_weighting": "p2"}})
    assert "generator.loss_weighting" in info.value.what


def test_checkpoint_config_without_loss_weighting_loads_as_uniform() -> None:
    from node.generator.presets import config_from_dict

    old = resolve_config(GeneratorSettings(), "tiny").to_dict()
    del old["loss_weighting"], old["min_snr_gamma"], old["ae_train_precision"]
    cfg = config_from_dict(old)
    assert (cfg.loss_weighting, cfg.min_snr_gamma) == ("uniform", 5.0)
    assert cfg.ae_train_precision == "auto"
    with pytest.raises(ConfigError, match="unknown"):
        config_from_dict({**old, "loss_weighting": "uniform", "min_snr_gamma": 5.0, "x": 1})


@pytest.mark.parametrize(
    ("prediction", "snr", "weight"),
    [
        # v objective: min(SNR, 5) / (SNR + 1)
        ("v_prediction", 0.25, 0.25 / 1.25),
        ("v_prediction", 5.0, 5.0 / 6.0),
        ("v_prediction", 99.0, 5.0 / 100.0),
        # epsilon objective: min(SNR, 5) / SNR
        ("epsilon", 0.25, 1.0),
        ("epsilon", 20.0, 0.25),
    ],
)
def test_min_snr_weight_caps_the_x0_weight_at_gamma(
    prediction: str, snr: float, weight: float
) -> None:
    import torch

    from node.generator.train import loss_weights

    settings = GeneratorSettings(prediction_type=prediction,  # type: ignore[arg-type]
                                 loss_weighting="min_snr", min_snr_gamma=5.0)
    cfg = resolve_config(settings, "tiny")
    alpha = torch.tensor([snr / (1.0 + snr)], dtype=torch.float64)
    assert float(loss_weights(alpha, cfg)[0]) == pytest.approx(weight, rel=1e-9)
    uniform = resolve_config(GeneratorSettings(prediction_type=prediction), "tiny")  # type: ignore[arg-type]
    assert float(loss_weights(alpha, uniform)[0]) == 1.0


def test_min_snr_run_logs_weighted_loss_beside_the_plain_mse(node_home: Path) -> None:
    paths = fill_store(node_home)
    config = small_config(paths, ae_steps=2, diffusion_steps=3, loss_weighting="min_snr")
    summary = train_generator(paths, config, progress=False, quality=False)
    diffusion = [r for r in loss_lines(paths, summary) if r["stage"] == "diffusion"]
    assert len(diffusion) == 3
    # tiny predicts epsilon: the weight min(SNR, 5) / SNR is at most 1 and below 1 for the
    # nearly clean timesteps, so the weighted loss never exceeds the plain MSE.
    # (within float32 rounding: the two means sum in different orders)
    assert all(r["loss"] <= r["mse"] * (1 + 1e-6) for r in diffusion)
    assert any(r["loss"] < r["mse"] for r in diffusion)
    state, _ = load_checkpoint(checkpoint_path(paths))
    assert state["config"]["loss_weighting"] == "min_snr"


# ---- UNet precision -----------------------------------------------------------------------


def test_unknown_diffusion_precision_in_node_yaml_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(NodeConfig, {"generator": {"diffusion_precision": "float16"}})
    assert "generator.diffusion_precision" in info.value.what


@pytest.mark.parametrize(
    ("device", "requested", "native", "expected"),
    [
        ("cpu", "auto", True, "bfloat16"),
        ("cpu", "auto", False, "float32"),
        ("cuda", "auto", False, "bfloat16"),
        ("cpu", "float32", True, "float32"),
        ("cpu", "bfloat16", False, "bfloat16"),
    ],
)
def test_auto_precision_is_bf16_on_cuda_and_on_cpus_with_native_bf16(
    monkeypatch: pytest.MonkeyPatch, device: str, requested: str, native: bool, expected: str
) -> None:
    import torch

    from node.generator import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    assert device_module.resolve_precision(torch.device(device), requested) == expected
    with pytest.raises(TrainingError, match="unknown precision 'half'"):
        device_module.resolve_precision(torch.device(device), "half")


def test_unet_precision_changes_only_the_diffusion_stage(tmp_path: Path) -> None:
    """bf16 autocast reaches the UNet and not the autoencoder: same autoencoder losses, other
    diffusion losses, and each run records the precision it used."""
    from node.home import init_home

    runs = {}
    for precision in ("float32", "bfloat16"):
        init_home(tmp_path / precision, "site-a")
        paths = fill_store(tmp_path / precision)
        config = small_config(paths, ae_steps=3, diffusion_steps=3,
                              diffusion_precision=precision, ae_train_precision="float32")
        summary = train_generator(paths, config, progress=False, quality=False)
        assert summary["precision"] == {"unet": precision, "autoencoder": "float32",
                                        "autoencoder_training": "float32"}
        assert f"UNet {precision}" in (Path(summary["run_dir"]) / "train.log").read_text()
        state, _ = load_checkpoint(checkpoint_path(paths))
        assert state["config"]["diffusion_precision"] == precision
        runs[precision] = loss_lines(paths, summary)
    ae = {p: [r["loss"] for r in lines if r["stage"] == "autoencoder"] for p, lines in runs.items()}
    diff = {p: [r["loss"] for r in lines if r["stage"] == "diffusion"] for p, lines in runs.items()}
    assert ae["float32"] == ae["bfloat16"]
    assert len(diff["float32"]) == 3
    assert diff["float32"] != diff["bfloat16"]
    np.testing.assert_allclose(diff["float32"], diff["bfloat16"], rtol=0.05)


def test_autoencoder_training_precision_reaches_its_steps_and_not_the_latents(
    tmp_path: Path,
) -> None:
    """``ae_train_precision: bfloat16`` changes stage 1's losses (slightly) and is recorded, but
    the train split is still encoded in float32: the checkpoint's scale factor is what a float32
    encoding of its own EMA autoencoder gives."""
    import torch

    from node.generator.sampling import load_generator
    from node.home import init_home

    runs = {}
    for precision in ("float32", "bfloat16"):
        init_home(tmp_path / precision, "site-a")
        paths = fill_store(tmp_path / precision)
        config = small_config(paths, ae_steps=3, diffusion_steps=1,
                              diffusion_precision="float32", ae_train_precision=precision)
        summary = train_generator(paths, config, progress=False, quality=False)
        assert summary["precision"]["autoencoder_training"] == precision
        log = (Path(summary["run_dir"]) / "train.log").read_text()
        assert ("autoencoder float32 (trained in bfloat16)" in log) == (precision == "bfloat16")
        runs[precision] = [r["loss"] for r in loss_lines(paths, summary)
                           if r["stage"] == "autoencoder"]
        state, _ = load_checkpoint(checkpoint_path(paths))
        ae = load_generator(paths).autoencoder  # the EMA weights that sampling decodes with
        with Store(paths.store) as store:
            images = store.load(store.records("train"))
        with torch.no_grad():
            z_mu, _ = ae.eval().encode(torch.from_numpy(images).unsqueeze(1))
        assert state["scale_factor"] == pytest.approx(1.0 / float(z_mu.std()), rel=1e-6)
    assert runs["float32"] != runs["bfloat16"]
    np.testing.assert_allclose(runs["float32"], runs["bfloat16"], rtol=0.05)


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve_config(GeneratorSettings(), "huge")


def test_batches_are_seeded_and_cover_each_epoch_once() -> None:
    a = [batch_indices(3, 0, k, 5, 12) for k in range(12)]
    b = [batch_indices(3, 0, k, 5, 12) for k in range(12)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    flat = np.concatenate(a)  # 60 draws = 5 epochs of 12
    for epoch in range(5):
        assert sorted(flat[epoch * 12 : (epoch + 1) * 12]) == list(range(12))
    assert not np.array_equal(np.concatenate(a), np.concatenate(
        [batch_indices(4, 0, k, 5, 12) for k in range(12)]))


# ---- refusals ---------------------------------------------------------------------------


def test_empty_store_is_refused_with_a_clear_message(node_home: Path) -> None:
    paths = NodePaths(node_home)
    with pytest.raises(StoreError, match="cannot train: the store is empty"):
        train_generator(paths, small_config(paths), progress=False)


def test_store_of_mixed_image_sizes_is_refused(node_home: Path) -> None:
    fill_store(node_home, n=8, size=32)
    paths = fill_store(node_home, n=8, size=16, seed=1)
    with pytest.raises(StoreError, match=r"cannot train: .*several sizes \[16, 32\]"):
        train_generator(paths, small_config(paths), progress=False)


def test_existing_checkpoint_needs_resume_or_overwrite(node_home: Path) -> None:
    paths = fill_store(node_home)
    config = small_config(paths, ae_steps=2, diffusion_steps=2)
    train_generator(paths, config, progress=False, quality=False)
    with pytest.raises(TrainingError, match="pass --resume .* or --overwrite"):
        train_generator(paths, config, progress=False, quality=False)
    summary = train_generator(paths, config, progress=False, quality=False, overwrite=True)
    assert summary["finished"] is True


def test_resume_without_checkpoint_is_refused(node_home: Path) -> None:
    paths = fill_store(node_home)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train_generator(paths, small_config(paths), resume=True, progress=False)


# ---- the holdout is never read --------------------------------------------------------------


def test_training_never_requests_a_holdout_slice(
    node_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = fill_store(node_home)
    with Store(paths.store) as store:
        assert store.count("holdout") > 0
    requested_splits: list[str | None] = []
    loaded_splits: set[str] = set()
    real_records, real_load = Store.records, Store.load

    def records(
        self: Store, split: str | None = None, modality: str | None = None
    ) -> list[SliceRecord]:
        requested_splits.append(split)
        return real_records(self, split, modality)

    def load(self: Store, recs: Iterable[SliceRecord]) -> np.ndarray:
        listed = list(recs)
        loaded_splits.update(r.split for r in listed)
        return real_load(self, listed)

    monkeypatch.setattr(Store, "records", records)
    monkeypatch.setattr(Store, "load", load)
    train_generator(paths, small_config(paths, quality_count=8), progress=False)
    assert requested_splits and set(requested_splits) == {"train"}
    assert loaded_splits == {"train"}


# ---- exact resume -------------------------------------------------------------------------


def test_resumed_run_gives_the_same_losses_as_an_uninterrupted_one(tmp_path: Path) -> None:
    from node.home import init_home

    homes = []
    for name in ("straight", "stopped"):
        init_home(tmp_path / name, "site-a")
        homes.append(fill_store(tmp_path / name))
    straight = train_generator(homes[0], small_config(homes[0]), progress=False,
                               quality=False)
    first = train_generator(homes[1], small_config(homes[1]), max_steps=13, progress=False,
                            quality=False)
    assert first["finished"] is False and first["step"] == 13
    second = train_generator(homes[1], small_config(homes[1]), resume=True, progress=False,
                             quality=False)
    assert second["finished"] is True and second["resumed"] is True
    a, b = loss_lines(homes[0], straight), loss_lines(homes[1], second)
    assert [r["step"] for r in b] == list(range(20))
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    assert straight["scale_factor"] == pytest.approx(second["scale_factor"], rel=1e-6)


def test_killed_run_resumes_from_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.generator import train as train_module
    from node.home import init_home

    homes = []
    for name in ("straight", "killed"):
        init_home(tmp_path / name, "site-a")
        homes.append(fill_store(tmp_path / name))
    straight = train_generator(homes[0], small_config(homes[0]), progress=False,
                               quality=False)
    real_step = train_module._Run.autoencoder_step

    def dying_step(self: train_module._Run) -> dict[str, float]:
        if self.step == 8:  # checkpoints were written at step 5
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(train_module._Run, "autoencoder_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_generator(homes[1], small_config(homes[1]), progress=False, quality=False)
    state, _ = load_checkpoint(checkpoint_path(homes[1]))
    assert state["step"] == 5
    monkeypatch.setattr(train_module._Run, "autoencoder_step", real_step)
    resumed = train_generator(homes[1], small_config(homes[1]), resume=True, progress=False,
                              quality=False)
    a, b = loss_lines(homes[0], straight), loss_lines(homes[1], resumed)
    assert [r["step"] for r in b] == list(range(20))
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)


def test_every_checkpoint_finds_the_loss_of_each_step_before_it_on_disk(
    node_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run killed outright (SIGKILL, out of memory) runs no cleanup: whatever the loss log
    # had only in its buffer is lost. So the log must be on disk when a checkpoint is taken.
    from node.generator import train as train_module

    paths = fill_store(node_home)
    real_save = train_module.save_checkpoint
    seen: list[tuple[int, list[int]]] = []

    def save(path: Path, state: dict[str, Any]) -> str:
        (log,) = paths.runs.glob("train-*/losses.jsonl")
        with open(log, encoding="utf-8") as f:  # a separate reader sees only what is written
            steps = [json.loads(line)["step"] for line in f.read().splitlines()]
        seen.append((state["step"], steps))
        return real_save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    train_generator(paths, small_config(paths), progress=False, quality=False)
    assert [step for step, _ in seen] == [5, 10, 15, 20]
    for step, steps in seen:
        assert steps == list(range(step)), step


# ---- checkpoint contents and the training-split digest ---------------------------------------


def test_checkpoint_carries_config_digest_and_training_state(node_home: Path) -> None:
    paths = fill_store(node_home)
    config = small_config(paths)
    summary = train_generator(paths, config, progress=False, quality=False)
    state, digest = load_checkpoint(checkpoint_path(paths))
    assert state["config"] == resolve_config(config.generator).to_dict()
    with Store(paths.store) as store:
        assert state["train_split_digest"] == store.split_digest("train")
    assert digest == summary["checkpoint_digest"]
    assert state["step"] == 20 and state["stage"] == "done"
    assert state["scale_factor"] == pytest.approx(summary["scale_factor"])
    for key in ("ae", "ae_ema", "ae_opt", "ae_sched", "unet", "unet_ema", "unet_opt",
                "unet_sched", "torch_rng"):
        assert key in state, key
    assert state["unet_opt"]["state"], "optimizer moments are saved"
    assert (Path(summary["run_dir"]) / "losses.png").stat().st_size > 1000


def test_checkpoint_of_another_training_split_is_refused(node_home: Path) -> None:
    paths = fill_store(node_home)
    config = small_config(paths)
    train_generator(paths, config, max_steps=6, progress=False, quality=False)
    state, _ = load_checkpoint(checkpoint_path(paths))
    fill_store(node_home, n=8, seed=5)  # new patients change the training split
    with Store(paths.store) as store:
        new_digest = store.split_digest("train")
    assert new_digest != state["train_split_digest"]
    with pytest.raises(TrainingError) as info:
        train_generator(paths, config, resume=True, progress=False, quality=False)
    message = info.value.what
    assert state["train_split_digest"][:12] in message and new_digest[:12] in message


def test_adversarial_loss_trains_the_discriminator(node_home: Path) -> None:
    paths = fill_store(node_home)
    config = small_config(paths, ae_steps=4, diffusion_steps=2, ae_adversarial_weight=0.1,
                          ae_adversarial_start=2)
    summary = train_generator(paths, config, progress=False, quality=False)
    lines = loss_lines(paths, summary)
    assert "d_loss" not in lines[1] and "d_loss" in lines[2] and "g_adv" in lines[3]
    state, _ = load_checkpoint(checkpoint_path(paths))
    assert "disc" in state and "disc_opt" in state


def test_patched_unet_trains_samples_and_keeps_the_latent_shape(node_home: Path) -> None:
    import torch

    from node.generator.networks import PatchedUNet, build_unet
    from node.generator.sampling import load_generator

    paths = fill_store(node_home)
    config = small_config(paths, unet_patch=2, diffusion_steps=4)
    cfg = resolve_config(config.generator)
    unet = build_unet(cfg, 0)
    assert isinstance(unet, PatchedUNet)
    inner: Any = unet.unet
    assert inner.conv_in.conv.in_channels == 4 * cfg.ae_latent_channels
    x = torch.randn(3, cfg.ae_latent_channels, 8, 8)
    assert torch.equal(unet.unfold(unet.fold(x)), x)  # folding loses nothing
    assert unet(x, torch.tensor([1, 500, 999])).shape == x.shape
    assert not isinstance(build_unet(resolve_config(GeneratorSettings(), "tiny"), 0),
                          PatchedUNet)  # patch 1: the plain network of older checkpoints
    # Class labels (classifier-free guidance's) reach the folded network: another class,
    # another prediction.
    conditioned = build_unet(cfg, 2)
    t = torch.tensor([10, 10, 10])
    with torch.no_grad():
        for p in conditioned.parameters():  # MONAI zeroes the output layer: any weights will do
            p.normal_(0.0, 0.05)
        a = conditioned(x, t, class_labels=torch.tensor([0, 0, 0]))
        b = conditioned(x, t, class_labels=torch.tensor([1, 1, 1]))
    assert a.shape == x.shape and not torch.equal(a, b)
    summary = train_generator(paths, config, progress=False, quality=False)
    assert summary["finished"] is True
    state, _ = load_checkpoint(checkpoint_path(paths))
    assert state["config"]["unet_patch"] == 2
    gen = load_generator(paths)
    first, again = gen.sample(3, seed=7), gen.sample(3, seed=7)
    assert first.shape == (3, SIZE, SIZE) and np.all(np.isfinite(first))
    np.testing.assert_array_equal(first, again)


def test_latents_that_do_not_fold_into_the_unet_are_refused(node_home: Path) -> None:
    paths = fill_store(node_home)
    config = small_config(paths, unet_patch=3)  # 8x8 latents, patches of 3
    with pytest.raises(TrainingError, match="patches of 3") as info:
        train_generator(paths, config, progress=False, quality=False)
    assert info.value.where == "generator.unet_patch"


# ---- end to end through the CLI -------------------------------------------------------------


def test_tiny_preset_trains_and_samples_end_to_end(node_home: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from node.cli import app
    from protocols.audit import verify_audit_log

    paths = fill_store(node_home, n=48)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--home", str(node_home), "--preset", "tiny",
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["finished"] is True and summary["preset"] == "tiny"
    assert summary["step"] == PRESETS["tiny"]["ae_steps"] + PRESETS["tiny"]["diffusion_steps"]
    assert set(summary["final_losses"]) == {"autoencoder_l1", "autoencoder_kl", "diffusion_mse"}
    assert summary["final_losses"]["autoencoder_l1"] < 0.2
    run_dir = Path(summary["run_dir"])
    for name in ("losses.jsonl", "losses.png", "quality.json", "quality-MR.png", "train.log"):
        assert (run_dir / name).exists(), name
    assert "device cpu" in (run_dir / "train.log").read_text()
    out = tmp_path / "look"
    result = runner.invoke(app, ["sample", "--home", str(node_home), "--count", "4", "--out",
                                 str(out), "--json"])
    assert result.exit_code == 0, result.output
    with np.load(out / "samples.npz") as npz:
        assert npz["images"].shape == (4, SIZE, SIZE) and bool(npz["unscreened"])
    assert (out / "UNSCREENED.txt").exists() and (out / "samples.png").exists()
    records = [json.loads(line) for line in paths.audit.read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    assert len(train_records) == 1
    details = train_records[0]["details"]
    assert details["preset"] == "tiny" and "patient" not in json.dumps(details)
    verify_audit_log(paths.audit)


def test_cli_train_on_empty_store_exits_2_with_one_line(node_home: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "train", "--home", str(node_home), "--preset",
         "tiny"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: cannot train: the store is empty"
    )
