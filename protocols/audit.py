"""Append-only, hash-chained audit log (JSONL), shared by node and coordinator homes.

Each record is one canonical JSON line holding ``seq``, ``time``, ``event``, ``details``,
``prev`` (the sha256 of the previous line's bytes; 64 zeros for the first) and ``hash`` (the
sha256 of the record without ``hash``, so an edited record is named itself). Editing,
inserting or deleting a record breaks the chain at that record, which :func:`verify_audit_log`
names. Appends are fsynced; a torn last line (a crash mid-append) is reported, not hidden.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import VerificationError
from protocols.files import canonical_json, sha256_hex

__all__ = ["append_audit", "verify_audit_log", "AuditReport", "GENESIS"]

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditReport:
    records: int
    last_hash: str


def _last_line(path: Path) -> bytes | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        block = min(size, 1 << 16)
        while True:
            handle.seek(size - block)
            data = handle.read(block)
            lines = data.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or block == size:
                return lines[-1]
            block = min(size, block * 2)


def append_audit(path: str | os.PathLike[str], event: str, details: dict[str, Any]) -> str:
    """Append one record and return its hash. ``details`` must hold no raw identifier."""
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # One writer at a time (the daemon and a CLI command may append together): the last
        # record is read and the new one written under an exclusive lock, so the chain never forks.
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_line(p)
        if last is None:
            prev, seq = GENESIS, 0
        else:
            prev = sha256_hex(last)
            try:
                seq = int(json.loads(last)["seq"]) + 1
            except (ValueError, KeyError, TypeError):
                raise VerificationError("last audit record is damaged; run audit", str(p)) from None
        record: dict[str, Any] = {
            "seq": seq, "time": time.time(), "event": event, "details": details, "prev": prev
        }
        record["hash"] = sha256_hex(canonical_json(record))
        line = canonical_json(record)
        os.write(fd, line + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return sha256_hex(line)


def verify_audit_log(path: str | os.PathLike[str]) -> AuditReport:
    """Check the whole chain; raise VerificationError naming the first broken record."""
    p = Path(path)
    if not p.exists():
        raise VerificationError("audit log not found", str(p))
    prev = GENESIS
    count = 0
    with open(p, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\n")
            where = f"{p}:{number}"
            if not raw.endswith(b"\n"):
                raise VerificationError("record is truncated", where)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise VerificationError("record is not JSON", where) from None
            if not isinstance(record, dict):
                raise VerificationError("record is not a JSON object", where)
            body = {k: v for k, v in record.items() if k != "hash"}
            if record.get("hash") != sha256_hex(canonical_json(body)):
                raise VerificationError("record was edited: its own hash does not match", where)
            if record.get("seq") != count:
                raise VerificationError(
                    f"record {count} is missing (deleted) or out of order", where
                )
            if record.get("prev") != prev:
                raise VerificationError(
                    "chain broken: record does not hold the hash of the one before "
                    "(it or an earlier record was edited, inserted or deleted)",
                    where,
                )
            if canonical_json(record) != line:
                raise VerificationError("record is not in canonical form (edited)", where)
            prev = sha256_hex(line)
            count += 1
    return AuditReport(records=count, last_hash=prev)
