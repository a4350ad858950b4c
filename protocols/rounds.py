"""Round request and reply messages, and the bundle wire format used inside a reply.

A round request is a DSSE envelope (payloadType :data:`ROUND_REQUEST_TYPE`) signed by the
coordinator key; a node answers only requests whose every signature verifies against the one
coordinator key of its node.yaml. A reply is a DSSE envelope signed by the site key
(:data:`ROUND_REPLY_TYPE`) stating what the site did with the request (refused with a reason,
generating, awaiting approval, sending a bundle); the bundle itself travels beside the reply as a
tar archive (:func:`pack_bundle`) and is verified on its own (signatures, digests, policy,
round) — the reply's signature only authenticates the status.

This module must never trust an archive: :func:`unpack_bundle` accepts regular files and
folders with relative names only, enforces a byte cap, and extracts into a fresh folder.
No torch, no flwr here.
"""

from __future__ import annotations

import io
import re
import tarfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from protocols.dsse import Envelope, parse_envelope, sign_envelope, verify_envelope
from protocols.errors import VerificationError
from protocols.files import canonical_json, sha256_hex
from protocols.keys import PublicKey, SigningKey

__all__ = [
    "ROUND_REQUEST_TYPE",
    "ROUND_REPLY_TYPE",
    "REQUEST_SCHEMA",
    "REPLY_SCHEMA",
    "MODALITIES",
    "ReplyState",
    "RoundRequest",
    "RoundReply",
    "new_round_id",
    "sign_request",
    "verify_request",
    "sign_reply",
    "verify_reply",
    "pack_bundle",
    "unpack_bundle",
    "split_chunks",
    "join_chunks",
]

ROUND_REQUEST_TYPE = "application/vnd.synthfed.round-request+json"
ROUND_REPLY_TYPE = "application/vnd.synthfed.round-reply+json"
REQUEST_SCHEMA = "https://synthfed.dev/round-request/v1"
REPLY_SCHEMA = "https://synthfed.dev/round-reply/v1"
MODALITIES = ("CT", "MR", "PT")
ReplyState = Literal["refused", "generating", "awaiting_approval", "bundle", "failed"]
REPLY_STATES: tuple[str, ...] = ("refused", "generating", "awaiting_approval", "bundle", "failed")

_ROUND_ID = re.compile(r"^r-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
_HEX = re.compile(r"^[0-9a-f]+$")
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def new_round_id(now: float | None = None, suffix: str | None = None) -> str:
    """``r-<UTC time>-<8 hex>``: sortable, safe as a folder name, carries nothing else."""
    import secrets

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"r-{stamp}-{suffix or secrets.token_hex(4)}"


def _require(cond: bool, what: str, where: str) -> None:
    if not cond:
        raise VerificationError(what, where)


@dataclass(frozen=True)
class RoundRequest:
    """What the coordinator asks of every site in one round (the signed payload)."""

    round_id: str
    nonce: str
    modality: str
    image_size: int
    count: int
    sites: tuple[str, ...]
    created: float
    expires: float
    coordinator_keyid: str
    minimums: dict[str, Any] = field(default_factory=dict)
    schema: str = REQUEST_SCHEMA

    def __post_init__(self) -> None:
        where = "round request"
        _require(self.schema == REQUEST_SCHEMA, f"unknown schema {self.schema!r}", where)
        _require(bool(_ROUND_ID.match(self.round_id)), "round_id is malformed", where)
        _require(
            bool(_HEX.match(self.nonce)) and len(self.nonce) >= 32,
            "nonce must be at least 32 hex characters",
            where,
        )
        _require(self.modality in MODALITIES, f"modality {self.modality!r} unknown", where)
        _require(self.image_size in (64, 128, 256, 512), "image_size not supported", where)
        _require(0 < self.count <= 1_000_000, "count out of range", where)
        _require(all(_SITE.match(s) for s in self.sites), "a site name is malformed", where)
        _require(self.expires > self.created, "request expires before it was made", where)
        _require(
            bool(_HEX.match(self.coordinator_keyid)) and len(self.coordinator_keyid) == 64,
            "coordinator_keyid is malformed",
            where,
        )

    def to_payload(self) -> bytes:
        data = asdict(self)
        data["sites"] = list(self.sites)
        return canonical_json(data)

    @classmethod
    def from_payload(cls, payload: bytes, where: str = "round request") -> RoundRequest:
        obj = _load_object(payload, where)
        expected = {
            "round_id": str, "nonce": str, "modality": str, "image_size": int, "count": int,
            "sites": list, "created": (int, float), "expires": (int, float),
            "coordinator_keyid": str, "minimums": dict, "schema": str,
        }
        _check_fields(obj, expected, where)
        _require(all(isinstance(s, str) for s in obj["sites"]), "sites must be strings", where)
        return cls(
            round_id=obj["round_id"], nonce=obj["nonce"], modality=obj["modality"],
            image_size=obj["image_size"], count=obj["count"], sites=tuple(obj["sites"]),
            created=float(obj["created"]), expires=float(obj["expires"]),
            coordinator_keyid=obj["coordinator_keyid"], minimums=obj["minimums"],
            schema=obj["schema"],
        )

    @property
    def digest(self) -> str:
        return sha256_hex(self.to_payload())


@dataclass(frozen=True)
class RoundReply:
    """A site's signed statement about a round: refused, working, or sending a bundle."""

    round_id: str
    nonce: str
    site: str
    state: str
    reason: str = ""
    bundle_sha256: str = ""
    bundle_bytes: int = 0
    archive_sha256: str = ""
    sent: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)
    schema: str = REPLY_SCHEMA

    def __post_init__(self) -> None:
        where = "round reply"
        _require(self.schema == REPLY_SCHEMA, f"unknown schema {self.schema!r}", where)
        _require(self.state in REPLY_STATES, f"unknown reply state {self.state!r}", where)
        _require(bool(_SITE.match(self.site)), "site name is malformed", where)
        if self.state == "bundle":
            _require(
                len(self.bundle_sha256) == 64 and len(self.archive_sha256) == 64,
                "bundle reply without its digests",
                where,
            )

    def to_payload(self) -> bytes:
        return canonical_json(asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes, where: str = "round reply") -> RoundReply:
        obj = _load_object(payload, where)
        expected = {
            "round_id": str, "nonce": str, "site": str, "state": str, "reason": str,
            "bundle_sha256": str, "bundle_bytes": int, "archive_sha256": str,
            "sent": (int, float),
            "timings_s": dict, "schema": str,
        }
        _check_fields(obj, expected, where)
        obj["sent"] = float(obj["sent"])
        timings = obj["timings_s"]
        if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   for k, v in timings.items()):
            raise VerificationError("timings_s must map names to numbers", where)
        obj["timings_s"] = {k: float(v) for k, v in timings.items()}
        return cls(**obj)


