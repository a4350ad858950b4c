"""Contract E: the site evaluates a shared restoration model on its own real holdout slices.

The node degrades its holdout slices exactly as the coordinator's training did (the model file's
degradation config and the given seed), restores them with the shared network, and returns
per-image PSNR / SSIM / RMSE in physical units (HU window stated for CT) and their means.

What this module must never do: return or write an image, a slice identifier or anything per
patient. The reply is flat: scalars, short strings (site, task, units, digests), the degradation
config and 1-D lists of per-image metric values (``psnr_db``, ``ssim``, ``rmse``, and ``input_*``
for the degraded input itself) with their means (``mean_*``, ``input_mean_*``); lists are in the
store's stable slice order, so two models pair image by image;
:func:`check_reply_is_numbers_only` enforces that before the reply is handed to any transport.
Holdout slices are read here and nowhere in generator training (invariant 3); they never leave.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from node.config import NodeConfig, NodePaths
from node.errors import StoreError
from protocols.errors import UsageError

__all__ = ["evaluate_model", "check_reply_is_numbers_only", "flatten_reply", "holdout_physical"]

METRICS = ("psnr_db", "ssim", "rmse")


def holdout_physical(paths: NodePaths, modality: str) -> tuple[np.ndarray, str]:
    """The site's holdout slices of ``modality`` in physical units, and the split digest."""
    from node.store import Store

    with Store(paths.store) as store:
        records = store.records(split="holdout", modality=modality)
        if not records:
            raise StoreError(
                f"no holdout slices of modality {modality} at this site", str(paths.store)
            )
        normalised = store.load(records)
        digest = store.split_digest("holdout")
    scale = np.array([r.scale for r in records], dtype=np.float32)[:, None, None]
    offset = np.array([r.offset for r in records], dtype=np.float32)[:, None, None]
    return (normalised * scale + offset).astype(np.float32), digest


def evaluate_model(
    paths: NodePaths,
    config: NodeConfig,
    model_blob: bytes,
    task: Literal["denoise", "sr"],
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate the model file ``model_blob`` on this site's holdout; numbers only."""
    from coordinator.restore.evaluate import evaluate_images, scoring_description
    from coordinator.restore.train import load_model

    net, info = load_model(model_blob)
    if info["task"] != task:
        raise UsageError(f"the model was trained for task {info['task']}, not {task}")
    modality = str(info["modality"])
    clean, holdout_digest = holdout_physical(paths, modality)
    per_image = evaluate_images(net, info, clean, seed)
    reply: dict[str, Any] = {
        "site": config.site,
        "task": task,
        "modality": modality,
        "n_images": int(clean.shape[0]),
        "seed": int(seed),
        "model_digest": str(info["digest"]),
        "holdout_digest": holdout_digest,
        "degradation": _plain(info["degradation"]),
        **scoring_description(info),
    }
    # Flat on purpose: every number is a top-level scalar or 1-D list, as a Flower MetricRecord
    # holds them (psnr_db / ssim / rmse per image; input_* for the degraded input, arm 0).
    for m in METRICS:
        reply[m] = [float(v) for v in per_image["model"][m]]
        reply[f"input_{m}"] = [float(v) for v in per_image["input"][m]]
        reply[f"mean_{m}"] = float(np.mean(per_image["model"][m]))
        reply[f"input_mean_{m}"] = float(np.mean(per_image["input"][m]))
    check_reply_is_numbers_only(reply)
    return reply


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_SCALARS = (bool, int, float, str, type(None))
_MAX_STRING = 200


def check_reply_is_numbers_only(reply: dict[str, Any]) -> None:
    """Refuse a reply that could carry an image: only scalars, short strings and flat
    numeric lists no longer than the number of evaluated images."""
    limit = int(reply.get("n_images", 0))

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, list):
            if len(value) > max(limit, 2):
                raise UsageError(f"reply field {key} is longer than the number of images")
            for v in value:
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise UsageError(f"reply field {key} holds a non-number")
        elif isinstance(value, str):
            if len(value) > _MAX_STRING:
                raise UsageError(f"reply field {key} is a long string")
        elif not isinstance(value, _SCALARS):
            raise UsageError(f"reply field {key} has type {type(value).__name__}")

    walk(reply, "reply")


def flatten_reply(reply: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a reply into Flower-ready (metrics, config) dicts: numbers and number lists for a
    ``MetricRecord``, strings / None / nested config as text for a ``ConfigRecord``.

    Keys are dotted paths (``metrics.psnr_db``, ``means.ssim``). Non-finite values become
    ``nan`` floats (Flower carries floats).
    """
    check_reply_is_numbers_only(reply)
    metrics: dict[str, Any] = {}
    config: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, bool):
            config[key] = value
        elif isinstance(value, (int, float)):
            metrics[key] = value
        elif isinstance(value, list):
            metrics[key] = [float(v) if not isinstance(v, int) else float(v) for v in value]
        elif value is None:
            config[key] = ""
        else:
            config[key] = str(value)

    walk(reply, "")
    for key, value in list(metrics.items()):
        if isinstance(value, float) and not math.isfinite(value):
            metrics[key] = float("nan")
    return metrics, config
