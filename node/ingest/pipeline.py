"""Ingest: walk the sources, read every file, pseudonymise, normalise, store, split, audit.

The pipeline is the one place where ingest touches files: sources are only ever opened for
reading (their bytes are read once, hashed and parsed in memory), the store is written in
crash-safe batches (``Store.add_batch``), and a killed run is simply run again: instances
already stored are recognised by their keyed instance key and not even decoded.

Raw identifiers (PatientID, UIDs, file-name patient ids) exist only in memory, between the
reader and the pseudonymiser. Nothing written by this module (store rows, audit record,
summary) holds one: skip reasons come from a fixed vocabulary, the audit record holds counts
and a digest of the source list.
"""

from __future__ import annotations

import csv
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.config import NodeConfig, NodePaths
from node.errors import IngestError
from node.ingest.dicom import MODALITIES, DicomObject, Skipped, open_dicom
from node.ingest.images import IMAGE_SUFFIXES, is_image_bytes, read_image
from node.ingest.nifti import is_nifti_name, read_nifti
from node.ingest.normalise import intensity_window, normalise_slice
from node.pseudonym import Pseudonymiser
from node.store import NewSlice, Store
from protocols.audit import append_audit
from protocols.files import canonical_json, sha256_hex

__all__ = [
    "IngestSummary",
    "PatientRule",
    "parse_patient_rule",
    "ingest_sources",
    "BATCH_SLICES",
    "ERROR_REASONS",
]

BATCH_SLICES = 256
PLANE_CHOICES = ("axial", "sagittal", "coronal", "any")
MAX_FILE_BYTES = 2 << 30

# Files that are certainly not images; skipped without parsing (a DICOM file with a preamble
# is still recognised whatever its name).
_DOCUMENT_SUFFIXES = frozenset(
    ".txt .md .rst .csv .tsv .json .xml .html .htm .pdf .py .nfo .log .yaml .yml .ini .cfg"
    " .zip .tar .gz .bz2 .xz .7z .mat .doc .docx .xls .xlsx .sh .bat .exe .dll .so".split()
)

NOT_IN_CSV = "not in patients CSV"
NO_PATTERN_MATCH = "patient pattern does not match"
RULE_MISSES = (NOT_IN_CSV, NO_PATTERN_MATCH)  # the patient rule found no patient for a file
# Skip reasons that mean "could not be read at all" (as opposed to "read, not wanted").
ERROR_REASONS = ("unreadable", "corrupt or truncated", "not DICOM or a known image format",
                 "not an image file", "decode failed", "file too large")


@dataclass(frozen=True)
class PatientRule:
    """How a PNG / JPEG / NIfTI file gets its patient: 'folder', 'pattern:<re>', 'csv:<path>'."""

    kind: str
    pattern: re.Pattern[str] | None = None
    table: dict[Path, tuple[str, str | None]] | None = None
    csv_path: Path | None = None
    merge: re.Pattern[str] | None = None  # ids matching it in full become its group 1

    def merged(self, patient: str) -> str:
        if self.merge is not None:
            match = self.merge.fullmatch(patient)
            if match is not None and match.group(1):
                return match.group(1)
        return patient

    def describe(self) -> str:
        return self.kind


def parse_patient_rule(
    text: str, label_column: str | None = None, merge: str | None = None
) -> PatientRule:
    """Parse ``--patient-rule`` (and ``--patient-merge``); a bad one is an IngestError."""
    rule = _parse_rule(text, label_column)
    if merge is None:
        return rule
    try:
        pattern = re.compile(merge)
    except re.error as exc:
        raise IngestError(f"bad merge pattern: {exc}", "--patient-merge") from None
    if pattern.groups < 1:
        raise IngestError("the merge pattern needs a group, e.g. ^(MR\\d+)[A-Z]$",
                          "--patient-merge")
    return PatientRule(rule.kind, rule.pattern, rule.table, rule.csv_path, pattern)


