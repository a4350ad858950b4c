"""The bundle: a folder of synthetic images with a signed DSSE / in-toto manifest.

Layout (every file except the manifest is a subject of the statement, with its sha256)::

    <bundle-id>/
      images.npy          int16 (HU, rounded) or float16, shape [N, H, W], physical units
      images.jsonl        one line per image: index, modality, size, pixel_spacing_mm, distances
      review.html         the self-contained review report the reviewer signed off
      dicom/NNNNNN.dcm    optional, one file per image
      manifest.dsse.json  DSSE envelope (application/vnd.in-toto+json) holding the statement

:func:`verify_bundle` is the only door to a bundle's contents. It checks, in this order and
fail-closed: size caps before any parse, the envelope's strict form, every signature (all from
trusted keys of one site, the site key among them), the statement's schema, the round, safe
subject names, that no file is missing or extra, the policy's size caps (before hashing), every
digest (streamed), the array header and the metadata lines, then the policy's signers, floors
and canary minimums. It returns a :class:`VerifiedBundle` only after every check passed; each
failure is a :class:`~protocols.errors.VerificationError` with its own reason.

This module must stay light: no numpy at import (``synthfed-manifest verify`` reads the array
header itself), no torch.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols.dsse import IN_TOTO_PAYLOAD_TYPE, Envelope, parse_envelope, verify_envelope
from protocols.errors import VerificationError
from protocols.files import sha256_file, sha256_hex
from protocols.keys import PublicKey
from protocols.policy import Policy
from protocols.statement import DICOM_DIR, check_subject_name, parse_statement
from protocols.trust import TrustStore

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "MANIFEST",
    "IMAGES",
    "METADATA",
    "REVIEW",
    "DICOM_DIR",
    "MAX_MANIFEST_BYTES",
    "MAX_METADATA_LINE_BYTES",
    "NPY_DESCR",
    "VerifiedBundle",
    "verify_bundle",
    "load_bundle_images",
    "read_unverified",
    "read_npy_header",
    "parse_metadata_line",
]

MANIFEST = "manifest.dsse.json"
IMAGES = "images.npy"
METADATA = "images.jsonl"
REVIEW = "review.html"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_METADATA_LINE_BYTES = 4096
MAX_NPY_HEADER_BYTES = 65536
NPY_DESCR = {"int16": "<i2", "float16": "<f2"}
_METADATA_KEYS = {"index", "modality", "size", "pixel_spacing_mm", "distances"}


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check; the only thing readers should accept."""

    statement: dict[str, Any]
    predicate: dict[str, Any]
    site: str
    signers: frozenset[str]
    path: Path
    digest: str  # sha256 of manifest.dsse.json as verified
    images_file: str
    n_images: int
    modality: str
    unit: str
    reviewer_signers: frozenset[str] = frozenset()
    subjects: dict[str, str] = field(default_factory=dict)
    dtype: str = "float16"
    shape: tuple[int, int, int] = (0, 0, 0)
    bundle_id: str = ""
    round: tuple[str, str] | None = None
    total_bytes: int = 0

    def summary(self) -> dict[str, Any]:
        """What ``verify`` prints: nothing here is per patient."""
        pred = self.predicate
        return {
            "ok": True,
            "bundle_id": self.bundle_id,
            "site": self.site,
            "round": None if self.round is None else {"id": self.round[0], "nonce": self.round[1]},
            "created": pred["created"],
            "images": self.n_images,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "modality": self.modality,
            "unit": self.unit,
            "thresholds": pred["thresholds"],
            "canary_catch_rates": pred["canary_catch_rates"],
            "signers": sorted(self.signers),
            "reviewer_signatures": len(self.reviewer_signers),
            "demo_auto_approved": pred["demo_auto_approved"],
            "manifest_sha256": self.digest,
            "files": len(self.subjects),
            "bytes": self.total_bytes,
        }


