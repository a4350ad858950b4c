"""A small contrastive encoder, trained at the site, for the guard's embedding metric.

SimCLR-style self-supervision (Chen et al., 2020, arXiv 2002.05709): two random alterations
of the same real slice are pulled together and pushed away from every other slice in the batch
(NT-Xent loss). The alterations are the ones a memorising generator might apply -- integer and
sub-pixel shifts, the horizontal mirror, small rotations, zoom-crops, intensity scaling and
Gaussian noise -- drawn a little *wider* than the canaries of :mod:`privacy.canaries`, so an
altered copy of a slice lands nearer its original than any other real slice does.

Nothing is downloaded (invariant 7): the network is a four-layer CNN initialised from the seed.
This module knows nothing of files or command lines: pure functions over arrays, weights in
and out as ``{name: numpy array}``. torch is imported lazily.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from privacy.errors import GuardError

__all__ = ["EncoderConfig", "train_encoder", "embed_images", "make_embedder", "EMBED_BATCH",
           "EMBED_INFERENCE"]


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that defines an encoder; saved beside its weights."""

    image_size: int
    embed_dim: int = 64
    width: int = 16
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-3
    temperature: float = 0.2
    seed: int = 0
    max_shift_px: float = 5.0
    max_rotation_deg: float = 8.0
    min_zoom: float = 0.9
    intensity_low: float = 0.85
    intensity_high: float = 1.15
    max_noise_sigma: float = 0.04

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise GuardError("encoder image_size must be at least 8", "encoder", 2)
        if self.embed_dim < 2 or self.width < 1 or self.steps < 0 or self.batch_size < 2:
            raise GuardError("encoder sizes must be positive (batch_size >= 2)", "encoder", 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise GuardError(f"unknown encoder config keys {unknown}", "encoder", 2)
        return cls(**data)


def _build(config: EncoderConfig) -> Any:
    import torch
    from torch import nn

    w = config.width
    pooled = min(4, max(1, config.image_size // 16))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(pooled),
                nn.Flatten(),
            )
            self.head = nn.Sequential(
                nn.Linear(4 * w * pooled * pooled, 2 * config.embed_dim),
                nn.ReLU(),
                nn.Linear(2 * config.embed_dim, config.embed_dim),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = nn.functional.normalize(self.head(self.features(x)), dim=1)
            return out

    return Encoder()


def _augment(x: Any, config: EncoderConfig, gen: Any) -> Any:
    """Random alteration of a batch [B, 1, S, S] in [0, 1] (see the module docstring)."""
    import torch
    import torch.nn.functional as tf

    b, _, s, _ = x.shape

    def u(*shape: int) -> Any:
        return torch.rand(*shape, generator=gen)

    angle = (u(b) * 2 - 1) * math.radians(config.max_rotation_deg)
    zoom = config.min_zoom + (1 - config.min_zoom) * u(b)
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    shift = (u(b, 2) * 2 - 1) * (2 * config.max_shift_px / s)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
            torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = tf.affine_grid(theta, list(x.shape), align_corners=False)
    out = tf.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = config.intensity_low + (config.intensity_high - config.intensity_low) * u(b)
    out = out * gain[:, None, None, None]
    sigma = config.max_noise_sigma * u(b)
    noise = torch.randn(out.shape, generator=gen) * sigma[:, None, None, None]
    return (out + noise).clamp(0.0, 1.0)


def _nt_xent(z1: Any, z2: Any, temperature: float) -> Any:
    import torch
    import torch.nn.functional as tf

    z = torch.cat([z1, z2], dim=0)
    logits = z @ z.T / temperature
    n = z1.shape[0]
    logits = logits - torch.eye(2 * n) * 1e9
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return tf.cross_entropy(logits, target)


def train_encoder(
    images: np.ndarray,
    config: EncoderConfig,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train on real slices [N, S, S] in [0, 1]; returns (weights, training summary)."""
    import torch

    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1] != config.image_size or arr.shape[2] != config.image_size:
        raise GuardError(
            f"encoder expects [N, {config.image_size}, {config.image_size}], found {arr.shape}",
            "encoder",
            2,
        )
    if arr.shape[0] < 2:
        raise GuardError("the encoder needs at least two real slices", "encoder", 2)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = _build(config)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    data = torch.from_numpy(arr)[:, None]
    batch = min(config.batch_size, arr.shape[0])
    losses: list[float] = []
    model.train()
    for step in range(config.steps):
        idx = torch.from_numpy(rng.choice(arr.shape[0], size=batch, replace=False))
        x = data[idx]
        loss = _nt_xent(
            model(_augment(x, config, gen)), model(_augment(x, config, gen)), config.temperature
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        if progress is not None:
            progress(step + 1, config.steps)
    state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    tail = losses[-20:] if losses else [float("nan")]
    info = {
        "steps": config.steps,
        "slices": int(arr.shape[0]),
        "loss_first": losses[0] if losses else None,
        "loss_last20_mean": float(np.mean(tail)) if losses else None,
        "wall_s": round(time.perf_counter() - start, 2),
    }
    return state, info


#: Images per forward pass of the embedder, always: a shorter last chunk is padded with black
#: images. The CPU convolutions pick their algorithm by batch shape, so the same image embedded
#: in a batch of another size came out different in the 8th digit (up to 9e-8), and a slice
#: whose distance set a threshold could then fall on either side of it. With one shape the
#: embedding of an image does not depend on the images beside it, its place among them or the
#: thread count (tests/test_privacy_metrics.py).
EMBED_BATCH = 64
EMBED_INFERENCE = f"fixed batches of {EMBED_BATCH}, zero-padded"


def make_embedder(
    state: dict[str, np.ndarray], config: EncoderConfig, batch_size: int = EMBED_BATCH
) -> Callable[[np.ndarray], np.ndarray]:
    """A function images [N, S, S] -> unit embeddings [N, E] (float32), model built once.
    Every forward pass holds exactly ``batch_size`` images (:data:`EMBED_BATCH`)."""
    import torch

    model = _build(config)
    try:
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    except (RuntimeError, KeyError) as exc:
        raise GuardError(f"encoder weights do not fit the config: {exc}", "encoder", 2) from None
    model.eval()

    def embed(images: np.ndarray) -> np.ndarray:
        arr = np.asarray(images, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[1:] != (config.image_size, config.image_size):
            raise GuardError(
                f"encoder expects [N, {config.image_size}, {config.image_size}], "
                f"found {arr.shape}",
                "encoder",
                2,
            )
        out = np.empty((arr.shape[0], config.embed_dim), dtype=np.float32)
        chunk = np.zeros((batch_size, 1, *arr.shape[1:]), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, arr.shape[0], batch_size):
                part = arr[start : start + batch_size]
                chunk[: part.shape[0], 0] = part
                chunk[part.shape[0] :] = 0.0
                out[start : start + part.shape[0]] = (
                    model(torch.from_numpy(chunk)).numpy()[: part.shape[0]]
                )
        return out

    return embed


def embed_images(
    state: dict[str, np.ndarray], config: EncoderConfig, images: np.ndarray
) -> np.ndarray:
    """Unit embeddings [N, E] of images [N, S, S] in [0, 1]."""
    return make_embedder(state, config)(images)