def _parse_rule(text: str, label_column: str | None) -> PatientRule:
    if text == "folder":
        if label_column:
            raise IngestError("--label-column needs a csv: patient rule", "--label-column")
        return PatientRule("folder")
    if text.startswith("pattern:"):
        if label_column:
            raise IngestError("--label-column needs a csv: patient rule", "--label-column")
        try:
            pattern = re.compile(text[len("pattern:"):])
        except re.error as exc:
            raise IngestError(f"bad patient pattern: {exc}", "--patient-rule") from None
        if pattern.groups < 1:
            raise IngestError("the patient pattern needs a group, e.g. pattern:^(\\w+)/",
                              "--patient-rule")
        return PatientRule("pattern", pattern=pattern)
    if text.startswith("csv:"):
        path = Path(text[len("csv:"):]).expanduser()
        return PatientRule("csv", table=_read_patient_csv(path, label_column),
                           csv_path=_real(path))
    raise IngestError(
        f"unknown patient rule {text!r}: use folder, pattern:<regex> or csv:<path>",
        "--patient-rule",
    )


def _real(path: Path) -> Path:
    """One spelling per file (symlinks and '..' resolved) to match CSV rows to files."""
    return Path(os.path.realpath(path))


def _read_patient_csv(path: Path, label_column: str | None) -> dict[Path, tuple[str, str | None]]:
    if not path.is_file():
        raise IngestError("patients CSV does not exist", str(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for needed in ("file", "patient_id"):
                if needed not in columns:
                    raise IngestError(f"patients CSV has no column {needed!r}", str(path))
            label = label_column or ("label" if "label" in columns else None)
            if label is not None and label not in columns:
                raise IngestError(f"patients CSV has no column {label!r}", "--label-column")
            table: dict[Path, tuple[str, str | None]] = {}
            for row in reader:
                name = (row.get("file") or "").strip()
                patient = (row.get("patient_id") or "").strip()
                if not name or not patient:
                    continue
                target = Path(name)
                if not target.is_absolute():
                    target = path.parent / target
                value = (row.get(label) or "").strip() if label else ""
                table[_real(target)] = (patient, value or None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"cannot read patients CSV: {type(exc).__name__}", str(path)) from None
    return table


@dataclass
class IngestSummary:
    """What one ingest run did. Counts only: no identifier, no file name."""

    files: int = 0
    slices: int = 0
    patients: int = 0
    series: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    by_modality: dict[str, int] = field(default_factory=dict)
    slices_added: int = 0
    already_stored: int = 0
    duplicates: int = 0
    identical_pixel_instances: int = 0
    units: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    patient_fallback: dict[str, int] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)
    plane: str = "axial"
    image_size: int = 64
    sources: int = 0
    seconds: float = 0.0

    @property
    def slices_per_s(self) -> float:
        return self.slices_added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "slices": self.slices,
            "patients": self.patients,
            "series": self.series,
            "skipped": dict(sorted(self.skipped.items())),
            "by_modality": dict(sorted(self.by_modality.items())),
            "slices_added": self.slices_added,
            "already_stored": self.already_stored,
            "duplicates": self.duplicates,
            "identical_pixel_instances": self.identical_pixel_instances,
            "units": dict(sorted(self.units.items())),
            "notes": list(self.notes),
            "patient_fallback": dict(sorted(self.patient_fallback.items())),
            "split": dict(self.split),
            "store": dict(self.store),
            "plane": self.plane,
            "image_size": self.image_size,
            "sources": self.sources,
            "seconds": round(self.seconds, 3),
            "slices_per_s": round(self.slices_per_s, 2),
        }

    def human(self) -> str:
        modalities = ", ".join(f"{m} {n}" for m, n in sorted(self.by_modality.items())) or "none"
        lines = [
            f"ingested {self.files} files from {self.sources} source(s) in {self.seconds:.1f} s"
            f" ({self.slices_per_s:.1f} new slices/s; plane {self.plane},"
            f" grid {self.image_size}x{self.image_size})",
            f"  slices: {self.slices} ({self.slices_added} new, {self.already_stored} already"
            f" stored) of {self.patients} patient(s), {self.series} series; by modality:"
            f" {modalities}",
        ]
        n_skipped = sum(self.skipped.values())
        if n_skipped:
            reasons = "; ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items()))
            lines.append(f"  skipped: {n_skipped} (files or frames) - {reasons}")
        else:
            lines.append("  skipped: none")
        if self.duplicates:
            lines.append(f"  duplicates: {self.duplicates} files or frames repeat an instance"
                         " already read in this run")
        if self.identical_pixel_instances:
            lines.append(f"  identical pixels: {self.identical_pixel_instances} distinct"
                         " instances carry the same pixels as another one (kept, they are"
                         " distinct instances)")
        if self.units:
            lines.append("  units: " + ", ".join(f"{u} {n}" for u, n in sorted(self.units.items())))
        if self.split:
            s = self.split
            lines.append(
                f"  split by {s['method']}: train {s['patients_train']} patient(s) /"
                f" {s['slices_train']} slices, holdout {s['patients_holdout']} patient(s) /"
                f" {s['slices_holdout']} slices"
            )
        if self.store:
            lines.append(f"  store now holds {self.store.get('slices', 0)} slices of"
                         f" {self.store.get('patients', 0)} patient(s)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


@dataclass
class _Job:
    path: Path
    root: Path  # the source it came from (a folder, or the file itself)
    named: bool  # given directly on the command line


@dataclass
class _Run:
    """Mutable state of one run."""

    pseudonymiser: Pseudonymiser
    store: Store
    config: NodeConfig
    plane: str
    modality: str | None
    rule: PatientRule
    known: set[str]
    summary: IngestSummary
    batch: list[NewSlice] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    patients: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    by_modality: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    units: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    fallback: Counter[str] = field(default_factory=Counter)
    pixel_groups: dict[str, set[str]] = field(default_factory=dict)
    added: int = 0
    already: int = 0
    duplicates: int = 0
    unoriented: int = 0
    named_errors: list[tuple[str, str]] = field(default_factory=list)
    unmatched: _Job | None = None  # the first image file the patient rule finds no patient for

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] += count
        if reason == "duplicate instance":
            self.duplicates += count

    def flush(self) -> None:
        if self.batch:
            self.added += self.store.add_batch(self.batch)
            self.batch = []


