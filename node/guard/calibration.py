"""Calibrating the guard at a site and keeping the result in ``<home>/guard/``.

``guard/calibration.json`` holds, per modality, the calibration method, the thresholds and the
figures (quantiles of new-patient and neighbouring-slice distances), plus the digest of its
inputs (which slices, which settings, which floors); ``guard/calibration.npz`` the raw
new-patient distances (numbers only, for the DCR score of later runs); ``guard/encoder.npz``
and ``guard/encoder.json`` the embedding metric's weights with their config, training summary
and the digest of the train slices they saw. A later run reuses all of it when the digest still
matches, and recalibrates otherwise. Kept search state (``index-*.npz``, ``tiles-*.npz``,
``features-*.npy``, each with a ``.sha256`` sidecar) spares later runs rebuilding the
indexes and re-embedding the reference; it is derived from real slices, so it stays in
``guard/`` like them, and anything that does not match is rebuilt. Every file is written
atomically through ``protocols.files``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from node.config import NodeConfig, NodePaths
from node.guard.reference import GuardReference, load_reference
from node.guard.settings import GuardSettings
from privacy.calibrate import calibrate_thresholds, make_folds
from privacy.encoder import EMBED_INFERENCE, EncoderConfig, make_embedder, train_encoder
from privacy.errors import GuardError
from privacy.guard import Guard
from privacy.metrics import ContrastRMSE, EmbeddingDistance, Metric, PixelRMSE, ShiftFlipDistance
from privacy.search import SEARCH_VERSION, ExactIndex
from privacy.tiles import TILES_VERSION, TileIndex
from protocols.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    canonical_json,
    sha256_hex,
)
from protocols.typed import to_dict

__all__ = [
    "GuardState",
    "prepare_guard",
    "build_metrics",
    "cached_index",
    "cached_features",
    "cached_tile_index",
    "cached_dense_index",
    "CALIBRATION_VERSION",
    "inputs_digest",
    "kept_encoder",
]

#: Of the thresholds (2: holdout patients calibrated against every other patient's slices,
#: privacy.calibrate; 3: embeddings computed in fixed batches, privacy.encoder.EMBED_BATCH); a
#: calibration of another version is redone.
CALIBRATION_VERSION = 3
#: Of the guard encoder and the features kept from it (unchanged by calibration versions).
ENCODER_VERSION = 1


class _HasState(Protocol):
    def state(self) -> dict[str, np.ndarray]: ...


_Kept = TypeVar("_Kept", bound=_HasState)


@dataclass
class GuardState:
    reference: GuardReference
    settings: GuardSettings
    calibration: dict[str, Any]
    new_patient: dict[str, dict[str, np.ndarray]]  # modality -> metric -> distances
    metrics: list[Metric]
    cache_dir: Path | None = None  # where built search indexes are kept (guard/)
    _guards: dict[str, Guard] = field(default_factory=dict)

    def thresholds(self, modality: str) -> dict[str, float]:
        if modality not in self.calibration["modalities"]:
            raise GuardError(
                f"no calibration for modality {modality}; the store holds "
                f"{', '.join(sorted(self.calibration['modalities']))}",
                "modality",
                2,
            )
        return dict(self.calibration["modalities"][modality]["thresholds"])

    def guard(self, modality: str) -> Guard:
        """The guard of ``modality``: its thresholds over *every* real slice of the site."""
        if modality not in self._guards:
            self._guards[modality] = Guard(
                self.metrics,
                self.reference.images,
                self.thresholds(modality),
                n_components=self.settings.pca_components,
                **self._kept_factories(),
            )
        return self._guards[modality]

    def _kept_factories(self) -> dict[str, Any]:
        """The Guard's factories that keep indexes and costly features in ``guard/``."""
        if self.cache_dir is None:
            return {}
        return {
            "index_factory": partial(cached_index, self.cache_dir),
            "features_factory": partial(cached_features, self.cache_dir, self.reference.digest),
            "tile_factory": partial(cached_tile_index, self.cache_dir, self.reference.digest),
            "dense_factory": partial(cached_dense_index, self.cache_dir, self.reference.digest),
        }

    def manifest_section(self, modality: str) -> dict[str, Any]:
        """What the manifest may say about the calibration (numbers only)."""
        cal = self.calibration["modalities"][modality]
        return {
            "method": cal["method"],
            "n_queries": cal["n_queries"],
            "quantile": self.settings.threshold_quantile,
            "metrics": cal["metrics"],
            "inputs_digest": self.calibration["inputs_digest"],
        }


