"""Site-side evaluation math, and the coordinator's aggregation of the sites' numbers.

A site holds clean physical-unit holdout slices; it degrades them exactly as training did
(:mod:`coordinator.restore.degrade`, the model file's degradation config, the given seed), runs
the shared network, maps the output back to physical units and scores it against the clean
slice. It also scores the degraded input itself (arm 0). What leaves the site is numbers only:
per-image metric vectors (in the store's stable slice order, so arms pair image by image) and
their means. Never an image.

Scoring (stated in every reply): CT in HU, both images clipped to the HU window of the model file
(default [-1024, 3071] HU), PSNR / SSIM data range = the window width; MR / PET in the slice's
physical unit, data range = the clean slice's own span (max - min).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from coordinator.restore.degrade import DegradationConfig, degrade_batch
from coordinator.restore.metrics import MetricWindow, image_metrics
from coordinator.restore.stats import describe
from coordinator.restore.train import Normalisation

__all__ = [
    "METRICS",
    "restore_normalised",
    "restore_physical",
    "evaluate_images",
    "aggregate_sites",
    "scoring_description",
]

METRICS = ("psnr_db", "ssim", "rmse")


@torch.no_grad()
def restore_normalised(net: nn.Module, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run ``net`` over [N, S, S] network-space inputs (CPU/GPU as the net lives)."""
    net.eval()
    device = next(net.parameters()).device
    out = np.empty_like(np.asarray(inputs, dtype=np.float32))
    for start in range(0, inputs.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size],
                                                  dtype=np.float32))[:, None].to(device)
        out[start:start + batch_size] = net(x)[:, 0].float().cpu().numpy()
    return out


def _window(info: dict[str, Any], norm: Normalisation, scale: np.ndarray) -> MetricWindow:
    if norm.kind == "ct-window":
        return MetricWindow.ct(norm.ct_window_hu)
    return MetricWindow(data_range=tuple(float(s) for s in scale))


def restore_physical(
    net: nn.Module, info: dict[str, Any], clean: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, MetricWindow]:
    """(degraded, restored) in physical units for clean [N, S, S], and the scoring window."""
    degradation = DegradationConfig.from_dict(dict(info["degradation"]))
    norm = Normalisation.from_dict(dict(info["normalisation"]))
    clean = np.asarray(clean, dtype=np.float32)
    degraded = degrade_batch(clean, degradation, seed)
    scale, offset = norm.mapping(clean)
    s, o = scale[:, None, None], offset[:, None, None]
    restored_norm = restore_normalised(net, ((degraded - o) / s).astype(np.float32))
    restored = (restored_norm * s + o).astype(np.float32)
    return degraded, restored, _window(info, norm, scale)


def scoring_description(info: dict[str, Any]) -> dict[str, Any]:
    norm = Normalisation.from_dict(dict(info["normalisation"]))
    if norm.kind == "ct-window":
        low, high = norm.ct_window_hu
        return {"unit": "HU", "window_hu": [low, high], "data_range": high - low,
                "data_range_rule": "HU window width; both images clipped to the window"}
    return {"unit": "physical (per slice)", "window_hu": None, "data_range": None,
            "data_range_rule": "each clean slice's own span (max - min)"}


def evaluate_images(
    net: nn.Module, info: dict[str, Any], clean: np.ndarray, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Per-image metrics of the restored images (``model``) and of the degraded input
    (``input``, arm 0), each {metric: float64 [N]}."""
    if clean.ndim != 3 or clean.shape[0] == 0:
        raise ValueError(f"no images to evaluate (shape {clean.shape})")
    degraded, restored, window = restore_physical(net, info, clean, seed)
    return {
        "model": image_metrics(restored, clean, window),
        "input": image_metrics(degraded, clean, window),
    }


def aggregate_sites(replies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per site and overall description (n, mean, sd, 95 % CI) of each metric.

    ``replies`` maps a site to its evaluation reply (``node.evaluate.evaluate_model``'s dict);
    the overall figures pool every image of every site.
    """
    out: dict[str, Any] = {"sites": {}, "overall": {}}
    pooled: dict[str, dict[str, list[float]]] = {"model": {}, "input": {}}
    for site, reply in sorted(replies.items()):
        entry: dict[str, Any] = {"n_images": int(reply["n_images"])}
        for kind, prefix in (("model", ""), ("input", "input_")):
            entry[kind] = {}
            for metric in METRICS:
                values = [float(v) for v in reply[prefix + metric]]
                entry[kind][metric] = describe(values) if values else {"n": 0}
                pooled[kind].setdefault(metric, []).extend(values)
        out["sites"][site] = entry
    for kind in ("model", "input"):
        out["overall"][kind] = {
            metric: describe(values) if values else {"n": 0, "mean": math.nan}
            for metric, values in pooled[kind].items()
        }
    out["overall"]["n_images"] = sum(int(r["n_images"]) for r in replies.values())
    return out