def _read_source_bytes(path: Path) -> bytes:
    """The one place a source file is opened: read-only, whole, never written."""
    with open(path, "rb") as handle:
        return handle.read()


def _walk(source: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            yield Path(folder) / name


def _collect_jobs(sources: list[Path], exclude: set[Path]) -> list[_Job]:
    if not sources:
        raise IngestError("no source given: name at least one file or folder")
    jobs: list[_Job] = []
    for source in sources:
        if not os.path.lexists(source) or not source.exists():
            raise IngestError("source does not exist", str(source))
        if source.is_dir():
            found = [p for p in _walk(source) if not exclude or _real(p) not in exclude]
            if not found:
                raise IngestError("source folder holds no files", str(source))
            jobs.extend(_Job(p, source, False) for p in found)
        elif source.is_file():
            if not os.access(source, os.R_OK):
                raise IngestError("source file cannot be read (permission denied)", str(source))
            jobs.append(_Job(source, source, True))
        else:
            raise IngestError("source is neither a file nor a folder", str(source))
    return jobs


def _position_from_name(path: Path, fallback: int) -> float:
    numbers = re.findall(r"\d+", path.stem if not path.name.endswith(".gz") else
                         Path(path.stem).stem)
    return float(numbers[-1]) if numbers else float(fallback)


def _patient_of(job: _Job, rule: PatientRule) -> tuple[str, str | None]:
    """(raw patient id, label) for an image / NIfTI file; raises :class:`Skipped`."""
    patient, label = _rule_patient(job, rule)
    return rule.merged(patient), label


def _rule_patient(job: _Job, rule: PatientRule) -> tuple[str, str | None]:
    if rule.kind == "csv":
        assert rule.table is not None
        entry = rule.table.get(_real(job.path))
        if entry is None:
            raise Skipped(NOT_IN_CSV)
        return entry
    relative = job.path.relative_to(job.root).as_posix() if not job.named else job.path.name
    if rule.kind == "pattern":
        assert rule.pattern is not None
        match = rule.pattern.search(relative)
        if match is None:
            raise Skipped(NO_PATTERN_MATCH)
        value = match.groupdict().get("patient") or match.group(1)
        if not value:
            raise Skipped(NO_PATTERN_MATCH)
        return value, None
    parent = job.path.parent
    if job.named or parent == job.root:
        return (job.root.name if not job.named else parent.name) or "root", None
    return parent.relative_to(job.root).as_posix(), None


def _ingest_slice(
    run: _Run,
    *,
    values: np.ndarray,
    modality: str,
    unit: str,
    fixed_window: bool,
    spacing: tuple[float, float] | None,
    patient: str,
    series: str,
    instance_key: str,
    position: float,
    source_digest: str,
    label: str | None,
) -> None:
    settings = run.config.store
    window = intensity_window(
        values, modality, ct_window_hu=settings.ct_window_hu,
        percentiles=settings.mr_percentiles, fixed_window=fixed_window,
    )
    if window is None:
        run.skip("empty slice")
        return
    normalised = normalise_slice(values, window, int(settings.image_size), spacing)
    if normalised.nonzero_fraction < settings.min_nonzero_fraction:
        run.skip("empty slice")
        return
    # Digest of the physical values as read (native dtype), to report distinct instances
    # that carry identical pixels.
    digest = sha256_hex(f"{values.dtype.str}{values.shape}".encode()
                        + np.ascontiguousarray(values).tobytes())
    run.pixel_groups.setdefault(digest, set()).add(instance_key)
    run.seen.add(instance_key)
    run.patients.add(patient)
    run.series.add(series)
    run.by_modality[modality] += 1
    run.units[unit] += 1
    run.batch.append(
        NewSlice(
            modality=modality,
            patient=patient,
            series=series,
            position=position if np.isfinite(position) else 0.0,
            source_digest=source_digest,
            instance_key=instance_key,
            pixels=normalised.pixels,
            unit=unit,
            scale=normalised.scale,
            offset=normalised.offset,
            spacing_mm=normalised.spacing_mm,
            label=label,
        )
    )
    if len(run.batch) >= BATCH_SLICES:
        run.flush()


def _already(run: _Run, key: str, patient: str, series: str, modality: str) -> bool:
    """True (and counted) when ``key`` was read earlier in this run or is already stored."""
    if key in run.seen:
        run.skip("duplicate instance")
        return True
    if key in run.known:
        run.seen.add(key)
        run.already += 1
        run.patients.add(patient)
        run.series.add(series)
        run.by_modality[modality] += 1
        return True
    return False


def _ingest_dicom(run: _Run, data: bytes, digest: str) -> None:
    obj: DicomObject = open_dicom(data, digest)
    if run.modality is not None and obj.modality != run.modality:
        raise Skipped(f"modality not requested ({obj.modality})")
    pseud = run.pseudonymiser
    patient = pseud.patient(obj.patient_id)
    series = pseud.series(obj.series_uid)
    if obj.patient_fallback:
        run.fallback[obj.patient_fallback] += 1
    if obj.unit_note:
        run.notes[f"{obj.modality} stored in {obj.unit}, not SUV: {obj.unit_note}"] += 1
    for frame in obj.frames:
        if run.plane != "any" and frame.plane != run.plane:
            run.skip(f"plane:{frame.plane}")
            continue
        key = pseud.instance(frame.instance_uid)
        if _already(run, key, patient, series, obj.modality):
            continue
        try:
            values = obj.values(frame.index)
        except Skipped as skip:
            # A decode failure concerns every remaining frame of the object.
            remaining = sum(1 for f in obj.frames[frame.index:]
                            if run.plane == "any" or f.plane == run.plane)
            run.skip(skip.reason, remaining)
            return
        _ingest_slice(
            run, values=values, modality=obj.modality, unit=obj.unit,
            fixed_window=obj.fixed_window, spacing=frame.spacing_mm, patient=patient,
            series=series, instance_key=key, position=frame.position, source_digest=digest,
            label=None,
        )


def _ingest_image(run: _Run, job: _Job, data: bytes, digest: str, index: int) -> None:
    if run.modality is None:
        raise Skipped("image file without --modality")
    raw_patient, label = _patient_of(job, run.rule)
    pseud = run.pseudonymiser
    patient = pseud.patient(raw_patient)
    folder = job.path.parent.relative_to(job.root).as_posix() if not job.named else "."
    series = pseud.series(f"images\x00{raw_patient}\x00{folder}")
    key = pseud.instance("sha256:" + digest)
    if _already(run, key, patient, series, run.modality):
        return
    values = read_image(data)
    run.unoriented += 1
    _ingest_slice(
        run, values=values, modality=run.modality, unit="pixel value", fixed_window=False,
        spacing=None, patient=patient, series=series, instance_key=key,
        position=_position_from_name(job.path, index), source_digest=digest, label=label,
    )


def _ingest_nifti(run: _Run, job: _Job, data: bytes, digest: str) -> None:
    if run.modality is None:
        raise Skipped("image file without --modality")
    raw_patient, label = _patient_of(job, run.rule)
    pseud = run.pseudonymiser
    patient = pseud.patient(raw_patient)
    series = pseud.series("nifti:" + digest)
    plane = run.plane if run.plane != "any" else "axial"
    volume = read_nifti(data, plane)
    for item in volume:
        key = pseud.instance(f"sha256:{digest}:{plane}:{item.index}")
        if _already(run, key, patient, series, run.modality):
            continue
        fixed = run.modality == "CT"  # NIfTI CT volumes are conventionally in HU
        _ingest_slice(
            run, values=item.values, modality=run.modality,
            unit="HU" if fixed else "a.u.", fixed_window=fixed, spacing=item.spacing_mm,
            patient=patient, series=series, instance_key=key, position=item.position,
            source_digest=digest, label=label,
        )


def _ingest_file(run: _Run, job: _Job, index: int) -> None:
    try:
        if job.path.stat().st_size > MAX_FILE_BYTES:
            raise Skipped("file too large")
        data = _read_source_bytes(job.path)
    except Skipped:
        raise
    except OSError:
        raise Skipped("unreadable") from None
    digest = sha256_hex(data)
    name = job.path.name
    suffix = job.path.suffix.lower()
    if len(data) >= 132 and data[128:132] == b"DICM":
        _ingest_dicom(run, data, digest)
    elif is_image_bytes(data[:8]) or suffix in IMAGE_SUFFIXES:
        _ingest_image(run, job, data, digest, index)
    elif is_nifti_name(name):
        _ingest_nifti(run, job, data, digest)
    elif suffix in _DOCUMENT_SUFFIXES:
        raise Skipped("not an image file")
    else:
        _ingest_dicom(run, data, digest)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Small per-slice resizes are slower with several threads on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(enabled: bool, total: int) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled, transient=True,
    )