def build_metrics(
    settings: GuardSettings, embed: Callable[[np.ndarray], np.ndarray] | None, info: dict[str, Any]
) -> list[Metric]:
    out: list[Metric] = []
    for name in settings.metrics:
        if name == "pixel_rmse":
            out.append(PixelRMSE())
        elif name == "contrast_rmse":
            out.append(ContrastRMSE())
        elif name == "shift_flip":
            out.append(
                ShiftFlipDistance(settings.max_shift_px, rotations_deg=settings.rotations_deg)
            )
        elif name == "embedding":
            if embed is None:
                raise GuardError("embedding metric without an encoder", "guard", 1)
            out.append(EmbeddingDistance(embed, info))
    return out


def inputs_digest(reference: str, image_size: int, config: NodeConfig) -> str:
    """What a calibration depends on: the reference (its digest, :func:`reference_digest`,
    and grid), the guard settings, the policy floors."""
    return sha256_hex(
        canonical_json(
            {
                "version": CALIBRATION_VERSION,
                "reference": reference,
                "guard": to_dict(config.guard),
                "floors": dict(config.policy.guard_floor),
                "image_size": int(image_size),
            }
        )
    )


def _encoder_digest(reference: GuardReference, settings: GuardSettings) -> str:
    return sha256_hex(
        canonical_json(
            {
                "version": ENCODER_VERSION,
                "reference": reference.digest,
                "image_size": int(reference.images.shape[1]),
                "steps": settings.encoder_steps,
                "embed_dim": settings.encoder_embed_dim,
                "batch_size": settings.encoder_batch_size,
                "seed": settings.encoder_seed,
            }
        )
    )


def encoder_config(settings: GuardSettings, image_size: int) -> EncoderConfig:
    """The guard encoder's training configuration from the node's guard settings."""
    return EncoderConfig(
        image_size=image_size,
        embed_dim=settings.encoder_embed_dim,
        steps=settings.encoder_steps,
        batch_size=settings.encoder_batch_size,
        seed=settings.encoder_seed,
    )


