"""The site store: a SQLite catalog (one row per slice) over immutable float16 .npy shards.

What the store must never hold: a raw PatientID, name, date or UID (patients, series and
instances are keyed pseudonyms, see ``node.pseudonym``), or anything read from a holdout slice
by generator training (readers ask for ``split="train"``).

Writes are crash-safe (ARCHITECTURE invariant 5): a batch's shard is written atomically and
named by its content digest *before* its rows are committed in one transaction, so a killed
ingest leaves at worst an unreferenced shard, which the next ingest deletes. Shards are never
rewritten. Stored pixels are normalised to [0, 1]; ``physical = stored * scale + offset``.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from node.errors import StoreError
from protocols.files import atomic_write_bytes, sha256_hex

__all__ = ["Store", "NewSlice", "SliceRecord", "SplitSummary"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slices (
    id INTEGER PRIMARY KEY,
    modality TEXT NOT NULL,
    patient TEXT NOT NULL,
    series TEXT NOT NULL,
    position REAL NOT NULL,
    source_digest TEXT NOT NULL,
    instance_key TEXT NOT NULL UNIQUE,
    pixel_digest TEXT NOT NULL,
    split TEXT NOT NULL DEFAULT 'train',
    shard TEXT NOT NULL,
    row INTEGER NOT NULL,
    size INTEGER NOT NULL,
    unit TEXT NOT NULL,
    scale REAL NOT NULL,
    offset REAL NOT NULL,
    spacing_mm REAL,
    label TEXT
);
CREATE INDEX IF NOT EXISTS slices_split ON slices (split, modality);
CREATE INDEX IF NOT EXISTS slices_patient ON slices (patient);
"""


@dataclass(frozen=True)
class NewSlice:
    """A slice ready for the store: normalised pixels plus pseudonymised provenance."""

    modality: str
    patient: str
    series: str
    position: float
    source_digest: str
    instance_key: str
    pixels: np.ndarray  # float32 [S, S] in [0, 1]
    unit: str
    scale: float
    offset: float
    spacing_mm: float | None = None
    label: str | None = None


@dataclass(frozen=True)
class SliceRecord:
    id: int
    modality: str
    patient: str
    series: str
    position: float
    source_digest: str
    instance_key: str
    pixel_digest: str
    split: str
    shard: str
    row: int
    size: int
    unit: str
    scale: float
    offset: float
    spacing_mm: float | None
    label: str | None


_COLUMNS = ", ".join(f.name for f in fields(SliceRecord))


@dataclass(frozen=True)
class SplitSummary:
    patients_train: int
    patients_holdout: int
    slices_train: int
    slices_holdout: int
    method: str  # "patients" or "slabs (single patient)"


def pixel_digest(pixels: np.ndarray) -> str:
    return sha256_hex(np.ascontiguousarray(pixels, dtype=np.float16).tobytes())