def ingest_sources(
    paths: NodePaths,
    config: NodeConfig,
    sources: list[Path],
    *,
    plane: str | None = None,
    modality: str | None = None,
    patient_rule: str = "folder",
    label_column: str | None = None,
    patient_merge: str | None = None,
    progress: bool = True,
) -> IngestSummary:
    """Ingest DICOM files / folders, PNG / JPEG folders and NIfTI volumes into the store.

    ``plane`` overrides ``config.store.plane``; ``modality`` is required for PNG / JPEG / NIfTI
    (for DICOM it keeps only that modality); ``patient_rule`` gives the patient of a PNG / JPEG
    / NIfTI file: ``folder`` (its parent folder), ``pattern:<regex>`` (group 1, or the group
    named ``patient``, searched in the path relative to the source) or ``csv:<path>`` (columns
    file, patient_id[, label]; ``file`` relative to the CSV's folder). ``patient_merge`` is a
    regex: a PNG / JPEG / NIfTI patient id matching it in full is replaced by its group 1
    (e.g. ``^(MR\\d+)[A-Z]$`` joins Cheng's MR040240B with MR040240, which may be one person:
    the cautious choice for a split that must not leak a patient).
    """
    started = time.perf_counter()
    chosen_plane = plane or config.store.plane
    if chosen_plane not in PLANE_CHOICES:
        raise IngestError(f"unknown plane {chosen_plane!r}: use {', '.join(PLANE_CHOICES)}",
                          "--plane")
    if modality is not None:
        modality = modality.upper()
        if modality not in MODALITIES:
            raise IngestError(f"unknown modality {modality!r}: use {', '.join(MODALITIES)}",
                              "--modality")
    rule = parse_patient_rule(patient_rule, label_column, patient_merge)
    sources = [Path(s).expanduser() for s in sources]
    exclude = {rule.csv_path} if rule.csv_path is not None else set()
    jobs = _collect_jobs(sources, exclude)

    pseudonymiser = Pseudonymiser.from_file(paths.pseudonym_secret)
    summary = IngestSummary(plane=chosen_plane, image_size=int(config.store.image_size),
                            sources=len(sources), files=len(jobs))
    with Store(paths.store) as store, _torch_threads(1):
        store.remove_orphan_shards()
        run = _Run(pseudonymiser=pseudonymiser, store=store, config=config,
                   plane=chosen_plane, modality=modality, rule=rule,
                   known=store.known_instance_keys(), summary=summary)
        with _progress(progress, len(jobs)) as bar:
            task = bar.add_task("ingest", total=len(jobs))
            for index, job in enumerate(jobs):
                try:
                    _ingest_file(run, job, index)
                except Skipped as skip:
                    run.skip(skip.reason)
                    if job.named and skip.reason.startswith(ERROR_REASONS):
                        run.named_errors.append((skip.reason, str(job.path)))
                    if skip.reason in RULE_MISSES and run.unmatched is None:
                        run.unmatched = job
                bar.advance(task)
        run.flush()
        _finish(run, summary, sources)
        if summary.slices == 0 and run.skipped and all(
            reason.startswith(ERROR_REASONS) for reason in run.skipped
        ):
            reason, where = (run.named_errors[0] if run.named_errors else
                             (sorted(run.skipped)[0], str(sources[0]) if len(sources) == 1
                              else f"{len(sources)} sources"))
            raise IngestError(f"no image could be read: {sum(run.skipped.values())} file(s)"
                              f" skipped, e.g. as {reason!r}", where)
        read_but_unwanted = [r for r in run.skipped
                             if r not in RULE_MISSES and not r.startswith(ERROR_REASONS)]
        if summary.slices == 0 and run.unmatched is not None and not read_but_unwanted:
            missed = sum(run.skipped[r] for r in RULE_MISSES)
            raise IngestError(_rule_mismatch(rule, missed, run.unmatched),
                              str(rule.csv_path or "--patient-rule"))
        if store.count() > 0:
            split = store.assign_split(
                config.store.holdout_fraction,
                lambda p: pseudonymiser.rank(config.store.split_seed, p),
            )
            summary.split = {
                "method": split.method,
                "patients_train": split.patients_train,
                "patients_holdout": split.patients_holdout,
                "slices_train": split.slices_train,
                "slices_holdout": split.slices_holdout,
            }
            summary.store = store.summary()
    summary.seconds = time.perf_counter() - started
    append_audit(paths.audit, "ingest", _audit_details(summary, sources))
    return summary


