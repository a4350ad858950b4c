"""DSSE envelopes (https://github.com/secure-systems-lab/dsse, protocol v1) with Ed25519.

The pre-authentication encoding is computed here and nowhere else:
``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` with lengths as ASCII
decimal byte counts. Signatures cover PAE(payloadType, payload), never the base64 text.
Verification is fail-closed: an envelope with no signature, an unknown key id or a bad
signature is refused, and the payload is returned only after every check passed.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from protocols.errors import VerificationError
from protocols.keys import PublicKey, SigningKey

__all__ = [
    "IN_TOTO_PAYLOAD_TYPE",
    "pae",
    "Envelope",
    "sign_envelope",
    "add_signature",
    "verify_envelope",
    "parse_envelope",
    "MAX_ENVELOPE_BYTES",
]

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (keyid, signature)

    def to_json(self) -> dict[str, Any]:
        return {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": kid, "sig": base64.b64encode(sig).decode("ascii")}
                for kid, sig in self.signatures
            ],
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode("utf-8")


def sign_envelope(payload: bytes, payload_type: str, keys: Iterable[SigningKey]) -> Envelope:
    message = pae(payload_type, payload)
    sigs = tuple((k.public.keyid, k.sign(message)) for k in keys)
    if not sigs:
        raise VerificationError("refusing to make an unsigned envelope")
    return Envelope(payload_type, payload, sigs)


def add_signature(envelope: Envelope, key: SigningKey) -> Envelope:
    """Add one more signature over the same payload (DSSE allows several)."""
    kid = key.public.keyid
    if any(existing == kid for existing, _ in envelope.signatures):
        raise VerificationError("this key has already signed the envelope", kid[:16])
    sig = key.sign(pae(envelope.payload_type, envelope.payload))
    return Envelope(envelope.payload_type, envelope.payload, (*envelope.signatures, (kid, sig)))


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise VerificationError(f"envelope {what} is not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise VerificationError(f"envelope {what} is not valid base64") from None


def parse_envelope(data: bytes, where: str = "envelope") -> Envelope:
    """Parse envelope JSON strictly (size cap, exact keys, base64) without trusting it."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise VerificationError(
            f"envelope is {len(data)} bytes, over the {MAX_ENVELOPE_BYTES} byte limit", where
        )
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerificationError(f"envelope is not valid JSON ({exc})", where) from None
    if not isinstance(obj, dict) or set(obj) != {"payload", "payloadType", "signatures"}:
        raise VerificationError(
            "envelope must have exactly payload, payloadType, signatures", where
        )
    if not isinstance(obj["payloadType"], str):
        raise VerificationError("envelope payloadType is not a string", where)
    if not isinstance(obj["signatures"], list):
        raise VerificationError("envelope signatures is not a list", where)
    sigs = []
    for item in obj["signatures"]:
        if not isinstance(item, dict) or not isinstance(item.get("keyid"), str):
            raise VerificationError("envelope signature entry is malformed", where)
        sigs.append((item["keyid"], _b64(item.get("sig"), "signature")))
    return Envelope(obj["payloadType"], _b64(obj["payload"], "payload"), tuple(sigs))


def verify_envelope(
    envelope: Envelope,
    trusted: Mapping[str, PublicKey],
    payload_type: str = IN_TOTO_PAYLOAD_TYPE,
    where: str = "envelope",
) -> set[str]:
    """Check every signature; return the key ids that signed validly.

    Every signature must come from a key in ``trusted`` (keyid -> key) and verify; any
    unknown or bad signature fails the whole envelope (a bundle carries nothing unexplained).
    """
    if envelope.payload_type != payload_type:
        raise VerificationError(
            f"payloadType is {envelope.payload_type!r}, expected {payload_type!r}", where
        )
    if not envelope.signatures:
        raise VerificationError("envelope carries no signature", where)
    message = pae(envelope.payload_type, envelope.payload)
    signers: set[str] = set()
    for keyid, sig in envelope.signatures:
        key = trusted.get(keyid)
        if key is None:
            raise VerificationError(f"signed by an unknown key {keyid[:16]}", where)
        if key.keyid != keyid:
            raise VerificationError("trust store key id does not match its key", where)
        if not key.verify(sig, message):
            raise VerificationError(f"bad signature from key {keyid[:16]}", where)
        if keyid in signers:
            raise VerificationError(f"key {keyid[:16]} signed twice", where)
        signers.add(keyid)
    return signers