def _encoder(
    paths: NodePaths,
    config: NodeConfig,
    reference: GuardReference,
    progress: bool,
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    settings = config.guard
    digest = _encoder_digest(reference, settings)
    weights_path = paths.guard / "encoder.npz"
    meta_path = paths.guard / "encoder.json"
    kept = kept_encoder(paths)
    if kept is not None and kept[1].get("inputs_digest") == digest:
        return kept
    enc_cfg = encoder_config(settings, int(reference.images.shape[1]))
    train_rows = reference.rows(split="train")
    if train_rows.size < 2:
        train_rows = np.arange(len(reference.records))
    with _progress(progress, "training guard encoder", enc_cfg.steps) as tick:
        state, info = train_encoder(reference.images[train_rows], enc_cfg, progress=tick)
    blob = _npz_bytes(state)
    atomic_write_bytes(weights_path, blob)
    meta = {
        "config": enc_cfg.to_dict(),
        "training": info,
        "inputs_digest": digest,
        "weights_sha256": sha256_hex(blob),
    }
    atomic_write_json(meta_path, meta)
    return make_embedder(state, enc_cfg), meta


def kept_encoder(
    paths: NodePaths,
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]] | None:
    """The guard's contrastive encoder as the last calibration kept it, or None.

    Read only (nothing is trained here): the generator's quality report uses it as a feature
    space that does not change with the generator, so precision and recall of two generators
    of one home compare directly when ``weights_sha256`` is the same. Weights whose sha256
    does not match ``encoder.json`` are not used (the guard then trains a new one).
    """
    weights_path = paths.guard / "encoder.npz"
    meta_path = paths.guard / "encoder.json"
    if not (weights_path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    blob = weights_path.read_bytes()
    if not isinstance(meta, dict) or "config" not in meta \
            or sha256_hex(blob) != meta.get("weights_sha256"):
        return None
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        state = {k: data[k] for k in data.files}
    return make_embedder(state, EncoderConfig.from_dict(meta["config"])), meta


def _kept_blob(path: Path) -> bytes | None:
    """The bytes of a kept file whose ``.sha256`` sidecar matches them, else None."""
    sidecar = path.with_suffix(".sha256")
    if not (path.exists() and sidecar.exists()):
        return None
    blob = path.read_bytes()
    if sha256_hex(blob) != sidecar.read_text(encoding="utf-8").strip():
        return None
    return blob


def _keep(folder: Path, prefix: str, path: Path, blob: bytes) -> None:
    """Write ``blob`` and its sidecar atomically; remove older files of ``prefix``."""
    sidecar = path.with_suffix(".sha256")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{prefix}-*"):
        if old.name not in (path.name, sidecar.name):
            old.unlink(missing_ok=True)
    atomic_write_bytes(path, blob)
    atomic_write_text(sidecar, sha256_hex(blob) + "\n")


def _label(space: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", space)


def cached_index(
    folder: Path, space: str, features: np.ndarray, layout: dict[str, Any]
) -> ExactIndex:
    """The exact index of ``features``, from ``folder`` when a matching one was kept there.

    The file name carries the sha256 of the features themselves (bytes, dtype, shape) and of
    the index parameters, so an index is only ever reused for identical features; its own
    sha256 is checked before use and ``ExactIndex.from_state`` re-checks shapes and the
    orthonormal axes. Anything that does not match is rebuilt and rewritten (atomically);
    older indexes of the same space are removed.
    """
    feats = np.ascontiguousarray(features)
    h = hashlib.sha256()
    h.update(canonical_json({"version": SEARCH_VERSION, "layout": layout, "seed": 0,
                             "dtype": str(feats.dtype), "shape": list(feats.shape)}))
    h.update(feats.tobytes())
    return _kept_npz(
        folder, f"index-{_label(space)}", h.hexdigest(),
        lambda state: ExactIndex.from_state(feats, state),
        lambda: ExactIndex(feats, seed=0, **layout),
    )


def cached_tile_index(
    folder: Path, reference_digest: str, metric: Metric, features: np.ndarray,
    shape: tuple[int, int],
) -> TileIndex:
    """The tile index of a window metric's reference features, kept in ``folder``.

    Keyed like :func:`cached_features` (reference digest, metric description, shapes);
    ``TileIndex.from_state`` re-checks shapes and finite values and recomputes a sample of
    references' columns before the kept state is used; anything else is rebuilt.
    """
    key = sha256_hex(
        canonical_json({"version": TILES_VERSION, "reference": reference_digest,
                        "metric": metric.describe(), "features": list(features.shape),
                        "window": list(shape)})
    )
    return _kept_npz(
        folder, f"tiles-{_label(metric.feature_space)}", key,
        lambda state: TileIndex.from_state(features, state),
        lambda: TileIndex(features, shape),
    )


def cached_dense_index(
    folder: Path, reference_digest: str, metric: Metric, features: np.ndarray
) -> ExactIndex:
    """The dense index of a one-variant metric's reference features, its rows' squared norms
    kept in ``folder`` (a pass over the whole reference each run otherwise: 50 ms for the
    contrast features of 3,064 slices). Keyed like :func:`cached_tile_index`;
    ``ExactIndex.from_state`` re-checks shape and finite values and recomputes the norms of
    16 rows before the kept ones are used; anything else is rebuilt."""
    key = sha256_hex(
        canonical_json({"version": SEARCH_VERSION, "reference": reference_digest,
                        "metric": metric.describe(), "space": metric.feature_space,
                        "features": list(features.shape), "dtype": str(features.dtype)})
    )
    return _kept_npz(
        folder, f"dense-{_label(metric.feature_space)}", key,
        lambda state: ExactIndex.from_state(features, state),
        lambda: ExactIndex.dense(features),
    )


def _kept_npz(
    folder: Path, prefix: str, key: str,
    load: Callable[[dict[str, np.ndarray]], _Kept], build: Callable[[], _Kept],
) -> _Kept:
    """An index loaded from ``<folder>/<prefix>-<key>.npz`` when that file and its sidecar
    match and ``load`` accepts its state; else built, and its ``state()`` kept there."""
    path = folder / f"{prefix}-{key[:32]}.npz"
    blob = _kept_blob(path)
    if blob is not None:
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as data:
                return load({k: data[k] for k in data.files})
        except (GuardError, KeyError, ValueError, OSError, zipfile.BadZipFile):
            pass  # rebuilt below
    index = build()
    _keep(folder, prefix, path, _npz_bytes(index.state()))
    return index


def cached_features(
    folder: Path, reference_digest: str, metric: Metric, images: np.ndarray
) -> np.ndarray:
    """``metric.reference_features(images)``, kept in ``folder`` for costly metrics.

    The embedding's features are a network's output over every real slice: a third of a second
    per run at 3,000 slices. They are keyed by the reference digest (which slices, which
    pixels), the metric's description (for the embedding: the encoder's weights sha256) and the
    image shape; the kept file's own sha256 is checked, and its shape and finiteness, before use.
    Other metrics' features are computed each time (slicing or scaling costs less than reading).
    """
    if not metric.costly_features:
        return metric.reference_features(images)
    key = sha256_hex(
        canonical_json({"version": ENCODER_VERSION, "reference": reference_digest,
                        "metric": metric.describe(), "space": metric.feature_space,
                        "shape": list(images.shape)})
    )
    prefix = f"features-{_label(metric.feature_space)}"
    path = folder / f"{prefix}-{key[:32]}.npy"
    blob = _kept_blob(path)
    if blob is not None:
        try:
            feats: np.ndarray = np.load(io.BytesIO(blob), allow_pickle=False)
            if feats.ndim == 2 and feats.shape[0] == images.shape[0] and np.isfinite(feats).all():
                return feats
        except (ValueError, OSError):
            pass  # recomputed below
    feats = np.asarray(metric.reference_features(images))
    buffer = io.BytesIO()
    np.save(buffer, feats, allow_pickle=False)
    _keep(folder, prefix, path, buffer.getvalue())
    return feats


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


class _progress:
    """A rich progress bar on stderr (or nothing); yields a ``tick(done, total)`` callback."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled, label, total
        self._bar: Any = None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import Progress

        self._bar = Progress(console=Console(stderr=True), transient=True)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)

        def tick(done: int, total: int) -> None:
            self._bar.update(task, completed=done, total=total)

        return tick

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _neighbour_pairs(
    reference: GuardReference, rows: np.ndarray, limit: int, seed: int
) -> np.ndarray:
    by_series: dict[str, list[int]] = {}
    for local, row in enumerate(rows.tolist()):
        by_series.setdefault(reference.records[row].series, []).append(local)
    pairs: list[tuple[int, int]] = []
    for members in by_series.values():
        ordered = sorted(members, key=lambda i: (reference.records[rows[i]].position, i))
        pairs.extend(zip(ordered[:-1], ordered[1:], strict=True))
    if not pairs or limit <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    arr = np.asarray(pairs, dtype=np.int64)
    if len(arr) > limit:
        pick = np.sort(np.random.default_rng(seed).choice(len(arr), size=limit, replace=False))
        arr = arr[pick]
    return arr


def prepare_guard(
    paths: NodePaths, config: NodeConfig, progress: bool = False, recalibrate: bool = False
) -> GuardState:
    """Load the reference and a calibration matching it (calibrating when needed)."""
    settings = config.guard
    if "embedding" in settings.metrics:
        # The encoder needs torch; loaded before the reference, it also widens the store's
        # float16 pixels about 7x faster than numpy (node.store._widen_half).
        import torch  # noqa: F401
    reference = load_reference(paths)
    digest = inputs_digest(reference.digest, int(reference.images.shape[1]), config)
    embed: Callable[[np.ndarray], np.ndarray] | None = None
    enc_meta: dict[str, Any] = {}
    if "embedding" in settings.metrics:
        embed, enc_meta = _encoder(paths, config, reference, progress)
    enc_info = {
        "encoder_sha256": enc_meta.get("weights_sha256"),
        "encoder_config": enc_meta.get("config"),
        "inference": EMBED_INFERENCE,
    }
    metrics = build_metrics(settings, embed, enc_info if embed else {})
    cal_path = paths.guard / "calibration.json"
    npz_path = paths.guard / "calibration.npz"
    if not recalibrate and cal_path.exists() and npz_path.exists():
        doc = json.loads(cal_path.read_text(encoding="utf-8"))
        if doc.get("inputs_digest") == digest:
            with np.load(npz_path, allow_pickle=False) as data:
                new_patient: dict[str, dict[str, np.ndarray]] = {}
                for key in data.files:
                    modality, metric = key.split("/", 1)
                    new_patient.setdefault(modality, {})[metric] = data[key]
            return GuardState(reference, settings, doc, new_patient, metrics, paths.guard)
    modalities: dict[str, Any] = {}
    new_patient = {}
    for modality in reference.modalities:
        rows = reference.rows(modality=modality)
        recs = [reference.records[i] for i in rows.tolist()]
        method, folds = make_folds(
            [r.patient for r in recs],
            [r.split for r in recs],
            [r.series for r in recs],
            [r.position for r in recs],
            k=settings.calibration_folds,
            gap=settings.slab_gap,
        )
        pairs = _neighbour_pairs(reference, rows, settings.neighbour_pairs, settings.encoder_seed)
        cal = calibrate_thresholds(
            metrics,
            reference.images[rows],
            folds,
            method,
            settings.threshold_quantile,
            floors=dict(config.policy.guard_floor),
            neighbour_pairs=pairs,
            n_components=settings.pca_components,
        )
        modalities[modality] = cal.to_dict()
        new_patient[modality] = cal.distances
    doc = {
        "version": CALIBRATION_VERSION,
        "inputs_digest": digest,
        "reference_slices": len(reference.records),
        "image_size": int(reference.images.shape[1]),
        "settings": to_dict(settings),
        "floors": dict(config.policy.guard_floor),
        "encoder": enc_info,
        "modalities": modalities,
    }
    atomic_write_bytes(
        npz_path,
        _npz_bytes(
            {f"{mod}/{met}": d for mod, per in new_patient.items() for met, d in per.items()}
        ),
    )
    atomic_write_json(cal_path, doc)
    return GuardState(reference, settings, doc, new_patient, metrics, paths.guard)
