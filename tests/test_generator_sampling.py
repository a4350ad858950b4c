"""Generator sampling (contract A): seeded, batched, conditioned, unscreened output guarded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from node.config import NodePaths, load_node_config
from node.errors import TrainingError
from node.generator.sampling import Generator, load_generator, write_unscreened_samples
from node.generator.train import train_generator
from node.store import NewSlice, Store
from protocols.errors import UsageError
from tests.test_screen import calibrated_home  # noqa: F401 (fixture)

SIZE = 32


def phantoms(n: int, size: int, seed: int, bright: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        a, b = rng.uniform(0.6, 0.9, 2)
        img = ((xx / a) ** 2 + (yy / b) ** 2 <= 1) * bright
        cx, cy = rng.uniform(-0.3, 0.3, 2)
        img = img + ((xx - cx) ** 2 + (yy - cy) ** 2 <= 0.04) * 0.3
        out[i] = np.clip(img, 0, 1)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> NodePaths:
    """A tiny generator conditioned on modality (a CT + MR store), with CFG guidance 2."""
    from node.home import init_home

    paths = init_home(tmp_path_factory.mktemp("sampling") / "home", "site-s")
    batch: list[NewSlice] = []
    for modality, bright, scale, offset, unit in (("CT", 0.3, 4095.0, -1024.0, "HU"),
                                                  ("MR", 0.7, 200.0, 5.0, "a.u.")):
        px = phantoms(24, SIZE, seed=len(batch), bright=bright)
        batch += [
            NewSlice(modality=modality, patient=f"patient-{modality}-{i % 6}",
                     series=f"{modality}{i % 6}", position=float(i), source_digest=f"d{i}",
                     instance_key=f"{modality}-{i}", pixels=px[i], unit=unit, scale=scale,
                     offset=offset)
            for i in range(24)
        ]
    with Store(paths.store) as store:
        store.add_batch(batch)
        store.assign_split(0.2, lambda p: p)
    config = load_node_config(paths)
    gen = dataclasses.replace(config.generator, preset="tiny", ae_steps=30, diffusion_steps=30,
                              guidance_scale=2.0)
    train_generator(paths, dataclasses.replace(config, generator=gen), progress=False,
                    quality=False)
    return paths


@pytest.fixture(scope="module")
def generator(trained: NodePaths) -> Generator:
    return load_generator(trained)


def test_generator_describes_itself_without_patient_data(
    generator: Generator, trained: NodePaths
) -> None:
    assert generator.image_size == SIZE
    assert generator.modalities == ["CT", "MR"]
    assert generator.conditioning == "modality"
    with Store(trained.store) as store:
        assert generator.train_split_digest == store.split_digest("train")
    summary = generator.summary()
    assert summary["checkpoint_digest"] == generator.checkpoint_digest
    assert summary["preset"] == "tiny" and summary["steps"] == 60
    assert summary["architecture"]["stage2"]["network"].endswith("DiffusionModelUNet")
    assert set(summary["counts_by_modality"]) == {"CT", "MR"}
    assert "patient" not in json.dumps(summary)


@pytest.mark.parametrize(("scheduler", "steps"), [("dpm", 8), ("ddim", 8), ("ddpm", 12)])
def test_same_seed_gives_identical_images(
    generator: Generator, scheduler: str, steps: int
) -> None:
    a = generator.sample(5, seed=11, scheduler=scheduler, steps=steps, batch_size=4,  # type: ignore[arg-type]
                         modality="CT")
    b = generator.sample(5, seed=11, scheduler=scheduler, steps=steps, batch_size=4,  # type: ignore[arg-type]
                         modality="CT")
    assert a.dtype == np.float32 and a.shape == (5, SIZE, SIZE)
    assert np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    c = generator.sample(5, seed=12, scheduler=scheduler, steps=steps, batch_size=4,  # type: ignore[arg-type]
                         modality="CT")
    assert not np.allclose(a, c)


def test_unet_precision_is_stated_and_moves_the_images_only_slightly(
    trained: NodePaths,
) -> None:
    """The same seed in float32 and in bf16: other images, close ones, each run stating how
    it sampled (the manifest's generator section carries it)."""
    images = {}
    for precision in ("float32", "bfloat16"):
        gen = load_generator(trained)
        gen.unet_precision = precision  # type: ignore[assignment]
        images[precision] = gen.sample(4, seed=3, steps=8, batch_size=4, modality="MR")
        assert gen.summary()["sampling_precision"] == {"unet": precision,
                                                       "autoencoder": "float32"}
    gap = np.abs(images["float32"] - images["bfloat16"])
    assert gap.max() > 0.0
    assert gap.mean() < 0.02


def test_image_i_does_not_depend_on_the_batch_size(generator: Generator) -> None:
    whole = generator.sample(6, seed=3, steps=6, batch_size=6, modality="MR")
    split = generator.sample(6, seed=3, steps=6, batch_size=2, modality="MR")
    np.testing.assert_allclose(whole, split, atol=1e-4)
    first = generator.sample(2, seed=3, steps=6, batch_size=2, modality="MR")
    np.testing.assert_allclose(whole[:2], first, atol=1e-4)


def test_modality_selects_the_class(generator: Generator) -> None:
    ct = generator.sample(8, seed=0, steps=10, modality="CT")
    mr = generator.sample(8, seed=0, steps=10, modality="MR")
    # MR phantoms are brighter than CT phantoms in normalised space.
    assert mr.mean() > ct.mean()


def test_several_modalities_need_a_choice_and_unknown_ones_are_refused(
    generator: Generator,
) -> None:
    with pytest.raises(UsageError, match="several modalities"):
        generator.sample(2, seed=0, steps=2)
    with pytest.raises(UsageError, match="not PT"):
        generator.sample(2, seed=0, steps=2, modality="PT")
    with pytest.raises(UsageError, match="steps must be in"):
        generator.sample(2, seed=0, steps=5000, modality="CT")
    with pytest.raises(UsageError, match="unknown scheduler"):
        generator.sample(2, seed=0, scheduler="euler", modality="CT")  # type: ignore[arg-type]


def test_no_checkpoint_means_no_trained_generator(node_home: Path) -> None:
    with pytest.raises(TrainingError, match="no trained generator"):
        load_generator(NodePaths(node_home))


def test_unfinished_checkpoint_is_not_a_trained_generator(tmp_path: Path) -> None:
    from node.home import init_home

    paths = init_home(tmp_path / "home", "site-u")
    px = phantoms(12, SIZE, 0, 0.5)
    with Store(paths.store) as store:
        store.add_batch([NewSlice("MR", f"p{i % 3}", "s", float(i), "d", f"k{i}", px[i],
                                  "a.u.", 1.0, 0.0) for i in range(12)])
    config = load_node_config(paths)
    gen = dataclasses.replace(config.generator, preset="tiny", ae_steps=3, diffusion_steps=3)
    train_generator(paths, dataclasses.replace(config, generator=gen), max_steps=4,
                    progress=False, quality=False)
    with pytest.raises(TrainingError, match="no trained generator: the checkpoint is unfinished"):
        load_generator(paths)


def test_unscreened_samples_are_marked_and_in_physical_units(
    generator: Generator, trained: NodePaths, tmp_path: Path
) -> None:
    out = tmp_path / "look"
    result = write_unscreened_samples(trained, generator, out, count=3, seed=1, steps=4,
                                      modality="CT")
    assert result["unscreened"] is True and result["unit"] == "HU"
    normalised = generator.sample(3, seed=1, steps=4, modality="CT")
    with np.load(out / "samples.npz") as npz:
        assert bool(npz["unscreened"]) is True
        assert "UNSCREENED" in str(npz["note"])
        np.testing.assert_allclose(npz["images"], normalised * 4095.0 - 1024.0, atol=1e-2)
    assert "not checked by the distance guard" in (out / "UNSCREENED.txt").read_text()
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("inside", ["", "pending", "approved/bundle-x"])
def test_samples_are_never_written_into_the_outbox(
    generator: Generator, trained: NodePaths, inside: str
) -> None:
    target = trained.outbox / inside if inside else trained.outbox
    before = sorted(p.name for p in trained.outbox.rglob("*"))
    with pytest.raises(UsageError, match="inside the outbox"):
        write_unscreened_samples(trained, generator, target, count=1, steps=2, modality="CT")
    assert sorted(p.name for p in trained.outbox.rglob("*")) == before


def test_sample_command_refuses_the_outbox_with_exit_2(trained: NodePaths) -> None:
    from typer.testing import CliRunner

    from node.cli import app
    from protocols.cli_support import run_app

    runner = CliRunner()
    result = runner.invoke(
        app, ["sample", "--home", str(trained.root), "--out", str(trained.outbox / "pending"),
              "--modality", "CT", "--count", "1"],
    )
    assert isinstance(result.exception, UsageError)
    with pytest.raises(SystemExit) as info:
        run_app(app, ["sample", "--home", str(trained.root), "--out",
                      str(trained.outbox), "--modality", "CT", "--count", "1"])
    assert info.value.code == 2


@pytest.fixture(scope="module")
def labelled_home(tmp_path_factory: pytest.TempPathFactory) -> NodePaths:
    """A tiny MR generator conditioned on the store's label column: 3 dark to 1 bright."""
    from node.home import init_home

    paths = init_home(tmp_path_factory.mktemp("labelled") / "home", "site-l")
    dark, bright = phantoms(36, SIZE, seed=5, bright=0.3), phantoms(12, SIZE, seed=6, bright=0.9)
    batch = [
        NewSlice(modality="MR", patient=f"patient-{i % 8}", series=f"s{i % 8}",
                 position=float(i), source_digest=f"d{i}", instance_key=f"k{i}", pixels=px,
                 unit="a.u.", scale=1.0, offset=0.0, label=label)
        for i, (px, label) in enumerate([(p, "dark") for p in dark]
                                        + [(p, "bright") for p in bright])
    ]
    with Store(paths.store) as store:
        store.add_batch(batch)
        store.assign_split(0.25, lambda p: p)
        train = [r.label for r in store.records("train")]
    config = load_node_config(paths)
    gen = dataclasses.replace(config.generator, preset="tiny", ae_steps=30, diffusion_steps=30,
                              conditioning="label", guidance_scale=2.0)
    train_generator(paths, dataclasses.replace(config, generator=gen), progress=False,
                    quality=False)
    generator = load_generator(paths)
    assert generator.classes == ["bright", "dark"]
    assert generator.class_counts == [train.count("bright"), train.count("dark")]
    return paths


@pytest.fixture(scope="module")
def labelled(labelled_home: NodePaths) -> Generator:
    return load_generator(labelled_home)


def test_no_label_draws_each_images_class_in_the_train_proportions(labelled: Generator) -> None:
    null = len(labelled.classes)
    drawn = labelled._image_classes(null, seed=4, first=0, n=4000)
    assert drawn is not None
    share = np.bincount(drawn, minlength=2) / 4000
    want = np.asarray(labelled.class_counts) / sum(labelled.class_counts)
    np.testing.assert_allclose(share, want, atol=0.03)
    # Seeded per image, like the noise: a later slice of the run draws the same classes.
    again = labelled._image_classes(null, seed=4, first=100, n=50)
    assert again is not None and np.array_equal(again, drawn[100:150])
    other = labelled._image_classes(null, seed=5, first=0, n=4000)
    assert other is not None and not np.array_equal(other, drawn)
    # A named label is that label for every image.
    named = labelled._image_classes(1, seed=4, first=0, n=7)
    assert named is not None and np.all(named == 1)


def test_no_label_samples_each_image_as_its_drawn_label(labelled: Generator) -> None:
    whole = labelled.sample(8, seed=9, steps=6, batch_size=3)
    drawn = labelled._image_classes(len(labelled.classes), seed=9, first=0, n=8)
    assert drawn is not None and 0 < drawn.sum() < 8  # both classes present for this seed
    for index, name in enumerate(labelled.classes):
        named = labelled.sample(8, seed=9, steps=6, batch_size=3, label=name)
        rows = drawn == index
        np.testing.assert_allclose(whole[rows], named[rows], atol=1e-4)
        assert not np.allclose(whole[~rows], named[~rows], atol=1e-4)


def test_a_checkpoint_without_class_counts_samples_no_label_unconditionally(
    labelled: Generator,
) -> None:
    counts = labelled.class_counts
    try:
        labelled.class_counts = []
        null = len(labelled.classes)
        drawn = labelled._image_classes(null, seed=0, first=0, n=5)
        assert drawn is not None and np.all(drawn == null)
    finally:
        labelled.class_counts = counts


def test_sample_command_draws_one_label_on_request(
    labelled_home: NodePaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from typer.testing import CliRunner

    from node.cli import app
    from protocols.cli_support import run_app

    means = {}
    for name in ("bright", "dark"):
        out = tmp_path / name
        result = CliRunner().invoke(app, [
            "sample", "--home", str(labelled_home.root), "--out", str(out), "--count", "6",
            "--steps", "6", "--label", name, "--json",
        ])
        assert result.exit_code == 0, result.output
        with np.load(out / "samples.npz") as data:
            assert str(data["label"]) == name and bool(data["unscreened"])
            means[name] = float(data["images"].mean())
    assert means["bright"] > means["dark"]
    with pytest.raises(SystemExit) as info:
        run_app(app, ["sample", "--home", str(labelled_home.root), "--out",
                      str(tmp_path / "x"), "--count", "2", "--steps", "2", "--label", "purple"])
    assert info.value.code == 2
    assert "unknown label 'purple'" in capsys.readouterr().err


def test_reconstruct_returns_clipped_images_in_input_order_whatever_the_batch(
    generator: Generator,
) -> None:
    images = phantoms(5, SIZE, seed=9, bright=0.7)
    whole = generator.reconstruct(images, batch_size=64)
    assert whole.shape == images.shape and whole.dtype == np.float32
    assert whole.min() >= 0.0 and whole.max() <= 1.0
    np.testing.assert_allclose(generator.reconstruct(images, batch_size=2), whole, atol=1e-5)
    np.testing.assert_allclose(generator.reconstruct(images[3:4]), whole[3:4], atol=1e-5)
    assert generator.reconstruct(images[:0]).shape == (0, SIZE, SIZE)


def test_generate_refuses_a_generator_that_learnt_from_slices_the_store_does_not_hold(
    trained: NodePaths, calibrated_home: Path, tmp_path: Path,  # noqa: F811 (fixture)
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The guard keeps copies of the slices it screens against from leaving, nothing else. A
    # generator copied in from another home learnt from slices this reference has never
    # seen, so generate must refuse it before it samples anything, and export nothing.
    import shutil

    from node.cli import app
    from node.guard.run import generate_and_screen
    from privacy.errors import GuardError
    from protocols.cli_support import run_app

    home = NodePaths(tmp_path / "home")
    shutil.copytree(calibrated_home, home.root)
    shutil.copy2(trained.root / "models" / "generator.pt", home.root / "models" / "generator.pt")
    learnt = len(load_generator(home).train_pixel_digests or ())
    assert learnt == 40  # the train split of the trained home: 48 slices less its holdout

    def outside_guard() -> set[str]:  # the guard's kept preparation may be (re)built
        return {str(p.relative_to(home.root)) for p in home.root.rglob("*")
                if p.relative_to(home.root).parts[0] != "guard"}

    before = outside_guard()
    with pytest.raises(GuardError, match=f"learnt from {learnt} slice") as refused:
        generate_and_screen(home, load_node_config(home), 2, progress=False)
    assert refused.value.exit_code == 2
    with pytest.raises(SystemExit) as done:
        run_app(app, ["generate", "--count", "2", "--home", str(home.root)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"learnt from {learnt} slice" in err
    assert "Traceback" not in err
    assert outside_guard() == before  # no run folder, no staged images, no bundle


def test_a_store_that_grew_after_training_still_covers_its_generator(
    trained: NodePaths, tmp_path: Path
) -> None:
    import shutil

    from node.guard.reference import load_reference
    from node.guard.run import check_generator_covered
    from privacy.errors import GuardError

    home = NodePaths(tmp_path / "home")
    shutil.copytree(trained.root, home.root)
    gen = load_generator(home)
    assert gen.train_pixel_digests is not None and len(gen.train_pixel_digests) == 40

    def held() -> set[str]:  # the pixel digests of the guard's reference: the whole store
        return {r.pixel_digest for r in load_reference(home).records}

    check_generator_covered(home, held(), gen.train_pixel_digests, gen.train_split_digest)
    # A checkpoint from before the digests were kept is checked by its split digest.
    check_generator_covered(home, held(), None, gen.train_split_digest)
    with Store(home.store) as store:  # new patients arrive after training
        px = phantoms(6, SIZE, seed=99, bright=0.5)
        store.add_batch([
            NewSlice(modality="CT", patient=f"late-{i}", series=f"L{i}", position=0.0,
                     source_digest=f"late{i}", instance_key=f"late-{i}", pixels=px[i],
                     unit="HU", scale=4095.0, offset=-1024.0)
            for i in range(6)
        ])
        store.assign_split(0.2, lambda p: p)
        grown = store.split_digest("train")
    assert grown != gen.train_split_digest
    check_generator_covered(home, held(), gen.train_pixel_digests, gen.train_split_digest)
    with pytest.raises(GuardError, match="does not record which slices") as old:
        check_generator_covered(home, held(), None, gen.train_split_digest)
    assert old.value.exit_code == 2
    # One training slice missing from the reference is enough to refuse.
    with pytest.raises(GuardError, match="learnt from 1 slice"):
        check_generator_covered(home, held() - {min(gen.train_pixel_digests)},
                                gen.train_pixel_digests, gen.train_split_digest)


def test_cli_generate_states_the_acceptance_the_canaries_and_the_bundle(
    trained: NodePaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from node.cli import app
    from protocols.cli_support import run_app

    home = tmp_path / "home"
    shutil.copytree(trained.root, home)
    with pytest.raises(SystemExit) as done:
        run_app(app, ["generate", "--count", "3", "--modality", "MR", "--home", str(home)])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("accepted 3 of ")
    run_dir = Path(lines[0].rsplit("run report in ", 1)[1])
    rates = json.loads((run_dir / "report.json").read_text())["canary_catch_rates"]
    planted = sum(v["planted"] for v in rates.values())
    caught = sum(v["caught"] for v in rates.values())
    assert lines[1].startswith(f"canary self-test: {caught} of {planted} planted copies caught (")
    assert all(f"{k} {v['caught']}/{v['planted']}" in lines[1] for k, v in rates.items())
    assert lines[-1].startswith("exported a pending bundle: ")
    assert Path(lines[-1].split(": ", 1)[1].split(" (")[0]).is_dir()
