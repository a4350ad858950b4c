"""End to end: identifiers planted in real DICOM headers never reach an exported bundle.

Real DICOM with planted identifiers -> ingest -> guard calibration -> generate (a stand-in
sampler instead of a trained generator) -> export. Every byte of the bundle (arrays, metadata,
DICOM, review report, manifest) is searched for every planted identifier, source UID and source
path, in UTF-8 and UTF-16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import yaml

from node.config import NodePaths, load_node_config
from node.guard.run import generate
from node.ingest.testing import planted_identifiers
from tests.test_ingest_pipeline import _ingest, _site, _sop_uid


def _smooth_sampler(n: int, seed: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noise = rng.uniform(0.0, 1.0, size=(n, 64, 64))
    return np.clip(gaussian_filter(noise, sigma=(0, 3, 3)) * 2.0 - 0.5, 0, 1).astype(np.float32)


def test_planted_identifiers_never_reach_a_bundle(node_home: Path, tmp_path: Path) -> None:
    patients, slices = 8, 3
    _site(tmp_path / "src", patients=patients, slices=slices)
    assert _ingest(node_home, [tmp_path / "src"]).slices == patients * slices
    paths = NodePaths(node_home)
    doc = yaml.safe_load(paths.config.read_text())
    doc["guard"].update({"encoder_steps": 15, "encoder_batch_size": 16,
                         "canaries_per_alteration": 2, "neighbour_pairs": 5,
                         "pca_components": 16, "rotations_deg": [0.0]})
    paths.config.write_text(yaml.safe_dump(doc))

    bundle = generate(paths, load_node_config(paths), 3, seed=5, sampler=_smooth_sampler,
                      progress=False)

    secrets: set[str] = {str(tmp_path / "src"), "patient0"}
    for p in range(patients):
        secrets |= set(planted_identifiers(f"A{p}").values())
        secrets |= {_sop_uid("A", p, s) for s in range(slices)}
    files = {f: f.read_bytes() for f in bundle.rglob("*") if f.is_file()}
    assert {f.name for f in files} >= {"images.npy", "images.jsonl", "manifest.dsse.json",
                                       "review.html"}
    for path, data in files.items():
        for secret in secrets:
            for form in {secret, secret.replace("^", " ")}:
                assert form.encode() not in data, f"{form!r} leaked into {path.name}"
                assert form.encode("utf-16-le") not in data, f"{form!r} leaked into {path.name}"
    # The guard's kept state (tile statistics, embeddings of real slices) stays in guard/:
    # no bundle file is one of those files, or holds one whole.
    kept = [f for pattern in ("tiles-*.npz", "features-*.npy", "index-*.npz")
            for f in paths.guard.glob(pattern)]
    assert any(f.name.startswith("tiles-") for f in kept)
    assert any(f.name.startswith("features-embedding") for f in kept)
    for f in kept:
        blob = f.read_bytes()
        for path, data in files.items():
            assert path.name != f.name and blob not in data, f"{f.name} leaked into {path.name}"
    dicom_files = sorted((bundle / "dicom").glob("*.dcm"))
    assert len(dicom_files) == 3
    for path in dicom_files:
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == "SYNTHETIC^site-a"
        assert ds.PatientIdentityRemoved == "YES"
