"""The in-toto Statement v1 that a bundle manifest carries, and its strict schema.

A statement binds the bundle's files (``subject``: name + sha256) to what a coordinator and a
reviewer need to know about them (``predicate``, type :data:`PREDICATE_TYPE`). Parsing is
strict: exact key sets, exact JSON types (``true`` is not a number, ``1.0`` is not a count),
finite numbers, safe subject names. Nothing here trusts the payload: call it only on a payload
whose signatures have been verified, and treat a failure as a refusal.

The predicate holds nothing per patient and nothing copied from a real header: site id, round,
time, software version, generator and guard summaries, image count, shape, dtype and unit.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from protocols.errors import VerificationError
from protocols.files import canonical_json

__all__ = [
    "STATEMENT_TYPE",
    "PREDICATE_TYPE",
    "MAX_STATEMENT_BYTES",
    "DICOM_DIR",
    "make_statement",
    "statement_bytes",
    "parse_statement",
    "check_subject_name",
    "validate_predicate",
]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
# Versioned: a change to the predicate's schema gets a new URI, and old verifiers refuse it.
PREDICATE_TYPE = "https://synthfed.org/bundle/v1"
MAX_STATEMENT_BYTES = 4 * 1024 * 1024
DICOM_DIR = "dicom"

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Plain file names only: letters, digits, dot, dash, underscore; no leading dot.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_MAX_DEPTH = 8
_MAX_SUBJECTS = 1_000_000

_PREDICATE_KEYS = {
    "bundle_id": str,
    "site": str,
    "round": (dict, type(None)),
    "created": str,
    "software": dict,
    "images": dict,
    "thresholds": dict,
    "canary_catch_rates": dict,
    "generator": dict,
    "guard": dict,
    "demo_auto_approved": bool,
}
_IMAGES_KEYS = {
    "file": str,
    "metadata": str,
    "count": int,
    "shape": list,
    "dtype": str,
    "unit": str,
    "modality": str,
    "encoding": str,
    "pixel_spacing_mm": (float, int, type(None)),
    "dicom": bool,
}
DTYPES = ("int16", "float16")


def _fail(reason: str, where: str) -> VerificationError:
    return VerificationError(f"statement schema: {reason}", where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def _check_exact(obj: Any, spec: Mapping[str, Any], what: str, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _fail(f"{what} is not an object", where)
    missing = sorted(set(spec) - set(obj))
    extra = sorted(set(obj) - set(spec))
    if missing:
        raise _fail(f"{what} lacks {', '.join(missing)}", where)
    if extra:
        raise _fail(f"{what} has unknown field(s) {', '.join(extra)}", where)
    for key, types in spec.items():
        value = obj[key]
        allowed = types if isinstance(types, tuple) else (types,)
        ok = isinstance(value, allowed)
        if ok and isinstance(value, bool) and bool not in allowed:
            ok = False  # JSON true/false is never a number or a count
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            raise _fail(f"{what}.{key} has the wrong type ({type(value).__name__})", where)
    return obj


def _check_json_tree(value: Any, what: str, where: str, depth: int = 0) -> None:
    """Free-form sections (generator, guard): plain JSON, finite numbers, bounded depth."""
    if depth > _MAX_DEPTH:
        raise _fail(f"{what} is nested too deeply", where)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(f"{what} has a non-string key", where)
            _check_json_tree(item, f"{what}.{key}", where, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_tree(item, f"{what}[{i}]", where, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(f"{what} is not a finite number", where)
    elif not (value is None or isinstance(value, (str, int, bool))):
        raise _fail(f"{what} is not JSON", where)


def _check_number_map(obj: dict[str, Any], what: str, where: str, unit_range: bool) -> None:
    for key, value in obj.items():
        if not key:
            raise _fail(f"{what} has an empty name", where)
        if not _is_number(value) or value < 0:
            raise _fail(f"{what}.{key} is not a non-negative number", where)
        if unit_range and value > 1:
            raise _fail(f"{what}.{key} is above 1", where)


def check_subject_name(name: Any, where: str = "statement") -> str:
    """A subject name is a plain file name, or ``dicom/<file>``: no '..', no absolute path."""
    if not isinstance(name, str) or not name:
        raise VerificationError("subject name is not a non-empty string", where)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise VerificationError(f"subject name {name!r} is an absolute path", where)
    parts = name.split("/")
    if any(p in ("..", ".") for p in parts) or "\\" in name:
        raise VerificationError(f"subject name {name!r} leaves the bundle ('..' or '.')", where)
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != DICOM_DIR):
        raise VerificationError(
            f"subject name {name!r} is nested; only {DICOM_DIR}/<file> may be", where
        )
    if not all(_NAME.fullmatch(p) for p in parts):
        raise VerificationError(f"subject name {name!r} has characters not allowed", where)
    return name


def validate_predicate(predicate: Any, where: str = "statement") -> dict[str, Any]:
    """Check the synthfed bundle predicate (v1) exactly; return it unchanged."""
    pred = _check_exact(predicate, _PREDICATE_KEYS, "predicate", where)
    for key in ("bundle_id", "site", "created"):
        if not pred[key]:
            raise _fail(f"predicate.{key} is empty", where)
    if pred["round"] is not None:
        rnd = _check_exact(pred["round"], {"id": str, "nonce": str}, "predicate.round", where)
        if not rnd["id"] or not rnd["nonce"]:
            raise _fail("predicate.round id and nonce must be non-empty", where)
    _check_exact(pred["software"], {"name": str, "version": str}, "predicate.software", where)
    images = _check_exact(pred["images"], _IMAGES_KEYS, "predicate.images", where)
    if images["dtype"] not in DTYPES:
        raise _fail(f"predicate.images.dtype {images['dtype']!r} is not one of {DTYPES}", where)
    shape = images["shape"]
    if len(shape) != 3 or not all(_is_int(s) and s > 0 for s in shape):
        raise _fail("predicate.images.shape must be three positive integers", where)
    if images["count"] != shape[0]:
        raise _fail("predicate.images.count differs from shape[0]", where)
    spacing = images["pixel_spacing_mm"]
    if spacing is not None and (not _is_number(spacing) or spacing <= 0):
        raise _fail("predicate.images.pixel_spacing_mm must be positive or null", where)
    for key in ("file", "metadata"):
        check_subject_name(images[key], where)
        if "/" in images[key]:
            raise _fail(f"predicate.images.{key} must be a top-level file", where)
    if images["file"] == images["metadata"]:
        raise _fail("predicate.images file and metadata must differ", where)
    if not images["unit"] or not images["modality"]:
        raise _fail("predicate.images unit and modality must be non-empty", where)
    if not pred["thresholds"]:
        raise _fail("predicate.thresholds is empty (no guard metric)", where)
    _check_number_map(pred["thresholds"], "predicate.thresholds", where, unit_range=False)
    _check_number_map(
        pred["canary_catch_rates"], "predicate.canary_catch_rates", where, unit_range=True
    )
    _check_json_tree(pred["generator"], "predicate.generator", where)
    _check_json_tree(pred["guard"], "predicate.guard", where)
    return pred


def make_statement(subjects: Mapping[str, str], predicate: dict[str, Any]) -> dict[str, Any]:
    """Build a Statement v1 over ``subjects`` (name -> sha256 hex); validates as it builds."""
    for name, digest in subjects.items():
        check_subject_name(name, "subjects")
        if not _HEX64.fullmatch(digest):
            raise VerificationError(f"digest of {name!r} is not a sha256 hex", "subjects")
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": subjects[n]}} for n in sorted(subjects)],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }
    # Round-trip through the parser so a statement we would refuse is never signed.
    parse_statement(statement_bytes(statement), "new statement")
    return statement


def statement_bytes(statement: dict[str, Any]) -> bytes:
    return canonical_json(statement)


def parse_statement(payload: bytes, where: str = "statement") -> dict[str, Any]:
    """Parse and validate a payload; return the statement only if every rule holds."""
    if len(payload) > MAX_STATEMENT_BYTES:
        raise VerificationError(
            f"statement is {len(payload)} bytes, over the {MAX_STATEMENT_BYTES} byte limit",
            where,
        )
    try:
        obj = json.loads(payload, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise VerificationError(f"statement is not valid JSON ({exc})", where) from None
    stmt = _check_exact(
        obj,
        {"_type": str, "subject": list, "predicateType": str, "predicate": dict},
        "statement",
        where,
    )
    if stmt["_type"] != STATEMENT_TYPE:
        raise _fail(f"_type is {stmt['_type']!r}, expected {STATEMENT_TYPE!r}", where)
    if stmt["predicateType"] != PREDICATE_TYPE:
        raise _fail(
            f"predicateType is {stmt['predicateType']!r}, expected {PREDICATE_TYPE!r}", where
        )
    if not stmt["subject"]:
        raise _fail("subject list is empty", where)
    if len(stmt["subject"]) > _MAX_SUBJECTS:
        raise _fail("subject list is too long", where)
    seen: set[str] = set()
    for item in stmt["subject"]:
        entry = _check_exact(item, {"name": str, "digest": dict}, "subject entry", where)
        name = check_subject_name(entry["name"], where)
        digest = _check_exact(entry["digest"], {"sha256": str}, f"digest of {name}", where)
        if not _HEX64.fullmatch(digest["sha256"]):
            raise _fail(f"digest of {name} is not a lowercase sha256 hex", where)
        if name in seen:
            raise VerificationError(f"subject {name!r} is listed twice", where)
        seen.add(name)
    validate_predicate(stmt["predicate"], where)
    return stmt


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