def _rule_mismatch(rule: PatientRule, missed: int, example: _Job) -> str:
    """Why nothing was stored when the patient rule finds a patient for none of the images:
    almost always a CSV whose relative paths are read against another folder than meant, or
    a pattern written for another layout. Says what the rule sees for the first image."""
    if rule.kind == "csv":
        assert rule.table is not None and rule.csv_path is not None
        named = next(iter(rule.table), None)
        said = f"; its first row names {named}" if named is not None else "; it names no file"
        return (f"the patients CSV names none of the {missed} image file(s) found (e.g."
                f" {_real(example.path)}){said}. Relative paths in its 'file' column are read"
                f" from the CSV's own folder ({rule.csv_path.parent}); move the CSV beside the"
                " images or give absolute paths")
    assert rule.pattern is not None
    seen = (example.path.name if example.named
            else example.path.relative_to(example.root).as_posix())
    return (f"the patient pattern {rule.pattern.pattern!r} finds a patient in none of the"
            f" {missed} image file(s) found; it is searched in each file's path relative to"
            f" the source folder given (e.g. {seen!r}) and its first group is the patient")


def _finish(run: _Run, summary: IngestSummary, sources: list[Path]) -> None:
    summary.slices = run.added + run.already
    summary.slices_added = run.added
    summary.already_stored = run.already
    summary.patients = len(run.patients)
    summary.series = len(run.series)
    summary.by_modality = dict(run.by_modality)
    summary.skipped = dict(run.skipped)
    summary.duplicates = run.duplicates
    summary.units = dict(run.units)
    summary.patient_fallback = dict(run.fallback)
    summary.identical_pixel_instances = sum(
        len(keys) for keys in run.pixel_groups.values() if len(keys) > 1
    )
    notes = [f"{text} ({n} files)" for text, n in sorted(run.notes.items())]
    if run.unoriented and run.plane != "any":
        notes.append(f"{run.unoriented} PNG/JPEG/TIFF slices carry no orientation; stored"
                     f" without checking the {run.plane} plane")
    for kind, n in sorted(run.fallback.items()):
        notes.append(f"{n} DICOM files have no PatientID; patient taken from the {kind}")
    if run.skipped.get("image file without --modality"):
        notes.append("PNG/JPEG/NIfTI files need --modality CT|MR|PT")
    summary.notes = notes


_AUDITED_COUNTS = ("files", "slices", "slices_added", "patients", "series", "by_modality",
                   "skipped", "plane", "image_size")


def _audit_details(summary: IngestSummary, sources: list[Path]) -> dict[str, Any]:
    """Counts only, plus a digest of the source list (paths may name patients)."""
    listing = sorted(str(Path(s).absolute()) for s in sources)
    counts = summary.to_dict()
    return {
        "sources": len(sources),
        "sources_digest": sha256_hex(canonical_json(listing)),
        **{key: counts[key] for key in _AUDITED_COUNTS},
        "split_method": summary.split.get("method"),
    }
