"""Ingest speed (slices per second) on every folder of ../shared/data.

Each folder goes into its own fresh node home; the first ingest (read, decode, HU / SUV,
normalise, store) and a second, idempotent ingest of the same folder (everything already
stored: read and hash only) are timed. Library imports are warmed up before timing. Prints a
table and appends a section to bench/RESULTS.md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ingest.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from machine import CpuShare, machine_line  # noqa: E402

FOLDERS: tuple[tuple[str, dict[str, Any]], ...] = (
    # (folder, ingest options)
    ("ct/covid-ny-sbu", {}),
    ("ct/tcga-luad", {}),
    ("ct/pancreatic-ct-cbct-seg", {}),
    ("mr/t1-mprage", {"plane": "sagittal"}),
    ("mr/brain-tumor-t1c", {"modality": "MR", "patient_rule": "csv:{root}/patients.csv"}),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    share = CpuShare()
    if not args.data.is_dir():
        print(f"error: no shared data at {args.data}", file=sys.stderr)
        return 2

    import numpy as np

    from node.config import NodePaths, load_node_config
    from node.home import init_home
    from node.ingest import ingest_sources
    from node.ingest.normalise import normalise_slice

    normalise_slice(np.zeros((8, 8), np.float32), (0.0, 1.0), 64, None)  # warm up MONAI

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for folder, options in FOLDERS:
            root = args.data / folder
            opts = {k: (v.format(root=root) if isinstance(v, str) else v)
                    for k, v in options.items()}
            home = Path(tmp) / folder.replace("/", "_")
            init_home(home, "bench")
            paths = NodePaths(home)
            config = load_node_config(paths)
            t0 = time.perf_counter()
            first = ingest_sources(paths, config, [root], progress=False, **opts)
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            second = ingest_sources(paths, config, [root], progress=False, **opts)
            second_s = time.perf_counter() - t0
            assert second.slices_added == 0
            rows.append({
                "folder": folder,
                "options": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
                .replace("{root}", f"<data>/{folder}"),
                "files": first.files,
                "slices": first.slices_added,
                "skipped": sum(first.skipped.values()),
                "first_s": first_s,
                "slices_per_s": first.slices_added / first_s,
                "files_per_s": first.files / first_s,
                "second_s": second_s,
            })
            print(f"{folder:28s} files {first.files:5d} slices {first.slices_added:5d} "
                  f"first {first_s:6.2f} s ({first.slices_added / first_s:7.1f} slices/s)  "
                  f"re-ingest {second_s:6.2f} s", flush=True)

    total_slices = sum(r["slices"] for r in rows)
    total_s = sum(r["first_s"] for r in rows)
    print(f"{'all':28s} slices {total_slices} in {total_s:.2f} s "
          f"({total_slices / total_s:.1f} slices/s)")
    if args.no_write:
        return 0

    import torch

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "",
        f"## Ingest speed ({when})",
        "",
        f"- machine: {machine_line(share, f'torch {torch.__version__} (CPU)')}",
        "- command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ingest.py`",
        "- each folder into a fresh home (image size 64, default settings); 'first' = read,"
        " decode, physical units, normalise, store, split; 're-ingest' = the same folder again"
        " (all instances known: read and hash only, nothing decoded or added)",
        "",
        "| folder | options | files | slices stored | skipped | first ingest s |"
        " slices/s | files/s | re-ingest s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['folder']} | {r['options'] or '-'} | {r['files']} | {r['slices']} |"
            f" {r['skipped']} | {r['first_s']:.2f} | {r['slices_per_s']:.1f} |"
            f" {r['files_per_s']:.1f} | {r['second_s']:.2f} |"
        )
    lines.append(f"| all | | {sum(r['files'] for r in rows)} | {total_slices} |"
                 f" {sum(r['skipped'] for r in rows)} | {total_s:.2f} |"
                 f" {total_slices / total_s:.1f} | | {sum(r['second_s'] for r in rows):.2f} |")
    header = ""
    if not args.results.exists():
        header = ("# Benchmark results\n\nEvery figure below was measured by the command shown,"
                  " on the machine and date stated.\n")
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(header + "\n".join(lines) + "\n")
    print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
