"""brain-tumor-t1c's patients as the benchmarks group them.

The collection's ``patients.csv`` has 233 patient IDs; in 18 cases several differ only by a
trailing letter (``MR040240``, ``MR040240B``, ...). Its authors do not say whether those are
one person, so the cautious grouping (../shared/data/mr/README.md) merges them: 209 patients.
The restoration comparison splits its three MR sites that way, and ``bench_guard.py --which
mr-merged`` counts new patients that way.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

__all__ = ["merged_patient", "merged_patients_csv"]


def merged_patient(pid: str) -> str:
    """The patient ID with a trailing letter (or letters) removed."""
    return re.sub(r"[A-Za-z]+$", "", pid.strip())


def merged_patients_csv(source: Path, out: Path) -> Path:
    """``source`` (a patients.csv) rewritten to ``out`` with merged IDs and absolute paths."""
    with source.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            row["file"] = str((source.parent / row["file"]).resolve())
            row["patient_id"] = merged_patient(row["patient_id"])
            writer.writerow(row)
    return out
