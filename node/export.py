"""Export, approval and sending of bundles: the outbox ``pending -> approved -> sent``.

:func:`export_bundle` turns guard-accepted images into a bundle (see ``protocols.bundle``),
built in a temporary folder inside ``outbox/`` and renamed into ``outbox/pending/<bundle-id>``
only when complete and signed by the site key. :func:`approve_bundle` verifies a pending
bundle, adds one reviewer's signature to the same DSSE envelope (only a key listed in the site
policy's ``reviewer_keys``) and moves it to ``approved`` once the policy's count is reached.
:func:`send_bundle` copies an approved bundle (temp folder + rename) and moves it to ``sent``.
Every step is audited; every move is one atomic rename, so a killed command leaves the bundle
in exactly one state and is simply run again.

Nothing per patient enters a bundle: the images, per-image guard distances, and the summaries
handed in by the generator and the guard (which must hold no identifier).
"""

from __future__ import annotations

import io
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from node.config import NodeConfig, NodePaths, load_node_config
from protocols.audit import append_audit
from protocols.bundle import (
    IMAGES,
    MANIFEST,
    METADATA,
    REVIEW,
    VerifiedBundle,
    read_unverified,
    verify_bundle,
)
from protocols.dsse import IN_TOTO_PAYLOAD_TYPE, add_signature, parse_envelope, sign_envelope
from protocols.errors import OperationError, UsageError, VerificationError
from protocols.files import (
    atomic_write_bytes,
    canonical_json,
    fsync_dir,
    sha256_file,
    sha256_hex,
)
from protocols.keys import PublicKey, SigningKey, load_public_key, load_signing_key
from protocols.keys import public_key_from_hex as _key_from_hex
from protocols.statement import DICOM_DIR, PREDICATE_TYPE, make_statement, statement_bytes
from protocols.trust import TrustStore

__all__ = [
    "export_bundle",
    "approve_bundle",
    "send_bundle",
    "list_outbox",
    "locate_bundle",
    "site_trust",
    "verify_own_bundle",
    "software_version",
    "STATES",
]

STATES = ("pending", "approved", "sent")
_STALE_TMP_S = 3600.0


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("synthfed")
    except PackageNotFoundError:
        return "0+unknown"


