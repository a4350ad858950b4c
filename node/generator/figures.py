"""PNG figures of the generator runs: loss curves and image grids (matplotlib, Agg).

Figures are for a person looking at a run; nothing reads them back.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from protocols.files import atomic_write_bytes

__all__ = ["plot_losses", "image_grid", "save_grid_png", "save_side_by_side_png"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Loss curves of both stages (raw and smoothed), log scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (stage, key) in zip(axes, (("autoencoder", "l1"), ("diffusion", "mse")),
                                strict=True):
        steps = np.array([r["step"] for r in records if r["stage"] == stage], dtype=float)
        values = np.array([r[key] for r in records if r["stage"] == stage], dtype=float)
        ax.set_title(f"{stage}: {key}")
        ax.set_xlabel("step")
        if len(values):
            ax.plot(steps, values, lw=0.5, alpha=0.4, color="tab:blue")
            width = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(width) / width, mode="valid")
            ax.plot(steps[width - 1 :], smooth, lw=1.5, color="tab:blue")
            if np.all(values > 0):
                ax.set_yscale("log")
    _save(fig, path)


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """Tile [N, S, S] images into one 2-D array (missing tiles are left at the minimum)."""
    n, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = max(1, -(-n // columns))
    fill = float(images.min()) if n else 0.0
    grid = np.full((rows * h + rows - 1, columns * w + columns - 1), fill, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = images[i]
    return grid


def save_grid_png(path: Path, images: np.ndarray, title: str, window: tuple[float, float],
                  columns: int = 8) -> None:
    plt = _pyplot()
    grid = image_grid(images, columns)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40 + 1, grid.shape[0] / 40 + 1))
    ax.imshow(grid, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    _save(fig, path)


def save_side_by_side_png(path: Path, real: np.ndarray, synthetic: np.ndarray, title: str,
                          window: tuple[float, float], columns: int = 4) -> None:
    """Real train slices (left) beside synthetic images (right), same display window."""
    plt = _pyplot()
    left, right = image_grid(real, columns), image_grid(synthetic, columns)
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.4))
    for ax, grid, name in ((axes[0], left, "real (train)"), (axes[1], right, "synthetic")):
        ax.imshow(grid, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
