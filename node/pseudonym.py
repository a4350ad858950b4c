"""Keyed pseudonyms: the only form in which patients, series and instances are known at a site.

HMAC-SHA256 under the per-site secret (keys/pseudonym.secret, created by ``init``): stable
within a site, unlinkable across sites, and not reversible without the secret. Raw PatientID,
names, dates and UIDs are hashed here and never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from node.errors import HomeError
from protocols.files import atomic_write_text

__all__ = ["Pseudonymiser", "create_secret"]


def create_secret(path: Path) -> None:
    if path.exists():
        raise HomeError("refusing to overwrite the pseudonym secret", str(path))
    atomic_write_text(path, secrets.token_hex(32) + "\n", mode=0o600)


class Pseudonymiser:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise HomeError("pseudonym secret is too short")
        self._secret = secret

    @classmethod
    def from_file(cls, path: Path) -> Pseudonymiser:
        try:
            return cls(bytes.fromhex(path.read_text().strip()))
        except FileNotFoundError:
            raise HomeError("pseudonym secret missing", str(path)) from None
        except ValueError:
            raise HomeError("pseudonym secret is not hex", str(path)) from None

    def _keyed(self, kind: str, value: str, length: int = 24) -> str:
        mac = hmac.new(self._secret, f"{kind}\x00{value}".encode(), hashlib.sha256)
        return mac.hexdigest()[:length]

    def patient(self, patient_id: str) -> str:
        """Pseudonym of a patient: 'p-' and 24 hex digits of HMAC(secret, PatientID)."""
        return "p-" + self._keyed("patient", patient_id)

    def series(self, series_uid: str) -> str:
        return "s-" + self._keyed("series", series_uid)

    def instance(self, sop_uid: str) -> str:
        """Dedupe key of a DICOM instance (keyed hash of the SOP Instance UID and frame)."""
        return "i-" + self._keyed("instance", sop_uid, 32)

    def rank(self, seed: int, pseudonym: str) -> str:
        """Seeded, secret-keyed ordering key used for the patient-level split."""
        return self._keyed(f"split{seed}", pseudonym, 32)