class Store:
    """Open (creating if needed) the store under ``root`` (``<home>/store``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "catalog.sqlite", timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        with self.db:
            self.db.executescript(_SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        self._cache: dict[str, np.ndarray] = {}

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------

    def known_instance_keys(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT instance_key FROM slices")}

    def add_batch(self, batch: Sequence[NewSlice]) -> int:
        """Store a batch atomically; rows whose instance_key is already known are skipped.

        Returns the number of slices added.
        """
        # Look up only this batch's keys: a full scan per batch would grow with the store.
        keys = sorted({item.instance_key for item in batch})
        known: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            known.update(row[0] for row in self.db.execute(
                f"SELECT instance_key FROM slices WHERE instance_key IN ({marks})", chunk))
        todo: list[NewSlice] = []
        seen: set[str] = set()
        for item in batch:
            if item.instance_key in known or item.instance_key in seen:
                continue
            seen.add(item.instance_key)
            todo.append(item)
        if not todo:
            return 0
        sizes = {s.pixels.shape for s in todo}
        if len(sizes) != 1 or len(next(iter(sizes))) != 2:
            raise StoreError(f"a batch must hold slices of one 2-D size, found {sorted(sizes)}")
        stack = np.stack([s.pixels for s in todo]).astype(np.float16)
        buffer = io.BytesIO()
        np.save(buffer, stack, allow_pickle=False)
        data = buffer.getvalue()
        name = hashlib.sha256(data).hexdigest()[:24] + ".npy"
        path = self.shards / name
        if not path.exists():
            atomic_write_bytes(path, data)
        rows = [
            (
                s.modality, s.patient, s.series, float(s.position), s.source_digest,
                s.instance_key, pixel_digest(stack[i]), name, i, stack.shape[1], s.unit,
                float(s.scale), float(s.offset), s.spacing_mm, s.label,
            )
            for i, s in enumerate(todo)
        ]
        with self.db:
            self.db.executemany(
                "INSERT INTO slices (modality, patient, series, position, source_digest,"
                " instance_key, pixel_digest, shard, row, size, unit, scale, offset,"
                " spacing_mm, label) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        return len(rows)

    def remove_orphan_shards(self) -> int:
        """Delete shards no row refers to (left by a killed ingest) and temp files."""
        used = {row[0] for row in self.db.execute("SELECT DISTINCT shard FROM slices")}
        removed = 0
        for path in self.shards.iterdir():
            if path.name not in used:
                path.unlink()
                removed += 1
        return removed

    def assign_split(
        self, holdout_fraction: float, rank_key: Callable[[str], str]
    ) -> SplitSummary:
        """Seeded patient-level split, recomputed over all patients.

        ``rank_key(patient) -> str`` is a keyed, seeded ordering (``Pseudonymiser.rank``); the
        first ``round(fraction * n)`` patients (at least one when there are two or more) are held
        out. A single-patient store is split by contiguous slabs: the last ``fraction`` of each
        series by position is held out, so no holdout slice is a neighbour of many train slices.
        """
        patients = [row[0] for row in self.db.execute("SELECT DISTINCT patient FROM slices")]
        if not patients:
            raise StoreError("the store is empty: ingest something first")
        updates: list[tuple[str, int]] = []
        if len(patients) >= 2:
            ordered = sorted(patients, key=rank_key)
            n_hold = round(holdout_fraction * len(patients))
            if holdout_fraction > 0:
                n_hold = min(max(n_hold, 1), len(patients) - 1)
            holdout = set(ordered[:n_hold])
            for pid, patient in self.db.execute("SELECT id, patient FROM slices"):
                updates.append(("holdout" if patient in holdout else "train", pid))
            method = "patients"
        else:
            series_rows: dict[str, list[tuple[float, int]]] = {}
            for pid, series, position in self.db.execute(
                "SELECT id, series, position FROM slices"
            ):
                series_rows.setdefault(series, []).append((position, pid))
            for rows in series_rows.values():
                rows.sort()
                n_hold = round(holdout_fraction * len(rows))
                if holdout_fraction > 0 and len(rows) >= 2:
                    n_hold = max(n_hold, 1)
                cut = len(rows) - n_hold
                updates.extend(("train" if i < cut else "holdout", pid) for i, (_, pid) in
                               enumerate(rows))
            method = "slabs (single patient)"
        with self.db:
            self.db.executemany("UPDATE slices SET split = ? WHERE id = ?", updates)
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('split_method', ?)", (method,)
            )
        counts = dict(
            self.db.execute(
                "SELECT split || ':' || 'p', COUNT(DISTINCT patient) FROM slices GROUP BY split"
            ).fetchall()
        )
        slices = dict(self.db.execute("SELECT split, COUNT(*) FROM slices GROUP BY split"))
        return SplitSummary(
            patients_train=int(counts.get("train:p", 0)),
            patients_holdout=int(counts.get("holdout:p", 0)),
            slices_train=int(slices.get("train", 0)),
            slices_holdout=int(slices.get("holdout", 0)),
            method=method,
        )

    # ---- reading -------------------------------------------------------------------------

    def records(
        self, split: str | None = None, modality: str | None = None
    ) -> list[SliceRecord]:
        """Catalog rows in a stable order (modality, patient, series, position, id)."""
        where, args = [], []
        if split is not None:
            if split not in ("train", "holdout"):
                raise StoreError(f"unknown split {split!r}")
            where.append("split = ?")
            args.append(split)
        if modality is not None:
            where.append("modality = ?")
            args.append(modality)
        sql = f"SELECT {_COLUMNS} FROM slices"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY modality, patient, series, position, id"
        return [SliceRecord(*row) for row in self.db.execute(sql, args)]

    def count(self, split: str | None = None, modality: str | None = None) -> int:
        return len(self.records(split, modality))

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._cache:
            path = self.shards / name
            if not path.exists():
                raise StoreError("shard missing from the store", str(path))
            self._cache[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._cache[name]

    def load(self, records: Iterable[SliceRecord]) -> np.ndarray:
        """Normalised pixels of ``records`` as float32 [N, S, S]."""
        recs = list(records)
        if not recs:
            return np.zeros((0, 0, 0), dtype=np.float32)
        sizes = {r.size for r in recs}
        if len(sizes) != 1:
            raise StoreError(
                f"the store holds slices of several sizes {sorted(sizes)}; "
                "one model grid per store"
            )
        # Each shard's rows in one gather, still float16; then one widening pass. Row by row
        # (a memory-map view and a float16 -> float32 copy each) this took 34 ms for 3,064
        # slices of 64x64, this way 11 ms (bench/RESULTS.md, 2026-12-08).
        half = np.empty((len(recs), recs[0].size, recs[0].size), dtype=np.float16)
        by_shard: dict[str, tuple[list[int], list[int]]] = {}
        for i, rec in enumerate(recs):
            at, rows = by_shard.setdefault(rec.shard, ([], []))
            at.append(i)
            rows.append(rec.row)
        for name, (at, rows) in by_shard.items():
            half[np.asarray(at)] = self._shard(name)[np.asarray(rows)]
        return _widen_half(half)

    def images(
        self, split: str, modality: str | None = None
    ) -> tuple[np.ndarray, list[SliceRecord]]:
        recs = self.records(split, modality)
        return self.load(recs), recs

    def image_size(self) -> int:
        sizes = [row[0] for row in self.db.execute("SELECT DISTINCT size FROM slices")]
        if not sizes:
            raise StoreError("the store is empty: ingest something first", str(self.root))
        if len(sizes) > 1:
            raise StoreError(
                f"the store holds slices of several sizes {sorted(sizes)}; "
                "one model grid per store",
                str(self.root),
            )
        return int(sizes[0])

    def modalities(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT modality, COUNT(*) FROM slices GROUP BY modality"))

    def split_digest(self, split: str = "train") -> str:
        """Digest of exactly which slices (and pixels) form a split; checkpoints carry it."""
        digest = hashlib.sha256()
        for key, pix in self.db.execute(
            "SELECT instance_key, pixel_digest FROM slices WHERE split = ? ORDER BY instance_key",
            (split,),
        ):
            digest.update(f"{key}:{pix}\n".encode())
        return digest.hexdigest()

    def physical_mapping(self, modality: str) -> tuple[float, float, str]:
        """(scale, offset, unit) turning a generated normalised image into physical units.

        CT has one fixed window; for MR / PET the median of the train slices' mappings.
        """
        rows = self.db.execute(
            "SELECT scale, offset, unit FROM slices WHERE modality = ? AND split = 'train'",
            (modality,),
        ).fetchall()
        if not rows:
            raise StoreError(f"no train slices of modality {modality}")
        scale = float(np.median([r[0] for r in rows]))
        offset = float(np.median([r[1] for r in rows]))
        units = {r[2] for r in rows}
        return scale, offset, units.pop() if len(units) == 1 else "mixed"

    def summary(self) -> dict[str, object]:
        q = self.db.execute
        return {
            "slices": q("SELECT COUNT(*) FROM slices").fetchone()[0],
            "patients": q("SELECT COUNT(DISTINCT patient) FROM slices").fetchone()[0],
            "series": q("SELECT COUNT(DISTINCT series) FROM slices").fetchone()[0],
            "by_modality": self.modalities(),
            "by_split": dict(q("SELECT split, COUNT(*) FROM slices GROUP BY split")),
        }


def _widen_half(half: np.ndarray) -> np.ndarray:
    """float16 -> float32, exactly. numpy's conversion runs at about 1.7 ns a value on our
    boxes; torch's (vectorised, on its threads) takes about a seventh of that (21 against 3 ms
    for 3,064 slices of 64x64), so it is used when a caller has already imported torch (the
    guard's encoder and the generator do; importing it here would cost a second to commands
    that need no network)."""
    torch = sys.modules.get("torch")
    if torch is None or half.size < 1 << 16:
        return half.astype(np.float32)
    out = np.empty(half.shape, dtype=np.float32)
    torch.from_numpy(out).copy_(torch.from_numpy(half))
    return out
