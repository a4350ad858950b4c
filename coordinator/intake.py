"""Bundle intake: the one verification path for bundles that arrive over Flower or by hand.

Whatever the transport, a bundle is first copied (or unpacked) into ``<home>/inbox/`` and
nothing reads it until :func:`protocols.bundle.verify_bundle` has checked every signature,
digest and the policy against the trust store, and the round binding (id and nonce of an open
round that asked this site). A bundle whose manifest digest was received before is a replay and
is refused. Only a verified bundle is moved to ``<home>/bundles/<digest>/`` and recorded in the
round's state; a rejected one stays in ``inbox/rejected/`` and never reaches a pool.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorPaths
from coordinator.rounds import RoundHandle, list_rounds, load_round, set_site_state
from protocols.audit import append_audit
from protocols.dsse import parse_envelope
from protocols.errors import UsageError, VerificationError
from protocols.files import fsync_dir

__all__ = ["IntakeResult", "receive_bundle_dir", "receive_bundle_bytes", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.dsse.json"


@dataclass(frozen=True)
class IntakeResult:
    accepted: bool
    reason: str
    source: str
    via: str
    site: str = ""
    round_id: str = ""
    digest: str = ""
    n_images: int = 0
    verify_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _copy_tree_checked(src: Path, dest: Path, max_bytes: int) -> None:
    """Copy a dropped bundle folder: regular files only, no links, at most ``max_bytes``."""
    if not src.is_dir():
        raise VerificationError("bundle is not a folder", str(src))
    total = 0
    files = []
    for path in sorted(src.rglob("*")):
        if path.is_symlink():
            raise VerificationError("bundle holds a symbolic link", str(path))
        if path.is_dir():
            continue
        if not path.is_file():
            raise VerificationError("bundle holds something that is not a file", str(path))
        total += path.stat().st_size
        if total > max_bytes:
            raise VerificationError("bundle is larger than the policy allows", str(src))
        files.append(path)
    dest.mkdir(parents=True)
    for path in files:
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _unverified_round_id(bundle: Path) -> str:
    """The round id the manifest claims, read only to choose the round to verify against."""
    try:
        envelope = parse_envelope((bundle / MANIFEST_NAME).read_bytes(), "manifest")
        statement = json.loads(envelope.payload)
        predicate = statement.get("predicate", {})
    except (OSError, ValueError, AttributeError, VerificationError):
        return ""
    if not isinstance(predicate, dict):
        return ""
    for value in (predicate.get("round_id"), (predicate.get("round") or {}).get("id")
                  if isinstance(predicate.get("round"), dict) else predicate.get("round")):
        if isinstance(value, str) and value:
            return value
    return ""


def _max_bundle_bytes(policy: Any) -> int:
    value = int(getattr(policy, "max_bundle_bytes", 0) or 0)
    return value if value > 0 else 512 * 1024 * 1024


def _staging(paths: CoordinatorPaths) -> Path:
    paths.inbox.mkdir(parents=True, exist_ok=True)
    return paths.inbox / f"in-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


def receive_bundle_dir(
    paths: CoordinatorPaths,
    source: Path,
    *,
    via: str = "file",
    round_id: str | None = None,
    claimed_site: str | None = None,
) -> IntakeResult:
    """Copy a dropped bundle folder into the inbox, then :func:`_intake` it."""
    from coordinator.home import load_coordinator_policy

    policy = load_coordinator_policy(paths)
    staging = _staging(paths)
    try:
        _copy_tree_checked(Path(source), staging, _max_bundle_bytes(policy))
    except VerificationError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        result = IntakeResult(False, exc.what, str(source), via)
        append_audit(paths.audit, "bundle_rejected", {"via": via, "reason": exc.what})
        return result
    return _intake(paths, staging, via=via, source=str(source), round_id=round_id,
                   claimed_site=claimed_site)


def receive_bundle_bytes(
    paths: CoordinatorPaths,
    data: bytes,
    *,
    round_id: str,
    claimed_site: str | None = None,
    via: str = "flower",
) -> IntakeResult:
    """Unpack a bundle that arrived as bytes (Flower reply) into the inbox, then intake it."""
    from coordinator.home import load_coordinator_policy
    from protocols.rounds import unpack_bundle

    policy = load_coordinator_policy(paths)
    staging = _staging(paths)
    try:
        unpack_bundle(data, staging, _max_bundle_bytes(policy))
    except VerificationError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _reject_site(paths, round_id, claimed_site, exc.what)
        append_audit(paths.audit, "bundle_rejected", {"via": via, "round": round_id,
                                                      "reason": exc.what})
        return IntakeResult(False, exc.what, f"{via}:{claimed_site}", via, claimed_site or "",
                            round_id)
    return _intake(paths, staging, via=via, source=f"{via}:{claimed_site}", round_id=round_id,
                   claimed_site=claimed_site)


def _reject_site(paths: CoordinatorPaths, round_id: str | None, site: str | None,
                 reason: str) -> None:
    """Record a rejection against a site only when we know the site and its round."""
    if not round_id or not site:
        return
    try:
        handle = load_round(paths, round_id)
        entry = handle.state()["sites"].get(site)
        if entry is not None and entry["state"] not in ("verified", "refused"):
            set_site_state(paths, handle, site, "rejected", reason)
    except UsageError:
        return


def _intake(
    paths: CoordinatorPaths,
    staging: Path,
    *,
    via: str,
    source: str,
    round_id: str | None,
    claimed_site: str | None,
) -> IntakeResult:
    started = time.perf_counter()
    try:
        result = _verify_and_store(paths, staging, via=via, source=source, round_id=round_id,
                                   claimed_site=claimed_site, started=started)
    except VerificationError as exc:
        reason = exc.what
        rejected = paths.inbox / "rejected" / staging.name
        rejected.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            os.replace(staging, rejected)
        _reject_site(paths, round_id, claimed_site, reason)
        append_audit(paths.audit, "bundle_rejected", {
            "via": via, "round": round_id or "", "site": claimed_site or "", "reason": reason,
        })
        return IntakeResult(False, reason, source, via, claimed_site or "", round_id or "",
                            verify_s=time.perf_counter() - started)
    return result


def _verify_and_store(
    paths: CoordinatorPaths,
    staging: Path,
    *,
    via: str,
    source: str,
    round_id: str | None,
    claimed_site: str | None,
    started: float,
) -> IntakeResult:
    from coordinator.home import load_coordinator_policy, load_trust
    from protocols.bundle import verify_bundle

    trust = load_trust(paths)
    policy = load_coordinator_policy(paths)
    claimed_round = _unverified_round_id(staging)
    if round_id is not None and claimed_round and claimed_round != round_id:
        raise VerificationError(f"bundle is bound to round {claimed_round}, not {round_id}",
                                source)
    target_round = round_id or claimed_round
    if not target_round:
        raise VerificationError("bundle is not bound to any round", source)
    handles = {h.round_id: h for h in list_rounds(paths)}
    handle: RoundHandle | None = handles.get(target_round)
    if handle is None:
        raise VerificationError(f"bundle is bound to round {target_round}, which is not ours",
                                source)
    state = handle.state()
    verified = verify_bundle(staging, trust, policy,
                             expected_round=(state["round_id"], state["nonce"]))
    site = verified.site
    if state["status"] != "open":
        raise VerificationError(f"round {handle.round_id} is closed", source)
    if claimed_site is not None and claimed_site != site:
        raise VerificationError(
            f"bundle is signed by site {site} but was delivered as {claimed_site}", source)
    entry = state["sites"].get(site)
    if entry is None:
        raise VerificationError(f"site {site} was not asked in round {handle.round_id}", source)
    ledger = paths.received / f"{verified.digest}.json"
    if ledger.exists():
        earlier = json.loads(ledger.read_text(encoding="utf-8"))
        raise VerificationError(
            f"replay: bundle {verified.digest[:16]} was already received "
            f"(round {earlier.get('round')}, site {earlier.get('site')})", source)
    if entry["state"] == "verified":
        raise VerificationError(f"site {site} already delivered a bundle for this round", source)
    if verified.modality != state["modality"]:
        raise VerificationError(
            f"bundle holds {verified.modality}, the round asked for {state['modality']}", source)
    if verified.n_images > int(state["count"]):
        raise VerificationError(
            f"bundle holds {verified.n_images} images, the round asked for {state['count']}",
            source)
    verify_s = time.perf_counter() - started
    # Ledger first (exclusive create): two concurrent deliveries of one bundle cannot both pass.
    paths.received.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise VerificationError("replay: bundle was received concurrently", source) from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle_out:
        json.dump({"round": handle.round_id, "site": site, "via": via, "time": time.time()},
                  handle_out)
        handle_out.flush()
        os.fsync(handle_out.fileno())
    fsync_dir(paths.received)
    final = paths.bundles / verified.digest
    paths.bundles.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    fsync_dir(paths.bundles)
    if entry["state"] != "received":
        set_site_state(paths, handle, site, "received", "", via=via)
    set_site_state(paths, handle, site, "verified", "", bundle_digest=verified.digest,
                   n_images=verified.n_images, verify_s=round(verify_s, 4))
    append_audit(paths.audit, "bundle_verified", {
        "via": via, "round": handle.round_id, "site": site, "bundle_sha256": verified.digest,
        "n_images": verified.n_images, "signers": sorted(verified.signers),
    })
    return IntakeResult(True, "", source, via, site, handle.round_id, verified.digest,
                        verified.n_images, verify_s)
