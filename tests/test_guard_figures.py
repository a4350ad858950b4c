"""The guard's run figure: one panel per metric, the threshold where it belongs, no matplotlib."""

from __future__ import annotations

import io

import numpy as np
from freshkit import imported_after
from PIL import Image

from node.guard.figures import _MARGIN, _PANEL, distance_histograms_png


def _figure() -> Image.Image:
    rng = np.random.default_rng(0)
    candidates = {"a": rng.uniform(0.6, 1.0, 200), "b": rng.uniform(0.0, 2.0, 200)}
    canaries = {"a": np.full(10, 0.01), "b": np.full(10, 0.02)}
    new_patient = {"a": rng.uniform(0.4, 1.0, 50)}
    png = distance_histograms_png(candidates, new_patient, {"a": 0.5, "b": 1.0}, canaries,
                                  bounded=["b"])
    return Image.open(io.BytesIO(png)).convert("RGB")


def test_one_panel_per_metric_with_the_threshold_line_at_its_value() -> None:
    image = _figure()
    assert image.size == (2 * _PANEL[0], _PANEL[1])
    pixels = np.asarray(image).astype(int)
    left, right, top, bottom = _MARGIN
    rows = slice(top + 2, _PANEL[1] - bottom - 2)

    def black_rows(column: int) -> int:
        return int((pixels[rows, column].sum(axis=1) < 60).sum())

    # panel "a": x axis from 0 to max(1.0, 1.5 * 0.5) * 1.05; the threshold 0.5 sits here
    x_top = 1.0 * 1.05
    xt = left + (_PANEL[0] - right - left) * 0.5 / x_top
    on_line = max(black_rows(int(xt)), black_rows(int(xt) + 1))
    assert on_line > 0.4 * (rows.stop - rows.start)  # dashed: about half the column is black
    assert black_rows(int(left + (_PANEL[0] - right - left) * 0.8 / x_top)) == 0
    # the canaries' bar (red, near zero) is drawn in panel "a"
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 170) & (pixels[..., 2] < 170)
    assert red[:, left : left + 20].any()


def test_the_figure_does_not_import_matplotlib() -> None:
    """matplotlib's import alone took about 0.7 s of every generate and screen run."""
    code = (
        "import numpy as np\n"
        "from node.guard.figures import distance_histograms_png\n"
        "png = distance_histograms_png({'a': np.ones(5)}, {}, {'a': 0.5})\n"
        "assert png[:8] == b'\\x89PNG\\r\\n\\x1a\\n'\n"
    )
    assert imported_after(code, ("matplotlib",)) == []