def _plain(value: Any, where: str) -> Any:
    """JSON-ready copy of a summary dict (numpy scalars/arrays -> Python; non-finite -> None)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, np.generic):
        return _plain(value.item(), where)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Path):
        raise UsageError(f"{where} holds a file path; summaries must not name files")
    raise UsageError(f"{where} holds a {type(value).__name__}, which is not JSON")


def _number_map(value: Any, what: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise UsageError(f"guard report: {what} must map a name to a number")
    out: dict[str, float] = {}
    for key, item in value.items():
        number = float(item) if isinstance(item, (int, float, np.number)) else math.nan
        if isinstance(item, bool) or not math.isfinite(number) or number < 0:
            raise UsageError(f"guard report: {what}.{key} is not a non-negative number")
        out[str(key)] = number
    return out


def _canary_rates(guard: Mapping[str, Any]) -> dict[str, float]:
    """{alteration: catch rate} from the guard report.

    Accepted shapes: ``canary_catch_rates`` (or ``canaries``) mapping an alteration either to
    a rate or to ``{"planted", "caught", "rate"}`` (privacy.canaries.catch_rates), optionally
    under a ``catch_rates`` key.
    """
    rates: Any = None
    for key in ("canary_catch_rates", "canaries", "canary"):
        if isinstance(guard.get(key), Mapping):
            rates = guard[key]
            break
    if rates is None:
        return {}
    if isinstance(rates.get("catch_rates"), Mapping):
        rates = rates["catch_rates"]
    flat = {
        str(kind): (value.get("rate", value.get("catch_rate")) if isinstance(value, Mapping)
                    else value)
        for kind, value in rates.items()
    }
    return _number_map(flat, "canary_catch_rates")


def _encode(images: np.ndarray, unit: str) -> tuple[np.ndarray, str, str]:
    """(array as stored, dtype name, encoding text). HU -> int16 exact; else float16."""
    if unit == "HU":
        stored = np.clip(np.rint(images), -32768, 32767).astype("<i2")
        return stored, "int16", "physical values (HU) rounded to the nearest integer"
    if float(np.abs(images).max()) > 65000.0:
        raise UsageError(f"images in unit {unit} exceed the float16 range; rescale them first")
    stored = images.astype("<f2")
    return stored, "float16", f"physical values ({unit}) as IEEE 754 half floats"


def _clean_stale_tmp(outbox: Path) -> None:
    """Remove temp folders of exports killed long ago (a killed command is simply rerun)."""
    now = time.time()
    for entry in outbox.glob(".tmp-export-*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(entry)
        except OSError:
            continue


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, _files in os.walk(root):
        fsync_dir(Path(folder))


def export_bundle(
    paths: NodePaths,
    config: NodeConfig,
    images: np.ndarray,
    *,
    modality: str,
    unit: str,
    distances: Mapping[str, np.ndarray],
    guard: Mapping[str, Any],
    generator: Mapping[str, Any],
    round_id: str | None = None,
    nonce: str | None = None,
    pixel_spacing_mm: float | None = None,
    dicom: bool = True,
    demo_auto_approved: bool | None = None,
) -> Path:
    """Write a signed bundle of ``images`` (float32 [N, H, W], physical) into outbox/pending.

    ``guard`` must hold ``thresholds`` ({metric: threshold}, the metrics of ``distances``) and
    may hold ``canary_catch_rates`` ({alteration: rate}). Every distance must be at or above
    its threshold (re-checked here). ``demo_auto_approved`` defaults to "the site policy
    requires zero reviewer signatures"; it is written into the signed predicate.
    """
    from node.dicom_export import write_dicom_files
    from node.review import render_review

    images = np.asarray(images)
    if images.ndim != 3 or images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise UsageError(f"images must be a non-empty [N, H, W] array, got {images.shape}")
    if not np.all(np.isfinite(images)):
        raise UsageError("images hold NaN or infinite values")
    if (round_id is None) != (nonce is None):
        raise UsageError("round_id and nonce go together: give both or neither")
    if not modality or not unit:
        raise UsageError("modality and unit must be named")
    if pixel_spacing_mm is not None and not (
        math.isfinite(pixel_spacing_mm) and pixel_spacing_mm > 0
    ):
        raise UsageError("pixel_spacing_mm must be a positive number")
    n = images.shape[0]
    thresholds = _number_map(guard.get("thresholds"), "thresholds")
    if not thresholds:
        raise UsageError("guard report names no threshold; nothing was screened")
    if set(distances) != set(thresholds):
        raise UsageError(
            f"distances are for {sorted(distances)}, thresholds for {sorted(thresholds)}"
        )
    dist = {m: np.asarray(distances[m], dtype=np.float64).reshape(-1) for m in thresholds}
    for metric, values in dist.items():
        if values.shape[0] != n or not np.all(np.isfinite(values)):
            raise UsageError(f"distances[{metric}] must hold one finite value per image")
        below = np.flatnonzero(values < thresholds[metric])
        if below.size:
            # Invariant 4: never export an image closer than the threshold. Refuse loudly.
            raise OperationError(
                f"image {int(below[0])} is closer than the {metric} threshold "
                f"({values[below[0]]:.6g} < {thresholds[metric]:.6g}); refusing to export"
            )
    if demo_auto_approved is None:
        demo_auto_approved = config.policy.reviewer_signatures_required == 0
    site_key = load_signing_key(paths.site_key)
    if site_key.public.hex != load_public_key(paths.site_pub).hex:
        raise OperationError("keys/site.ed25519 and keys/site.pub do not match", str(paths.keys))

    stored, dtype, encoding = _encode(images.astype(np.float64), unit)
    physical = stored.astype(np.float32)  # exactly what a reader of the bundle will get
    created = datetime.now(UTC).replace(microsecond=0)
    bundle_id = f"{config.site}-{created:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
    spacing = None if pixel_spacing_mm is None else float(pixel_spacing_mm)
    predicate: dict[str, Any] = {
        "bundle_id": bundle_id,
        "site": config.site,
        "round": None if round_id is None else {"id": str(round_id), "nonce": str(nonce)},
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "software": {"name": "synthfed", "version": software_version()},
        "images": {
            "file": IMAGES,
            "metadata": METADATA,
            "count": int(n),
            "shape": [int(s) for s in stored.shape],
            "dtype": dtype,
            "unit": unit,
            "modality": modality,
            "encoding": encoding,
            "pixel_spacing_mm": spacing,
            "dicom": bool(dicom),
        },
        "thresholds": thresholds,
        "canary_catch_rates": _canary_rates(guard),
        "generator": _plain(generator, "generator"),
        "guard": _plain(guard, "guard"),
        "demo_auto_approved": bool(demo_auto_approved),
    }
    metadata = [
        {
            "index": i,
            "modality": modality,
            "size": [int(stored.shape[1]), int(stored.shape[2])],
            "pixel_spacing_mm": spacing,
            "distances": {m: float(dist[m][i]) for m in sorted(thresholds)},
        }
        for i in range(n)
    ]

    outbox = paths.outbox
    (outbox / "pending").mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(outbox)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=outbox))
    try:
        buffer = io.BytesIO()
        np.save(buffer, stored, allow_pickle=False)
        atomic_write_bytes(tmp / IMAGES, buffer.getvalue())
        atomic_write_bytes(tmp / METADATA, b"".join(canonical_json(m) + b"\n" for m in metadata))
        if dicom:
            write_dicom_files(
                tmp / DICOM_DIR,
                physical,
                modality=modality,
                unit=unit,
                site=config.site,
                bundle_id=bundle_id,
                pixel_spacing_mm=spacing,
                plane=config.store.plane,
                created=created,
                software_version=software_version(),
            )
        atomic_write_bytes(tmp / REVIEW, render_review(predicate, physical, metadata).encode())
        subjects = {
            p.relative_to(tmp).as_posix(): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        statement = make_statement(subjects, predicate)
        envelope = sign_envelope(statement_bytes(statement), IN_TOTO_PAYLOAD_TYPE, [site_key])
        manifest = envelope.to_bytes()
        atomic_write_bytes(tmp / MANIFEST, manifest)
        _fsync_tree(tmp)
        tmp.chmod(0o755)
        target = outbox / "pending" / bundle_id
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(outbox / "pending")
    fsync_dir(outbox)
    append_audit(
        paths.audit,
        "export",
        {
            "bundle_id": bundle_id,
            "site": config.site,
            "modality": modality,
            "unit": unit,
            "images": int(n),
            "shape": [int(s) for s in stored.shape],
            "dtype": dtype,
            "dicom": bool(dicom),
            "round_id": round_id,
            "manifest_sha256": sha256_hex(manifest),
            "predicate_type": PREDICATE_TYPE,
            "demo_auto_approved": bool(demo_auto_approved),
        },
    )
    return target


# -- the outbox ---------------------------------------------------------------------------


def locate_bundle(paths: NodePaths, bundle: str | os.PathLike[str]) -> tuple[str, Path]:
    """(state, folder) of a bundle of this node's outbox, given a path or a bundle id."""
    given = Path(bundle)
    outbox = paths.outbox.resolve()
    if given.exists():
        folder = given.resolve()
        state = folder.parent.name
        if folder.parent.parent != outbox or state not in STATES:
            raise UsageError("not a bundle of this node's outbox", str(given))
        return state, folder
    name = given.name
    if name != str(bundle) or name.startswith("."):
        raise UsageError("bundle not found", str(bundle))
    for state in STATES:
        folder = outbox / state / name
        if folder.is_dir():
            return state, folder
    raise UsageError("bundle not found in the outbox", str(bundle))


