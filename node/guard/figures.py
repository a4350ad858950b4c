"""The run report's pictures: distance histograms with threshold lines, and an HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np

__all__ = ["distance_histograms_png", "report_html"]


def distance_histograms_png(
    candidates: dict[str, np.ndarray],
    new_patient: dict[str, np.ndarray],
    thresholds: dict[str, float],
    canaries: dict[str, np.ndarray] | None = None,
    bounded: list[str] | tuple[str, ...] = (),
) -> bytes:
    """One panel per metric: candidates, canaries and new-patient distances; threshold line.

    ``bounded``: metrics whose values at or above the threshold are proven lower bounds, not
    distances (said in the panel's title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(thresholds)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        series = [
            ("candidates", candidates.get(name), "tab:blue"),
            ("canaries", (canaries or {}).get(name), "tab:red"),
            ("new patients (calibration)", new_patient.get(name), "tab:green"),
        ]
        values = [np.asarray(v, dtype=float) for _, v, _ in series if v is not None and len(v)]
        top = max([float(v.max()) for v in values] + [thresholds[name] * 1.5])
        bins = np.linspace(0.0, top * 1.05, 40)
        for label, v, colour in series:
            if v is not None and len(v):
                # One artist per series (``stairs``), not one patch per bin: a third of the time.
                density, _ = np.histogram(np.asarray(v, dtype=float), bins=bins, density=True)
                ax.stairs(density, bins, fill=True, alpha=0.5, label=label, color=colour)
        ax.axvline(thresholds[name], color="black", linestyle="--", label="threshold")
        ax.set_title(f"{name}\n(above the line: lower bounds)" if name in bounded else name,
                     fontsize=9)
        ax.set_xlabel("distance to nearest real slice")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def report_html(title: str, report: dict[str, Any], png: bytes) -> str:
    """A self-contained page: the histogram PNG inline and the report as JSON."""
    image = base64.b64encode(png).decode("ascii")
    body = html.escape(json.dumps(report, indent=2, sort_keys=True, default=str))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<img alt='distance histograms' src='data:image/png;base64,{image}'>"
        f"<pre>{body}</pre></body></html>\n"
    )
