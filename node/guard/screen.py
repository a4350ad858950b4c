"""``screen``: the site's guard applied to images from any generator.

Candidates come as a ``.npz`` (array ``images``, N x H x W) or ``.npy`` in physical units (HU
for CT) unless ``normalized``, a folder of PNG / JPEG files, or a folder of DICOM files. Every
candidate is put on the store's grid exactly as ingest does (``node.ingest.normalise``: the
site's CT window or per-slice percentiles, area downsampling / bilinear upsampling, aspect
kept, background padding). Canaries are mixed in and screened with them, then removed.

Outputs in ``out``: ``accepted.npz`` (``images``: the accepted candidates as the guard saw
them, normalised on the store grid; ``indices``: their input indices), ``report.json``
(``candidates``, ``accepted``, ``rejected`` [{index, metric, distance, threshold}], canaries,
thresholds, privacy report), ``distances.png`` and ``report.html``; a ``screen`` audit record.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from node.config import NodeConfig, NodePaths
from node.guard.calibration import prepare_guard
from node.guard.run import _sole_modality, _write_run, build_report, screen_with_canaries
from privacy.errors import GuardError
from protocols.audit import append_audit
from protocols.files import atomic_write_bytes

__all__ = ["load_candidates", "screen_candidates"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_NPZ_MAGIC = b"PK"  # a zip archive
_NPY_MAGIC = b"\x93NUMPY"


def _normalise(
    values: np.ndarray,
    config: NodeConfig,
    modality: str,
    size: int,
    normalized: bool,
    fixed_window: bool,
    spacing: tuple[float, float] | None = None,
) -> np.ndarray:
    from node.ingest.normalise import intensity_window, normalise_slice

    if normalized:
        window: tuple[float, float] | None = (0.0, 1.0)
    else:
        window = intensity_window(
            values,
            modality,
            ct_window_hu=config.store.ct_window_hu,
            percentiles=config.store.mr_percentiles,
            fixed_window=fixed_window,
        )
    if window is None:  # a constant slice: all background
        return np.zeros((size, size), dtype=np.float32)
    pixels: np.ndarray = normalise_slice(
        np.asarray(values, dtype=np.float32), window, size, spacing
    ).pixels
    return pixels


def load_candidates(
    source: Path, config: NodeConfig, modality: str, size: int, normalized: bool
) -> np.ndarray:
    """Candidates on the store grid, float32 [N, size, size] in [0, 1]."""
    if not source.exists():
        raise GuardError("candidates not found", str(source), 2)
    ct_hu = modality == "CT"
    if source.is_file() and source.suffix.lower() in (".npz", ".npy"):
        try:
            with source.open("rb") as fh:
                head = fh.read(6)
            if not head.startswith((_NPZ_MAGIC, _NPY_MAGIC)):
                raise GuardError("cannot read candidates: not a NumPy .npz or .npy file (it "
                                 "does not start with either format's signature)", str(source), 2)
            loaded = np.load(source, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    if "images" not in loaded.files:
                        raise GuardError("the .npz has no array named 'images'", str(source), 2)
                    # members are read lazily: a pickled (object) member fails here
                    arr = np.asarray(loaded["images"])
            else:
                arr = np.asarray(loaded)
        except GuardError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise GuardError(f"cannot read candidates: {exc}", str(source), 2) from None
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] == 0 or not np.issubdtype(arr.dtype, np.number):
            raise GuardError(f"expected numeric images [N, H, W], found {arr.shape}",
                             str(source), 2)
        if not np.all(np.isfinite(arr)):
            raise GuardError("candidates hold NaN or infinite values", str(source), 2)
        return np.stack(
            [_normalise(a, config, modality, size, normalized, ct_hu) for a in arr]
        ).astype(np.float32)
    if not source.is_dir():
        raise GuardError("candidates must be a .npz, a .npy or a folder", str(source), 2)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in _IMAGE_SUFFIXES]
    out: list[np.ndarray] = []
    if images:
        from node.ingest.dicom import Skipped
        from node.ingest.images import read_image

        for path in images:
            try:
                values = read_image(path.read_bytes())
            except Skipped as exc:
                raise GuardError(f"unreadable image: {exc.reason}", str(path), 2) from None
            # Picture files carry display values, never HU: per-slice percentiles as ingest.
            out.append(_normalise(values, config, modality, size, normalized, False))
    else:
        from node.ingest.dicom import Skipped, open_dicom
        from protocols.files import sha256_hex

        for path in files:
            data = path.read_bytes()
            try:
                obj = open_dicom(data, sha256_hex(data))
                for i, frame in enumerate(obj.frames):
                    out.append(
                        _normalise(obj.values(i), config, modality, size, normalized,
                                   obj.fixed_window, frame.spacing_mm)
                    )
            except Skipped as exc:
                raise GuardError(f"unreadable DICOM: {exc.reason}", str(path), 2) from None
    if not out:
        raise GuardError("no candidate images in the folder", str(source), 2)
    return np.stack(out).astype(np.float32)


def screen_candidates(
    paths: NodePaths,
    config: NodeConfig,
    candidates: Path,
    out: Path,
    *,
    normalized: bool = False,
    modality: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Screen a candidate set; write accepted.npz, report.json, distances.png, report.html."""
    state = prepare_guard(paths, config, progress=progress)
    modality = modality or _sole_modality(state)
    thresholds = state.thresholds(modality)
    size = int(state.reference.images.shape[1])
    images = load_candidates(Path(candidates), config, modality, size, normalized)
    screening, canaries = screen_with_canaries(state, modality, images, seed)
    accepted = np.flatnonzero(screening.accepted)
    report, local = build_report(
        state, modality, [screening],
        {m: d[accepted] for m, d in screening.distances.items()},
        {m: d[accepted] for m, d in screening.second.items()},
        {m: r[accepted] for m, r in screening.nearest_row.items()},
        canaries, images.shape[0],
    )
    doc = {
        "candidates": int(images.shape[0]),
        "accepted": accepted.tolist(),
        "rejected": screening.rejected(thresholds),
        "modality": modality,
        "source": str(candidates),
        "normalized_input": normalized,
        **report,
        **local,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_run(out, f"screen {candidates}", doc, screening.distances, state, modality, canaries)
    append_audit(
        paths.audit,
        "screen",
        {
            "candidates": int(images.shape[0]),
            "accepted": int(accepted.size),
            "modality": modality,
            "canaries_failed": canaries.failed,
            "thresholds": thresholds,
        },
    )
    if canaries.failed:
        raise GuardError(
            f"canary self-test failed: a {', '.join(canaries.failed)} copy of a real slice "
            "passed the guard; no accepted set is written",
            str(out / "report.json"),
            1,
        )
    buffer = io.BytesIO()
    np.savez(buffer, images=images[accepted], indices=accepted.astype(np.int64))
    atomic_write_bytes(out / "accepted.npz", buffer.getvalue())
    return doc
