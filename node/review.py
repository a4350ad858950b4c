"""The review report a site's reviewer reads before signing a bundle, and a local-only view.

:func:`render_review` makes one self-contained HTML page (images inline as PNG data URIs,
histograms as inline SVG, no script, nothing fetched): a grid of the synthetic images, per guard
metric a histogram of each image's distance to its closest real slice with the threshold
marked, the canary catch rates, the generator summary and the guard report. It is built only
from what the bundle itself holds, so it is written into the bundle and signed with it.

:func:`write_closest_view` is different: it puts each synthetic image beside the closest real
slice of the site's store. It shows real patient images, so it is written only inside the node
home (``runs/``) or where the operator says, mode 0600, never into an outbox or a bundle.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from protocols.files import atomic_write_text

__all__ = ["render_review", "write_closest_view", "grid_png", "distance_stats"]

_MAX_GRID = 64
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;
text-align:left;vertical-align:top;font-size:.9em}th{background:#f3f3f3}
.warn{background:#fff0c0;border:2px solid #d90;padding:.6em;font-weight:bold}
.ok{color:#070}.bad{color:#b00;font-weight:bold}img.grid{image-rendering:pixelated;max-width:100%}
.hist{display:inline-block;margin-right:1em}
"""


def _window(images: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(images, [1.0, 99.0]) if images.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _to_uint8(images: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    scaled = np.clip((images - low) / (high - low), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def grid_png(images: np.ndarray, columns: int = 8, window: tuple[float, float] | None = None
             ) -> bytes:
    """A PNG grid of up to 64 images (one shared intensity window, 1st-99th percentile)."""
    shown = images[:_MAX_GRID]
    n, h, w = shown.shape
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    canvas = np.zeros((rows * (h + 2), cols * (w + 2)), dtype=np.uint8)
    tiles = _to_uint8(shown, window or _window(shown))
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = (
            tiles[i]
        )
    return _png(canvas)


def distance_stats(values: np.ndarray) -> dict[str, float]:
    qs = np.quantile(values, [0.05, 0.5, 0.95]) if values.size else [np.nan] * 3
    return {
        "min": float(values.min()) if values.size else float("nan"),
        "q05": float(qs[0]),
        "median": float(qs[1]),
        "q95": float(qs[2]),
    }


def _histogram_svg(values: np.ndarray, threshold: float, metric: str) -> str:
    width, height, pad = 360, 160, 28
    low = min(float(values.min()), threshold)
    high = max(float(values.max()), threshold)
    if high <= low:
        high = low + 1.0
    span = high - low
    low, high = low - 0.05 * span, high + 0.05 * span
    counts, edges = np.histogram(values, bins=20, range=(low, high))
    top = max(int(counts.max()), 1)

    def x(v: float) -> float:
        return pad + (v - low) / (high - low) * (width - 2 * pad)

    bars = []
    for count, left, right in zip(counts, edges[:-1], edges[1:], strict=True):
        bar_h = count / top * (height - 2 * pad)
        bars.append(
            f'<rect x="{x(left):.1f}" y="{height - pad - bar_h:.1f}" '
            f'width="{max(x(right) - x(left) - 1, 1):.1f}" height="{bar_h:.1f}" fill="#4a7ab5"/>'
        )
    tx = x(threshold)
    return (
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img" aria-label="{html.escape(metric)} distances">'
        f'<text x="{pad}" y="14" font-size="12">{html.escape(metric)}: distance to closest '
        f"real slice (n={values.size})</text>"
        + "".join(bars)
        + f'<line x1="{tx:.1f}" y1="{pad - 6}" x2="{tx:.1f}" y2="{height - pad}" '
        f'stroke="#c00" stroke-width="2"/>'
        f'<text x="{tx + 3:.1f}" y="{pad + 4}" font-size="11" fill="#c00">threshold '
        f"{threshold:.4g}</text>"
        f'<text x="{pad}" y="{height - 8}" font-size="11">{low:.4g}</text>'
        f'<text x="{width - pad - 40}" y="{height - 8}" font-size="11">{high:.4g}</text>'
        "</svg>"
    )


def _value_html(value: Any, depth: int = 0) -> str:
    if isinstance(value, Mapping) and depth < 4:
        rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{_value_html(v, depth + 1)}</td></tr>"
            for k, v in value.items()
        )
        return f"<table>{rows}</table>" if rows else "<i>empty</i>"
    if isinstance(value, float):
        return html.escape(f"{value:.6g}")
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    if len(text) > 400:
        text = text[:400] + " ..."
    return html.escape(text)


def render_review(
    predicate: Mapping[str, Any],
    images: np.ndarray,
    metadata: Sequence[Mapping[str, Any]],
) -> str:
    """The review page for a bundle's predicate, images (physical) and metadata lines."""
    images_info = predicate["images"]
    thresholds: Mapping[str, float] = predicate["thresholds"]
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>synthfed bundle {esc(str(predicate['bundle_id']))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Review: synthetic bundle {esc(str(predicate['bundle_id']))}</h1>",
        "<p>Every image below was generated by the site's model and screened by the distance "
        "guard. Sign the bundle only if the images, distances and canary results are "
        "acceptable under your site's policy.</p>",
    ]
    if predicate.get("demo_auto_approved"):
        parts.append(
            "<p class='warn'>DEMO: this bundle is marked for approval by a scripted demo "
            "reviewer. It must never be used outside a demonstration.</p>"
        )
    rnd = predicate.get("round")
    overview = {
        "site": predicate["site"],
        "round": "none (local export)" if rnd is None else f"{rnd['id']} (nonce {rnd['nonce']})",
        "created (UTC)": predicate["created"],
        "software": f"{predicate['software']['name']} {predicate['software']['version']}",
        "images": f"{images_info['count']} x {images_info['shape'][1]} x "
        f"{images_info['shape'][2]}, {images_info['modality']}, unit {images_info['unit']}, "
        f"stored as {images_info['dtype']}",
        "pixel spacing (mm)": images_info["pixel_spacing_mm"],
        "DICOM copies": images_info["dicom"],
    }
    parts.append("<h2>Overview</h2>" + _value_html(overview))
    window = _window(images[:_MAX_GRID])
    shown = min(images.shape[0], _MAX_GRID)
    grid = base64.b64encode(grid_png(images, window=window)).decode("ascii")
    # Small model grids (64 px) are shown enlarged, pixelated, up to the page width.
    natural = min(images.shape[0], 8) * (images.shape[2] + 2)
    display_width = min(1000, 2 * natural)
    parts.append(
        f"<h2>Images</h2><p>{shown} of {images.shape[0]} shown; window "
        f"{window[0]:.4g} to {window[1]:.4g} {esc(str(images_info['unit']))}.</p>"
        f"<img class='grid' alt='grid of synthetic images' width='{display_width}' "
        f"src='data:image/png;base64,{grid}'>"
    )
    guard = predicate.get("guard")
    kinds = guard.get("distance_kind", {}) if isinstance(guard, Mapping) else {}
    parts.append("<h2>Distance to the closest real slice</h2><p>Each image's distance under "
                 "every guard metric; the red line is the threshold. Nothing may lie left of "
                 "it. A metric marked <em>lower bound</em> carries a proven lower bound on the "
                 "distance (its search stops at the threshold), not the distance itself.</p>")
    rows = ["<table><tr><th>metric</th><th>threshold</th><th>min</th><th>5 %</th>"
            "<th>median</th><th>95 %</th><th>status</th></tr>"]
    svgs = []
    for metric, threshold in sorted(thresholds.items()):
        values = np.array([float(m["distances"][metric]) for m in metadata], dtype=np.float64)
        st = distance_stats(values)
        ok = values.size and st["min"] >= threshold
        status = "<span class='ok'>all above</span>" if ok else "<span class='bad'>BELOW</span>"
        label = f"{metric} (lower bound)" if kinds.get(metric) == "lower_bound" else metric
        rows.append(
            f"<tr><td>{esc(label)}</td><td>{threshold:.4g}</td><td>{st['min']:.4g}</td>"
            f"<td>{st['q05']:.4g}</td><td>{st['median']:.4g}</td><td>{st['q95']:.4g}</td>"
            f"<td>{status}</td></tr>"
        )
        if values.size:
            svgs.append(_histogram_svg(values, float(threshold), metric))
    parts.append("".join(rows) + "</table>" + "".join(svgs))
    rates = predicate["canary_catch_rates"]
    parts.append("<h2>Canary self-test</h2>")
    if rates:
        parts.append(
            "<table><tr><th>alteration</th><th>catch rate</th></tr>"
            + "".join(
                f"<tr><td>{esc(k)}</td><td class='{'ok' if v >= 1 else 'bad'}'>{v:.3f}</td></tr>"
                for k, v in sorted(rates.items())
            )
            + "</table>"
        )
    else:
        parts.append("<p class='bad'>The guard reported no canary catch rates.</p>")
    parts.append("<h2>Generator</h2>" + _value_html(predicate["generator"]))
    parts.append("<h2>Guard report</h2>" + _value_html(predicate["guard"]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _nearest_rmse(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index and pixel RMSE of each query's nearest reference image (exact, chunked)."""
    q = queries.reshape(len(queries), -1).astype(np.float64)
    best_d = np.full(len(q), np.inf)
    best_i = np.zeros(len(q), dtype=np.int64)
    q2 = (q * q).sum(1)
    for start in range(0, len(reference), 4096):
        r = reference[start : start + 4096].reshape(-1, q.shape[1]).astype(np.float64)
        d2 = q2[:, None] + (r * r).sum(1)[None, :] - 2.0 * q @ r.T
        idx = d2.argmin(1)
        val = d2[np.arange(len(q)), idx]
        better = val < best_d
        best_d[better], best_i[better] = val[better], idx[better] + start
    return best_i, np.sqrt(np.maximum(best_d, 0.0) / q.shape[1])


def write_closest_view(
    paths: Any, images: np.ndarray, modality: str, out: Path, max_images: int = 32
) -> Path:
    """LOCAL ONLY: each synthetic image beside its closest real slice (pixel RMSE) -> ``out``.

    ``images`` are physical values; they are mapped to the store's normalised space with the
    store's own mapping. Refuses to write into the outbox (nothing real may end up in a bundle).
    """
    from node.store import Store

    out = Path(out).resolve()
    outbox = Path(paths.outbox).resolve()
    if out == outbox or outbox in out.parents:
        raise ValueError("the closest-real view shows real images; never write it in the outbox")
    with Store(paths.store) as store:
        scale, offset, _unit = store.physical_mapping(modality)
        reference = store.load(store.records(None, modality))
    if reference.size == 0:
        raise ValueError(f"the store holds no {modality} slice to compare with")
    shown = images[:max_images]
    normalised = (shown - offset) / scale
    index, rmse = _nearest_rmse(normalised, reference)
    nearest = reference[index] * scale + offset
    window = _window(np.concatenate([shown, nearest]))
    rows = []
    for i in range(len(shown)):
        pair = grid_png(np.stack([shown[i], nearest[i]]), columns=2, window=window)
        rows.append(
            f"<tr><td>{i}</td><td><img src='data:image/png;base64,"
            f"{base64.b64encode(pair).decode('ascii')}' width='{2 * shown.shape[2] * 2}'></td>"
            f"<td>{rmse[i]:.4g}</td></tr>"
        )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>LOCAL ONLY: closest "
        f"real slices</title><style>{_STYLE}</style></head><body><p class='warn'>LOCAL ONLY. "
        "This page shows real patient images. Never send it, never put it in a bundle.</p>"
        "<h1>Synthetic image (left) beside its closest real slice (right)</h1><p>Closest by "
        "pixel RMSE in the store's normalised space, over every real slice of the modality "
        "(train and holdout); the guard's other metrics may pick another slice.</p>"
        "<table><tr><th>#</th><th>synthetic | closest real</th><th>RMSE (normalised)</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )
    return atomic_write_text(out, page, mode=0o600)


def review_bundle(
    paths: Any,
    config: Any,
    bundle: str | Path,
    out: Path | None = None,
    local_closest: bool = False,
) -> dict[str, Any]:
    """Verify a bundle of this node; copy its report to ``out``; optionally the local view.

    The report copied is the one inside the bundle, whose digest the manifest signs, so the
    reviewer reads exactly what they sign.
    """
    from node.export import locate_bundle, verify_own_bundle
    from protocols.bundle import REVIEW, load_bundle_images
    from protocols.files import atomic_write_bytes, sha256_hex

    state, folder = locate_bundle(paths, bundle)
    verified = verify_own_bundle(paths, config, folder)
    report = folder / REVIEW
    result: dict[str, Any] = {
        "bundle_id": verified.bundle_id,
        "state": state,
        "images": verified.n_images,
        "modality": verified.modality,
        "reviewer_signatures": len(verified.reviewer_signers),
        "manifest_sha256": verified.digest,
        "report": str(report),
    }
    if out is not None:
        data = report.read_bytes()
        if sha256_hex(data) != verified.subjects[REVIEW]:
            raise ValueError("review report changed after verification")
        result["report"] = str(atomic_write_bytes(out, data))
    if local_closest:
        images = load_bundle_images(verified)
        target = Path(paths.runs) / f"closest-{verified.bundle_id}.html"
        result["closest_view"] = str(
            write_closest_view(paths, images, verified.modality, target)
        )
    return result