def _load_object(payload: bytes, where: str) -> dict[str, Any]:
    import json

    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VerificationError("payload is not JSON", where) from None
    if not isinstance(obj, dict):
        raise VerificationError("payload is not a JSON object", where)
    return obj


def _check_fields(obj: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    if set(obj) != set(expected):
        extra = sorted(set(obj) - set(expected))
        missing = sorted(set(expected) - set(obj))
        raise VerificationError(f"fields wrong (extra {extra}, missing {missing})", where)
    for key, tp in expected.items():
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, tp):
            raise VerificationError(f"field {key} has the wrong type", where)


def sign_request(request: RoundRequest, key: SigningKey) -> bytes:
    if key.public.keyid != request.coordinator_keyid:
        raise VerificationError("request names a different coordinator key", "round request")
    return sign_envelope(request.to_payload(), ROUND_REQUEST_TYPE, [key]).to_bytes()


def verify_request(
    data: bytes, coordinator_key: PublicKey, now: float | None = None
) -> RoundRequest:
    """Parse and verify a request envelope against the one trusted coordinator key.

    Fail-closed: any signature by another key, a malformed payload, a request naming another
    coordinator key, or an expired request is refused.
    """
    where = "round request"
    envelope = parse_envelope(data, where)
    verify_envelope(envelope, {coordinator_key.keyid: coordinator_key}, ROUND_REQUEST_TYPE, where)
    request = RoundRequest.from_payload(envelope.payload, where)
    _require(
        request.coordinator_keyid == coordinator_key.keyid,
        "request names a different coordinator key than the one that signed it",
        where,
    )
    moment = time.time() if now is None else now
    _require(moment <= request.expires, "request has expired", where)
    _require(moment >= request.created - 300, "request is dated in the future", where)
    return request


def sign_reply(reply: RoundReply, site_key: SigningKey) -> bytes:
    return sign_envelope(reply.to_payload(), ROUND_REPLY_TYPE, [site_key]).to_bytes()


def verify_reply(data: bytes, site_keys: Mapping[str, PublicKey]) -> RoundReply:
    """Verify a reply envelope; ``site_keys`` maps site -> site key (the trust store)."""
    where = "round reply"
    envelope: Envelope = parse_envelope(data, where)
    unverified = RoundReply.from_payload(envelope.payload, where)
    key = site_keys.get(unverified.site)
    if key is None:
        raise VerificationError(f"reply from unknown site {unverified.site!r}", where)
    verify_envelope(envelope, {key.keyid: key}, ROUND_REPLY_TYPE, where)
    return unverified


# -- bundle wire format ---------------------------------------------------------------------


def pack_bundle(bundle_dir: Path) -> bytes:
    """A deterministic uncompressed tar of a bundle folder (regular files only)."""
    root = Path(bundle_dir)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                raise VerificationError("bundle holds a symbolic link", str(path))
            if not path.is_file():
                continue
            data = path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unpack_bundle(data: bytes, dest: Path, max_bytes: int) -> Path:
    """Extract a packed bundle into the new folder ``dest``, refusing anything unusual."""
    where = "bundle archive"
    if len(data) > max_bytes + 1024 * 1024:
        raise VerificationError(f"archive is {len(data)} bytes, over the policy limit", where)
    dest = Path(dest)
    if dest.exists():
        raise VerificationError("extraction folder already exists", str(dest))
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as exc:
        raise VerificationError(f"not a tar archive ({exc})", where) from None
    total = 0
    with tar:
        members = tar.getmembers()
        names: set[str] = set()
        for m in members:
            name = m.name
            parts = name.split("/")
            if (
                not m.isfile()
                or name.startswith("/")
                or any(p in ("", ".", "..") for p in parts)
                or "\\" in name
                or name in names
            ):
                raise VerificationError(f"archive member {name!r} is not allowed", where)
            names.add(name)
            total += m.size
            if total > max_bytes:
                raise VerificationError("bundle is larger than the policy allows", where)
        dest.mkdir(parents=True)
        for m in members:
            handle = tar.extractfile(m)
            if handle is None:  # pragma: no cover - isfile() checked above
                raise VerificationError(f"archive member {m.name!r} unreadable", where)
            target = dest.joinpath(*m.name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(handle.read())
    return dest


def split_chunks(data: bytes, chunk_bytes: int = 1 << 20) -> list[bytes]:
    """Cut ``data`` into pieces for the transport (a message carries a list of them)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    return [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]


def join_chunks(chunks: list[bytes], expected_sha256: str) -> bytes:
    data = b"".join(chunks)
    if sha256_hex(data) != expected_sha256:
        raise VerificationError("bundle bytes do not match the digest in the reply", "transfer")
    return data
