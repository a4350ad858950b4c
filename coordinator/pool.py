"""Pooling (contract D): the images of every verified bundle of a round in one dataset.

``<home>/pools/<round-id>/`` holds ``images.npy`` (float32 [N, S, S] in physical units, read with
``np.load(mmap_mode='r')``), ``index.jsonl`` (one line per image: site, bundle_digest, modality,
unit, index_in_bundle) and ``pool.json`` (round, bundles, counts). Every bundle is verified
again, from the coordinator's own copy, immediately before its images are read (invariant 6);
only bundles the round records as verified are read, so a rejected bundle never reaches a pool.
The pool is built in a hidden folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import CoordinatorPaths
from coordinator.rounds import load_round, update_round
from protocols.audit import append_audit
from protocols.errors import OperationError, UsageError
from protocols.files import atomic_write_json, atomic_write_text, fsync_dir, sha256_file

__all__ = ["build_pool", "load_pool", "write_pool", "PoolSource"]

PoolSource = dict[str, Any]


def write_pool(
    dest: Path,
    round_id: str,
    sources: list[tuple[PoolSource, np.ndarray]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a pool folder from (bundle description, images [n, S, S]) pairs.

    A description holds ``site``, ``bundle_digest``, ``modality`` and ``unit``. Written into a
    hidden sibling folder first, then renamed over ``dest``.
    """
    sizes = {tuple(images.shape[1:]) for _, images in sources}
    if len(sizes) > 1:
        raise OperationError(f"bundles hold images of different sizes {sorted(sizes)}", round_id)
    for desc, images in sources:
        if images.ndim != 3:
            raise OperationError("bundle images are not [N, H, W]", desc["bundle_digest"])
        if not np.all(np.isfinite(images)):
            raise OperationError("bundle images hold non-finite values", desc["bundle_digest"])
    shape_hw = next(iter(sizes)) if sizes else (0, 0)
    total = sum(int(images.shape[0]) for _, images in sources)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        array = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.float32, shape=(total, *shape_hw)
        )
        lines = []
        bundles = []
        counts: dict[str, int] = {}
        offset = 0
        for desc, images in sources:
            n = int(images.shape[0])
            array[offset : offset + n] = images.astype(np.float32, copy=False)
            for i in range(n):
                lines.append(json.dumps({
                    "site": desc["site"], "bundle_digest": desc["bundle_digest"],
                    "modality": desc["modality"], "unit": desc["unit"], "index_in_bundle": i,
                }, sort_keys=True))
            bundles.append({**desc, "n_images": n, "offset": offset})
            counts[desc["site"]] = counts.get(desc["site"], 0) + n
            offset += n
        array.flush()
        del array
        with open(tmp / "images.npy", "rb+") as handle:
            os.fsync(handle.fileno())
        atomic_write_text(tmp / "index.jsonl", "".join(line + "\n" for line in lines))
        manifest = {
            "round": round_id,
            "bundles": bundles,
            "counts": {"total": total, "by_site": counts},
            "image_shape": list(shape_hw),
            "dtype": "float32",
            "created": time.time(),
            "images_sha256": sha256_file(tmp / "images.npy"),
            **(extra or {}),
        }
        atomic_write_json(tmp / "pool.json", manifest)
        fsync_dir(tmp)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.old"
            os.replace(dest, old)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def build_pool(paths: CoordinatorPaths, round_id: str) -> Path:
    """Re-verify every verified bundle of the round and write its pool."""
    from coordinator.home import load_coordinator_policy, load_trust
    from protocols.bundle import load_bundle_images, verify_bundle

    handle = load_round(paths, round_id)
    state = handle.state()
    trust = load_trust(paths)
    policy = load_coordinator_policy(paths)
    started = time.perf_counter()
    sources: list[tuple[PoolSource, np.ndarray]] = []
    for site in sorted(state["sites"]):
        entry = state["sites"][site]
        if entry["state"] != "verified":
            continue
        bundle = paths.bundles / entry["bundle_digest"]
        verified = verify_bundle(bundle, trust, policy,
                                 expected_round=(state["round_id"], state["nonce"]))
        if verified.digest != entry["bundle_digest"] or verified.site != site:
            raise OperationError("stored bundle does not match the round's record", str(bundle))
        images = np.asarray(load_bundle_images(verified), dtype=np.float32)
        if images.shape[1:] != (state["image_size"], state["image_size"]):
            raise OperationError(
                f"bundle images are {images.shape[1:]}, the round asked for "
                f"{state['image_size']}", str(bundle))
        sources.append(({"site": site, "bundle_digest": verified.digest,
                         "modality": verified.modality, "unit": verified.unit}, images))
    if not sources:
        raise UsageError(f"round {round_id} has no verified bundle to pool", round_id)
    dest = write_pool(paths.pools / round_id, round_id, sources,
                      extra={"modality": state["modality"], "image_size": state["image_size"]})
    pool_s = time.perf_counter() - started
    update_round(handle, timings_s={"pool": round(pool_s, 4)}, pool=str(dest))
    append_audit(paths.audit, "pool_built", {
        "round": round_id, "bundles": [d["bundle_digest"] for d, _ in sources],
        "images": sum(int(i.shape[0]) for _, i in sources),
        "images_sha256": json.loads((dest / "pool.json").read_text())["images_sha256"],
    })
    return dest


def load_pool(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[dict[str, Any]],
                                                      dict[str, Any]]:
    """(images memory-mapped read-only, index lines, pool manifest)."""
    root = Path(path)
    try:
        manifest = json.loads((root / "pool.json").read_text(encoding="utf-8"))
        index = [json.loads(line) for line in
                 (root / "index.jsonl").read_text(encoding="utf-8").splitlines() if line]
    except FileNotFoundError as exc:
        raise UsageError("not a pool folder", str(exc.filename)) from None
    images = np.load(root / "images.npy", mmap_mode="r")
    if images.shape[0] != len(index) or images.shape[0] != manifest["counts"]["total"]:
        raise OperationError("pool is inconsistent: images, index and manifest disagree",
                             str(root))
    return images, index, manifest