def _fail(reason: str, where: str) -> VerificationError:
    return VerificationError(reason, where)


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    """Read a whole small file, refusing (before parsing) anything over ``limit`` bytes."""
    where = str(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise _fail(f"{what} is missing", where) from None
    if not stat.S_ISREG(info.st_mode):
        raise _fail(f"{what} is not a regular file", where)
    if info.st_size > limit:
        raise _fail(f"{what} is {info.st_size} bytes, over the {limit} byte limit", where)
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise _fail(f"{what} grew over the {limit} byte limit while read", where)
    return data


def read_unverified(path: str | os.PathLike[str]) -> tuple[Envelope, dict[str, Any]]:
    """The envelope and statement WITHOUT checking signatures or files (for ``show``)."""
    root = Path(path)
    data = _read_capped(root / MANIFEST, MAX_MANIFEST_BYTES, "manifest")
    envelope = parse_envelope(data, str(root / MANIFEST))
    return envelope, parse_statement(envelope.payload, str(root / MANIFEST))


# -- signatures ---------------------------------------------------------------------------


def _trusted_keys(
    envelope: Envelope, trust: TrustStore | Mapping[str, PublicKey], where: str
) -> tuple[str | None, str | None, dict[str, PublicKey]]:
    """(site, site keyid, keyid -> key) allowed to have signed this envelope."""
    if not isinstance(trust, TrustStore):
        # Bare keys carry no roles: any of them may sign; the site is the statement's.
        return None, None, dict(trust)
    sites: set[str] = set()
    for keyid, _sig in envelope.signatures:
        site = trust.site_of(keyid)
        if site is None:
            raise _fail(f"signed by an unknown key {keyid[:16]}", where)
        sites.add(site)
    if len(sites) > 1:
        raise _fail(f"signatures come from more than one site ({', '.join(sorted(sites))})", where)
    if not sites:
        raise _fail("envelope carries no signature", where)
    (site,) = sites
    entry = trust.site(site)
    assert entry is not None
    return site, entry.site_key.keyid, entry.keys()


# -- files --------------------------------------------------------------------------------


def _list_files(root: Path, where: str) -> dict[str, int]:
    """Every file of the bundle except the manifest (name -> size); no links, no deep dirs."""
    found: dict[str, int] = {}
    for entry in os.scandir(root):
        if entry.name == MANIFEST:
            continue
        if entry.is_symlink():
            raise _fail(f"{entry.name} is a symbolic link", where)
        if entry.is_dir(follow_symlinks=False):
            if entry.name != DICOM_DIR:
                raise _fail(f"folder {entry.name}/ is not part of the bundle format", where)
            for sub in os.scandir(entry.path):
                name = f"{DICOM_DIR}/{sub.name}"
                if sub.is_symlink() or not sub.is_file(follow_symlinks=False):
                    raise _fail(f"{name} is not a regular file", where)
                found[name] = sub.stat(follow_symlinks=False).st_size
        elif entry.is_file(follow_symlinks=False):
            found[entry.name] = entry.stat(follow_symlinks=False).st_size
        else:
            raise _fail(f"{entry.name} is not a regular file", where)
    return found


def read_npy_header(path: Path) -> tuple[str, bool, tuple[int, ...], int]:
    """(descr, fortran_order, shape, data offset) of a .npy file, parsed without numpy."""
    where = str(path)
    with open(path, "rb") as handle:
        head = handle.read(10)
        if len(head) < 10 or head[:6] != b"\x93NUMPY":
            raise _fail("images file is not a .npy array", where)
        major = head[6]
        if major == 1:
            (hlen,) = struct.unpack("<H", head[8:10])
            offset = 10
        elif major in (2, 3):
            head += handle.read(2)
            (hlen,) = struct.unpack("<I", head[8:12])
            offset = 12
        else:
            raise _fail(f".npy format version {major} is not supported", where)
        if hlen > MAX_NPY_HEADER_BYTES:
            raise _fail("images file header is oversized", where)
        text = handle.read(hlen)
    if len(text) != hlen:
        raise _fail("images file header is truncated", where)
    try:
        header = ast.literal_eval(text.decode("latin1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise _fail("images file header does not parse", where) from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise _fail("images file header has unexpected fields", where)
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str) or not isinstance(fortran, bool) or not isinstance(shape, tuple):
        raise _fail("images file header has the wrong types", where)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise _fail("images file shape is not a tuple of sizes", where)
    return descr, fortran, shape, offset + hlen


def parse_metadata_line(line: bytes, number: int, where: str) -> dict[str, Any]:
    """One line of images.jsonl, strictly."""
    if len(line) > MAX_METADATA_LINE_BYTES:
        raise _fail(f"metadata line {number} is over {MAX_METADATA_LINE_BYTES} bytes", where)
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _fail(f"metadata line {number} is not valid JSON", where) from None
    if not isinstance(obj, dict) or set(obj) != _METADATA_KEYS:
        raise _fail(f"metadata line {number} does not have exactly {sorted(_METADATA_KEYS)}", where)
    return obj


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_metadata(root: Path, pred: dict[str, Any], where: str) -> None:
    images = pred["images"]
    thresholds: dict[str, float] = pred["thresholds"]
    path = root / images["metadata"]
    count = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle):
            if not raw.endswith(b"\n"):
                raise _fail(f"metadata line {number} is truncated", where)
            obj = parse_metadata_line(raw, number, where)
            if obj["index"] != number or isinstance(obj["index"], bool):
                raise _fail(f"metadata line {number} has index {obj['index']!r}", where)
            if obj["modality"] != images["modality"]:
                raise _fail(f"metadata line {number} has another modality", where)
            if obj["size"] != images["shape"][1:]:
                raise _fail(f"metadata line {number} has another size", where)
            if obj["pixel_spacing_mm"] != images["pixel_spacing_mm"]:
                raise _fail(f"metadata line {number} has another pixel spacing", where)
            distances = obj["distances"]
            if not isinstance(distances, dict) or set(distances) != set(thresholds):
                raise _fail(
                    f"metadata line {number} does not give one distance per guard metric", where
                )
            for metric, value in distances.items():
                if not _number(value):
                    raise _fail(f"metadata line {number}: distance {metric} is not a number",
                                where)
                # The guard's promise, re-checked on what was signed (ARCHITECTURE inv. 4).
                if value < thresholds[metric]:
                    raise _fail(
                        f"image {number} is closer than the guard threshold under {metric} "
                        f"({value} < {thresholds[metric]})",
                        where,
                    )
            count += 1
            if count > images["count"]:
                break
    if count != images["count"]:
        raise _fail(f"metadata has {count} lines for {images['count']} images", where)


def _check_policy_before_hashing(
    policy: Policy, pred: dict[str, Any], total_bytes: int, where: str
) -> None:
    if total_bytes > policy.max_bundle_bytes:
        raise _fail(
            f"bundle is {total_bytes} bytes, over the policy's {policy.max_bundle_bytes}", where
        )
    if pred["images"]["count"] > policy.max_images:
        raise _fail(
            f"bundle has {pred['images']['count']} images, over the policy's {policy.max_images}",
            where,
        )


def _check_policy(policy: Policy, pred: dict[str, Any], reviewers: int, where: str) -> None:
    if reviewers < policy.required_reviewer_signatures:
        raise _fail(
            f"bundle has {reviewers} reviewer signature(s), the policy requires "
            f"{policy.required_reviewer_signatures}",
            where,
        )
    if pred["demo_auto_approved"] and not policy.allow_demo_auto_approved:
        raise _fail("bundle was approved by a scripted demo reviewer; the policy refuses it", where)
    modality = pred["images"]["modality"]
    if policy.min_thresholds:
        floors = policy.min_thresholds.get(modality)
        if floors is None:
            raise _fail(f"the policy sets no threshold floor for modality {modality}", where)
        for metric, floor in sorted(floors.items()):
            value = pred["thresholds"].get(metric)
            if value is None:
                raise _fail(f"bundle has no threshold for guard metric {metric}", where)
            if value < floor:
                raise _fail(
                    f"bundle threshold for {metric} is {value}, below the policy floor {floor}",
                    where,
                )
    for name, minimum in sorted(policy.min_canary_catch_rate.items()):
        rate = pred["canary_catch_rates"].get(name)
        if rate is None:
            raise _fail(f"bundle reports no canary catch rate for {name}", where)
        if rate < minimum:
            raise _fail(
                f"canary catch rate for {name} is {rate}, below the policy minimum {minimum}",
                where,
            )


def _check_round(pred: dict[str, Any], expected: tuple[str, str] | None, where: str) -> None:
    if expected is None:
        return
    round_id, nonce = expected
    got = pred["round"]
    if got is None:
        raise _fail(f"bundle answers no round; round {round_id} was expected", where)
    if got["id"] != round_id:
        raise _fail(
            f"bundle was made for round {got['id']}, not round {round_id} (replay?)", where
        )
    if got["nonce"] != nonce:
        raise _fail(f"bundle nonce does not match round {round_id}'s nonce (replay?)", where)


# -- the door -----------------------------------------------------------------------------


def verify_bundle(
    path: str | os.PathLike[str],
    trust: TrustStore | Mapping[str, PublicKey],
    policy: Policy | None = None,
    expected_round: tuple[str, str] | None = None,
) -> VerifiedBundle:
    """Verify everything about a bundle folder; see the module docstring for the order."""
    root = Path(path)
    where = str(root)
    if root.is_symlink() or not root.is_dir():
        raise _fail("bundle is not a folder", where)
    manifest_bytes = _read_capped(root / MANIFEST, MAX_MANIFEST_BYTES, "manifest")
    envelope = parse_envelope(manifest_bytes, str(root / MANIFEST))
    site, site_keyid, keys = _trusted_keys(envelope, trust, where)
    signers = verify_envelope(envelope, keys, IN_TOTO_PAYLOAD_TYPE, where)
    if site_keyid is not None and site_keyid not in signers:
        raise _fail(f"bundle is not signed by the site key of {site}", where)
    statement = parse_statement(envelope.payload, where)
    pred = statement["predicate"]
    if site is not None and pred["site"] != site:
        raise _fail(f"statement names site {pred['site']} but is signed by {site}'s keys", where)
    if site_keyid is not None:
        reviewer_signers = frozenset(signers - {site_keyid})
        n_reviewers = len(reviewer_signers)
    else:
        reviewer_signers = frozenset()
        n_reviewers = len(signers) - 1  # bare keys: every signature beyond the site's
    _check_round(pred, expected_round, where)

    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    for name in subjects:
        check_subject_name(name, where)
    images = pred["images"]
    required = {images["file"], images["metadata"], REVIEW}
    for name in sorted(required - set(subjects)):
        raise _fail(f"manifest does not list the bundle file {name}", where)
    dicom_names = {n for n in subjects if n.startswith(f"{DICOM_DIR}/")}
    for name in sorted(set(subjects) - required - dicom_names):
        raise _fail(f"subject {name} is not a file of the bundle format", where)
    if images["dicom"] and len(dicom_names) != images["count"]:
        raise _fail(f"{len(dicom_names)} DICOM files for {images['count']} images", where)
    if not images["dicom"] and dicom_names:
        raise _fail("DICOM files listed but the predicate says there are none", where)

    found = _list_files(root, where)
    for name in sorted(set(subjects) - set(found)):
        raise _fail(f"file {name} listed in the manifest is missing", where)
    for name in sorted(set(found) - set(subjects)):
        raise _fail(f"file {name} is not listed in the manifest (added after signing)", where)
    total_bytes = sum(found.values()) + len(manifest_bytes)
    if policy is not None:
        _check_policy_before_hashing(policy, pred, total_bytes, where)

    for name in sorted(subjects):
        if sha256_file(root / name) != subjects[name]:
            raise _fail(f"file {name} does not match its sha256 in the manifest (changed)", where)

    descr, fortran, shape, offset = read_npy_header(root / images["file"])
    if descr != NPY_DESCR[images["dtype"]] or fortran:
        raise _fail(f"images file holds {descr}, the predicate says {images['dtype']}", where)
    if list(shape) != images["shape"]:
        raise _fail(f"images file shape {list(shape)} differs from the predicate's", where)
    if found[images["file"]] != offset + math.prod(shape) * 2:
        raise _fail("images file size does not match its header", where)
    _check_metadata(root, pred, where)

    if policy is not None:
        _check_policy(policy, pred, n_reviewers, where)
    rnd = pred["round"]
    return VerifiedBundle(
        statement=statement,
        predicate=pred,
        site=pred["site"],
        signers=frozenset(signers),
        path=root,
        digest=sha256_hex(manifest_bytes),
        images_file=images["file"],
        n_images=images["count"],
        modality=images["modality"],
        unit=images["unit"],
        reviewer_signers=reviewer_signers,
        subjects=subjects,
        dtype=images["dtype"],
        shape=(shape[0], shape[1], shape[2]),
        bundle_id=pred["bundle_id"],
        round=None if rnd is None else (rnd["id"], rnd["nonce"]),
        total_bytes=total_bytes,
    )


def load_bundle_images(verified: VerifiedBundle) -> np.ndarray:
    """The images of a verified bundle as float32 in physical units.

    The bytes are hashed again as they are read, so a file swapped after verification is
    refused rather than loaded.
    """
    import numpy as np

    path = verified.path / verified.images_file
    with open(path, "rb") as handle:
        data = handle.read()
    if sha256_hex(data) != verified.subjects[verified.images_file]:
        raise _fail("images file changed after verification", str(path))
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.dtype(NPY_DESCR[verified.dtype]) or array.shape != verified.shape:
        raise _fail("images file does not hold what was verified", str(path))
    result: np.ndarray = array.astype(np.float32)
    return result