def site_trust(paths: NodePaths, config: NodeConfig) -> TrustStore:
    """The node's own trust: its site key and the reviewer keys of its policy."""
    reviewers: list[PublicKey] = []
    for text in config.policy.reviewer_keys:
        try:
            reviewers.append(_key_from_hex(text))
        except UsageError as exc:
            raise UsageError(f"policy.reviewer_keys: {exc.what}", str(paths.config)) from None
    trust = TrustStore()
    try:
        trust.add_site(config.site, load_public_key(paths.site_pub), reviewers)
    except UsageError as exc:
        raise UsageError(f"policy.reviewer_keys: {exc.what}", str(paths.config)) from None
    return trust


def verify_own_bundle(paths: NodePaths, config: NodeConfig, folder: Path) -> VerifiedBundle:
    return verify_bundle(folder, site_trust(paths, config))


def _move(folder: Path, state: str) -> Path:
    target = folder.parent.parent / state / folder.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise OperationError(f"a bundle of that name is already {state}", str(target))
    os.rename(folder, target)
    fsync_dir(target.parent)
    fsync_dir(folder.parent)
    return target


def approve_bundle(
    paths: NodePaths,
    bundle_dir: str | os.PathLike[str],
    reviewer_key: SigningKey | None,
) -> Path:
    """Verify a pending bundle, add ``reviewer_key``'s signature; move it once enough signed.

    ``reviewer_key`` may be None only where the site policy requires zero reviewer signatures
    (demos); the bundle then moves to ``approved`` with no reviewer signature.
    """
    config = load_node_config(paths)
    state, folder = locate_bundle(paths, bundle_dir)
    if state != "pending":
        raise UsageError(f"bundle is {state}; only a pending bundle can be approved", str(folder))
    required = config.policy.reviewer_signatures_required
    trust = site_trust(paths, config)
    if reviewer_key is None:
        if required > 0:
            raise UsageError(
                f"the site policy requires {required} reviewer signature(s); pass --reviewer-key"
            )
        verified = verify_bundle(folder, trust)
        count, reviewer_keyid = len(verified.reviewer_signers), None
    else:
        reviewer_keyid = reviewer_key.public.keyid
        allowed = {k.keyid for k in trust.reviewer_keys(config.site)}
        if reviewer_keyid not in allowed:
            raise VerificationError(
                f"reviewer key {reviewer_keyid[:16]} is not listed in policy.reviewer_keys",
                str(paths.config),
            )
        verified = verify_bundle(folder, trust)
        if reviewer_keyid in verified.signers:
            raise UsageError("this reviewer has already signed the bundle", str(folder))
        manifest = folder / MANIFEST
        raw = manifest.read_bytes()
        if sha256_hex(raw) != verified.digest:
            raise VerificationError("manifest changed while being approved", str(manifest))
        envelope = parse_envelope(raw, str(manifest))
        atomic_write_bytes(manifest, add_signature(envelope, reviewer_key).to_bytes())
        count = len(verified.reviewer_signers) + 1
    moved = count >= required
    target = _move(folder, "approved") if moved else folder
    append_audit(
        paths.audit,
        "approve",
        {
            "bundle_id": verified.bundle_id,
            "reviewer_keyid": reviewer_keyid,
            "reviewer_signatures": count,
            "required": required,
            "state": "approved" if moved else "pending",
            "auto": reviewer_key is None,
        },
    )
    return target


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def send_bundle(paths: NodePaths, bundle_dir: str | os.PathLike[str], to: Path) -> Path:
    """Copy an approved bundle into folder ``to`` (temp + rename), then move it to ``sent``."""
    config = load_node_config(paths)
    state, folder = locate_bundle(paths, bundle_dir)
    if state != "approved":
        raise VerificationError(
            f"bundle is {state}; only an approved bundle may leave the node", str(folder)
        )
    trust = site_trust(paths, config)
    verified = verify_bundle(folder, trust)
    required = config.policy.reviewer_signatures_required
    if len(verified.reviewer_signers) < required:
        raise VerificationError(
            f"bundle has {len(verified.reviewer_signers)} reviewer signature(s), the site "
            f"policy requires {required}",
            str(folder),
        )
    to = Path(to).resolve()
    if to == paths.outbox.resolve() or paths.outbox.resolve() in to.parents:
        raise UsageError("the destination is inside the outbox", str(to))
    to.mkdir(parents=True, exist_ok=True)
    dest = to / folder.name
    if dest.exists():
        # A send killed after its copy landed: accept the copy only if it is this bundle.
        if verify_bundle(dest, trust).digest != verified.digest:
            raise UsageError("a different bundle of that name is already there", str(dest))
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=to))
        try:
            for name in [MANIFEST, *sorted(verified.subjects)]:
                _copy_file(folder / name, tmp / name)
            _fsync_tree(tmp)
            if verify_bundle(tmp, trust).digest != verified.digest:
                raise OperationError("the copy does not verify", str(tmp))
            tmp.chmod(0o755)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(to)
    _move(folder, "sent")
    append_audit(
        paths.audit,
        "send",
        {
            "bundle_id": verified.bundle_id,
            "manifest_sha256": verified.digest,
            "images": verified.n_images,
            "to": str(to),
        },
    )
    return dest


def list_outbox(paths: NodePaths) -> dict[str, list[dict[str, Any]]]:
    """Each state's bundles with what their manifests say (read, not verified: it is fast)."""
    result: dict[str, list[dict[str, Any]]] = {}
    for state in STATES:
        rows: list[dict[str, Any]] = []
        folder = paths.outbox / state
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            row: dict[str, Any] = {"bundle_id": entry.name, "state": state}
            try:
                envelope, statement = read_unverified(entry)
                pred = statement["predicate"]
                row.update(
                    images=pred["images"]["count"],
                    modality=pred["images"]["modality"],
                    created=pred["created"],
                    round=None if pred["round"] is None else pred["round"]["id"],
                    signatures=len(envelope.signatures),
                )
            except VerificationError as exc:
                row["problem"] = exc.diagnostics()
            rows.append(row)
        result[state] = rows
    return result
