"""Ed25519 keys: generation, storage, loading, key ids, signing and verification.

Private keys are stored as raw 32-byte seeds in hex (file mode 0600); public keys as the raw
32 bytes in hex. The key id is the hex sha256 of the raw public key (DSSE ``keyid``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from protocols.errors import UsageError
from protocols.files import atomic_write_text, sha256_hex

__all__ = [
    "SigningKey",
    "PublicKey",
    "generate_keypair",
    "load_signing_key",
    "load_public_key",
    "public_key_from_hex",
    "write_keypair",
]


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def keyid(self) -> str:
        return sha256_hex(self.raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    seed: bytes

    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @property
    def public(self) -> PublicKey:
        raw = self._key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return PublicKey(raw)

    def sign(self, message: bytes) -> bytes:
        return self._key().sign(message)


def generate_keypair() -> SigningKey:
    key = Ed25519PrivateKey.generate()
    return SigningKey(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))


def write_keypair(key: SigningKey, private_path: Path, public_path: Path) -> None:
    """Write the private seed (0600) and the public key (0644), both as hex lines."""
    if private_path.exists():
        raise UsageError("refusing to overwrite an existing key", str(private_path))
    atomic_write_text(private_path, key.seed.hex() + "\n", mode=0o600)
    atomic_write_text(public_path, key.public.hex + "\n", mode=0o644)


def _read_hex(path: Path, size: int, what: str) -> bytes:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise UsageError(f"{what} not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} unreadable: {exc}", str(path)) from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{what} is not hex", str(path)) from None
    if len(raw) != size:
        raise UsageError(f"{what} must be {size} bytes, found {len(raw)}", str(path))
    return raw


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    p = Path(path)
    if p.exists() and p.stat().st_mode & 0o077:
        raise UsageError("private key is readable by others; chmod 600 it", str(p))
    return SigningKey(_read_hex(p, 32, "private key"))


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    return PublicKey(_read_hex(Path(path), 32, "public key"))


def public_key_from_hex(text: str) -> PublicKey:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise UsageError("public key is not hex", text[:16]) from None
    if len(raw) != 32:
        raise UsageError(f"public key must be 32 bytes, found {len(raw)}")
    return PublicKey(raw)
