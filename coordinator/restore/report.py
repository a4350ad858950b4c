"""The comparison report: ``results.json``, ``report.md``, PNG figures and ``report.html``.

The HTML page is self-contained (figures base64-embedded), so it can be mailed or archived as
one file. The report states the data split and counts, where arm S's images came from, how
images were scored, the step budget, and which claim the statistics support; it never rounds a
p-value into a verdict it does not carry.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from protocols.files import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["write_report", "markdown_report", "markdown_to_html", "json_safe", "summary_lines"]

ARM_NAMES = {
    "S": "S pooled synthetic",
    "R": "R pooled real",
    "L": "L site alone",
    "F": "F FedAvg",
    "0": "0 degraded input",
}
ARM_ORDER = ("S", "R", "L", "F", "0")
METRIC_LABEL = {"psnr_db": "PSNR (dB)", "ssim": "SSIM", "rmse": "RMSE"}


def json_safe(value: Any) -> Any:
    """NaN / inf -> None, numpy scalars -> Python, arrays -> lists (results.json is strict)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float) and 0 < abs(value) < 10 ** (-digits):
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _p(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if value == 0.0:
        return "< 1e-300"  # below double precision
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def _arms(results: dict[str, Any]) -> list[str]:
    return [a for a in ARM_ORDER if a in results["table"]]



def summary_lines(results: dict[str, Any]) -> list[str]:
    """The comparison table in a few lines: each arm's overall means, then the verdicts."""
    lines = []
    for arm in ("S", "R", "L", "F", "0"):
        if arm in results["table"]:
            o = results["table"][arm]["overall"]
            lines.append(f"arm {arm}: PSNR {o['psnr_db']['mean']:.2f} dB, "
                         f"SSIM {o['ssim']['mean']:.4f} (n={o['psnr_db']['n']})")
        elif arm in results["notes"]:
            lines.append(f"arm {arm}: {results['notes'][arm]}")
    for key, by_metric in results["tests"].items():
        if key in ("S vs R", "S vs F"):
            for metric in ("psnr_db", "ssim"):
                lines.append(f"{key} {metric}: {by_metric[metric]['overall']['verdict']}")
    return lines

def markdown_report(results: dict[str, Any], figures: dict[str, str]) -> str:
    cfg = results["config"]
    st = results["settings"]
    unit = "HU" if cfg["modality"] == "CT" else "physical units"
    lines = [
        f"# Restoration comparison: {cfg['task']} ({cfg['modality']})",
        "",
        f"Network `{st['net']}` {st['net_config']}; every arm: {st['steps']} optimiser steps, "
        f"batch {st['batch_size']}, Adam lr {st['lr']} ({st.get('lr_schedule', 'constant')}), "
        "initialisation / batch-order seed "
        f"{st['seed']}, training degradation seed {cfg['train_seed']}, evaluation degradation "
        f"seed {cfg['eval_seed']}. Degradation: `{st['degradation']}`. "
        f"Total wall time {results['wall_s']} s.",
        "",
        "## Sites and split",
        "",
        *([cfg["description"], ""] if cfg.get("description") else []),
        "Each site's own patient-level train / holdout split (its node store; a one-patient site "
        "splits by contiguous slabs). Training uses train slices only; every number below is "
        "measured on holdout slices at the site that owns them.",
        "",
        "| site | train slices | train patients | holdout slices | holdout patients |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s in results["sites"]:
        lines.append(f"| {s['name']} | {s['train_slices']} | {s['patients_train']} | "
                     f"{s['holdout_slices']} | {s['patients_holdout']} |")
    lines += ["", "## Arms", ""]
    for arm in ARM_ORDER:
        if arm not in results["arms"]:
            continue
        text = ARM_NAMES[arm]
        if arm in results["notes"]:
            text += f": **{results['notes'][arm]}**"
        if arm == "S" and "S" in results["provenance"]:
            prov = results["provenance"]["S"]
            counts = ", ".join(f"{k}: {v.get('accepted')}" for k, v in prov["sites"].items())
            text += f": {prov['label']} (images per site: {counts})"
        if arm == "F" and "F" in results["provenance"]:
            f = results["provenance"]["F"]
            text += (f": Flower FedAvg in the simulation engine, {f['rounds']} rounds x "
                     f"{f['local_steps']} local steps x {f['sites']} sites = {f['total_steps']} "
                     f"steps in all (budget {f['budget']}; {f['steps_per_site']} per site)")
        if arm == "L":
            text += ": one model per site, each evaluated on its own site's holdout"
        lines.append(f"- {text}")
    ev: dict[str, Any] = next(iter(results["evaluation"].values()), {})
    lines += [
        "",
        "## Scoring",
        "",
        f"Per image, in {unit}: PSNR and SSIM with data range = {ev.get('data_range_rule')}"
        + (f", window {ev.get('window_hu')} HU" if ev.get("window_hu") else "")
        + "; SSIM: 7x7 uniform window, K1 0.01, K2 0.03 (scikit-image's definition); RMSE in "
        f"{unit}. Intervals: 95 % t intervals of the mean.",
        "",
        "## Results over all holdout images",
        "",
        "| arm | n | PSNR mean (sd) | PSNR 95 % CI | SSIM mean (sd) | SSIM 95 % CI "
        f"| RMSE ({unit}) mean (sd) |",
        "| --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for arm in _arms(results):
        o = results["table"][arm]["overall"]
        p, s, r = o["psnr_db"], o["ssim"], o["rmse"]
        lines.append(
            f"| {ARM_NAMES[arm]} | {p['n']} | {_f(p['mean'], 2)} ({_f(p['sd'], 2)}) | "
            f"[{_f(p['ci95_low'], 2)}, {_f(p['ci95_high'], 2)}] | {_f(s['mean'], 4)} "
            f"({_f(s['sd'], 4)}) | [{_f(s['ci95_low'], 4)}, {_f(s['ci95_high'], 4)}] | "
            f"{_f(r['mean'], 1)} ({_f(r['sd'], 1)}) |"
        )
    lines += ["", "## Results per site", "",
              "| site | arm | n | PSNR mean [95 % CI] | SSIM mean [95 % CI] | RMSE mean |",
              "| --- | --- | ---: | --- | --- | --- |"]
    for site in [s["name"] for s in results["sites"]]:
        for arm in _arms(results):
            entry = results["table"][arm]["sites"].get(site)
            if not entry:
                continue
            p, s, r = entry["psnr_db"], entry["ssim"], entry["rmse"]
            lines.append(
                f"| {site} | {arm} | {p['n']} | {_f(p['mean'], 2)} [{_f(p['ci95_low'], 2)}, "
                f"{_f(p['ci95_high'], 2)}] | {_f(s['mean'], 4)} [{_f(s['ci95_low'], 4)}, "
                f"{_f(s['ci95_high'], 4)}] | {_f(r['mean'], 1)} |"
            )
    margins = results["config"]["margins"]
    lines += [
        "",
        "## Paired tests",
        "",
        "Differences are first arm minus second, per image (same holdout slice, same degraded "
        "input). Wilcoxon signed-rank and paired t-test against no difference; TOST against the "
        f"equivalence margins {margins} (equivalent when TOST p < 0.05, i.e. the 90 % CI of the "
        "mean difference lies inside the margin). A p-value above 0.05 alone is *not* evidence "
        "of equivalence.",
        "",
        "| comparison | metric | scope | n | mean diff [95 % CI] | Wilcoxon p | t-test p "
        "| TOST p | verdict |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for key, by_metric in results["tests"].items():
        for metric, by_scope in by_metric.items():
            for scope, t in by_scope.items():
                tost = t.get("tost") or {}
                lines.append(
                    f"| {key} | {METRIC_LABEL[metric]} | {scope} | {t['n']} | "
                    f"{_f(t['mean_difference'], 4)} [{_f(t['ci95_low'], 4)}, "
                    f"{_f(t['ci95_high'], 4)}] | {_p(t['wilcoxon_p'])} | {_p(t['ttest_p'])} | "
                    f"{_p(tost.get('p'))} | {t['verdict']} |"
                )
    lines += ["", "## What the data support", ""]
    lines += _claims(results)
    lines += ["", "## Wall time per arm (seconds)", "",
              "| arm | make pairs | generate (S) | train | evaluate |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for arm, t in results["timings_s"].items():
        label = f"{arm} (model reused from an earlier run)" if t.get("reused") else arm
        lines.append(f"| {label} | {t.get('degrade_s', 0)} | {t.get('generate_s', '')} | "
                     f"{t.get('train_s', 0)} | {t.get('evaluate_s', 0)} |")
    if figures:
        lines += ["", "## Figures", ""]
        for title, name in figures.items():
            lines.append(f"![{title}]({name})")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _claims(results: dict[str, Any]) -> list[str]:
    out = []
    for key in ("S vs R", "S vs F"):
        if key not in results["tests"]:
            a, b = key.split(" vs ")
            missing = [x for x in (a, b) if x not in results["table"]]
            out.append(f"- {key}: not tested (arm {', '.join(missing)} did not run).")
            continue
        for metric in ("psnr_db", "ssim"):
            t = results["tests"][key][metric]["overall"]
            out.append(
                f"- {key}, {METRIC_LABEL[metric]} over all {t['n']} holdout images: "
                f"**{t['verdict']}** (mean difference {_f(t['mean_difference'], 4)}, "
                f"Wilcoxon p {_p(t['wilcoxon_p'])}, TOST p "
                f"{_p((t.get('tost') or {}).get('p'))} at margin {t.get('margin')})."
            )
    return out


def _save(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _figure_boxplots(results: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = _arms(results)
    if not arms:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric in zip(axes, ("psnr_db", "ssim", "rmse"), strict=True):
        data = [
            [v for site_values in results["per_image"][arm].values() for v in site_values[metric]]
            for arm in arms
        ]
        ax.boxplot(data, tick_labels=arms, showmeans=True)
        ax.set_title(METRIC_LABEL[metric])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Per-image holdout metrics, all sites (S synthetic, R real, L local, "
                 "F FedAvg, 0 input)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def _figure_examples(
    results: dict[str, Any], examples: list[dict[str, Any]], path: Path
) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not examples:
        return False
    columns = ["degraded"] + [a for a in ARM_ORDER if a != "0" and a in examples[0]]
    columns.append("reference")
    rows = [(ex["site"], i) for ex in examples for i in range(ex["reference"].shape[0])]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.0 * len(columns),
                                                                2.1 * len(rows)), squeeze=False)
    ct = results["config"]["modality"] == "CT"
    by_site = {ex["site"]: ex for ex in examples}
    for r, (site, i) in enumerate(rows):
        ex = by_site[site]
        ref = ex["reference"][i]
        low, high = (-1000.0, 1000.0) if ct else (float(ref.min()), float(ref.max()))
        for c, col in enumerate(columns):
            ax = axes[r, c]
            if col in ex:
                ax.imshow(ex[col][i], cmap="gray", vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(ARM_NAMES.get(col, col) if col not in ("degraded", "reference")
                             else col, fontsize=8)
            if c == 0:
                ax.set_ylabel(site, fontsize=8)
    window = "display window [-1000, 1000] HU" if ct else "display: reference min..max"
    fig.suptitle(f"Example holdout slices ({window})", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def markdown_to_html(markdown: str, images: dict[str, bytes], title: str) -> str:
    """The subset of Markdown this report writes -> one HTML page with embedded PNGs."""

    def inline(text: str) -> str:
        out = html.escape(text)
        parts = out.split("**")
        out = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
        parts = out.split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body: list[str] = []
    table: list[list[str]] = []
    in_list = False

    def flush_table() -> None:
        if not table:
            return
        body.append("<table>")
        for i, cells in enumerate(table):
            tag = "th" if i == 0 else "td"
            body.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
        body.append("</table>")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        flush_table()
        if in_list and not line.startswith("- "):
            body.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.startswith("![") and "](" in line:
            alt = line[2:line.index("]")]
            name = line[line.index("](") + 2:-1]
            if name in images:
                data = base64.b64encode(images[name]).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(alt)}" '
                            f'src="data:image/png;base64,{data}"></figure>')
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush_table()
    if in_list:
        body.append("</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 6px}th{background:#eee}"
             "img{max-width:100%}code{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def write_report(
    results: dict[str, Any], examples: list[dict[str, Any]], out_dir: Path
) -> dict[str, Path]:
    """Write results.json, boxplots.png, examples.png, report.md and report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", json_safe(results))
    figures: dict[str, str] = {}
    if _figure_boxplots(results, out_dir / "boxplots.png"):
        figures["Per-image metrics per arm"] = "boxplots.png"
    if _figure_examples(results, examples, out_dir / "examples.png"):
        figures["Example slices: degraded input, each arm, reference"] = "examples.png"
    markdown = markdown_report(results, figures)
    atomic_write_text(out_dir / "report.md", markdown)
    images = {name: (out_dir / name).read_bytes() for name in figures.values()}
    title = f"synthfed comparison: {results['config']['task']} {results['config']['modality']}"
    page = markdown_to_html(markdown, images, title)
    atomic_write_bytes(out_dir / "report.html", page.encode("utf-8"))
    return {"json": out_dir / "results.json", "markdown": out_dir / "report.md",
            "html": out_dir / "report.html"}
