"""node.guard.calibration.cached_index: a kept search index serves identical features only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.guard.calibration import cached_index
from privacy.search import ExactIndex, brute_force_nearest
from protocols.files import sha256_hex

LAYOUT = {"n_components": 32, "blocks": 8, "local_axes": False}


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.random((300, 256)).astype(np.float32)
    var = (ref[rng.integers(0, 300, (5, 2))] + rng.normal(0, 0.02, (5, 2, 256))).astype(
        np.float32
    )
    return ref, var


def test_second_run_loads_the_kept_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, var = _problem()
    first = cached_index(tmp_path, "pixels", ref, LAYOUT)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".npz") and files[1].endswith(".sha256")

    def no_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the index was rebuilt instead of loaded")

    monkeypatch.setattr(ExactIndex, "__init__", no_build)
    second = cached_index(tmp_path, "pixels", ref, LAYOUT)
    np.testing.assert_array_equal(second.aug, first.aug)
    want = brute_force_nearest(var, ref, k=2)
    np.testing.assert_array_equal(second.nearest(var, k=2).sq, want.sq)


def test_changed_features_or_settings_never_reuse_an_index(tmp_path: Path) -> None:
    ref, var = _problem()
    cached_index(tmp_path, "pixels", ref, LAYOUT)
    other = ref.copy()
    other[7, 11] += 0.5  # one pixel of one slice changed
    index = cached_index(tmp_path, "pixels", other, LAYOUT)
    np.testing.assert_array_equal(index.features, other)
    np.testing.assert_array_equal(
        index.nearest(var, k=1).sq, brute_force_nearest(var, other, k=1).sq
    )
    assert len(list(tmp_path.glob("index-pixels-*.npz"))) == 1  # the stale one was removed
    cached_index(tmp_path, "pixels", other, {**LAYOUT, "local_axes": True})
    assert len(list(tmp_path.glob("index-pixels-*.npz"))) == 1


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "sidecar"])
def test_a_damaged_cache_file_is_rebuilt_not_used(tmp_path: Path, damage: str) -> None:
    ref, var = _problem(1)
    good = cached_index(tmp_path, "pixels", ref, LAYOUT)
    (path,) = tmp_path.glob("*.npz")
    blob = bytearray(path.read_bytes())
    if damage == "flip a byte":
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif damage == "truncate":
        path.write_bytes(bytes(blob[: len(blob) // 3]))
    else:
        path.with_suffix(".sha256").write_text("0" * 64 + "\n")
    again = cached_index(tmp_path, "pixels", ref, LAYOUT)
    np.testing.assert_array_equal(again.aug, good.aug)
    # Rewritten whole: the file matches its sidecar again.
    assert sha256_hex(path.read_bytes()) == path.with_suffix(".sha256").read_text().strip()
    np.testing.assert_array_equal(
        again.nearest(var, k=2).sq, brute_force_nearest(var, ref, k=2).sq
    )
