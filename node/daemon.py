"""The node daemon's round logic: answer a signed round request, durably, step by step.

Each request (and each later poll of the same round) advances the round's state on disk as far
as it can: accepted -> generating (contract B ``generate``, bound to the round id and nonce) ->
awaiting_approval (the bundle waits in outbox/pending for ``synthfed-node approve``) -> approved
-> sent. The daemon never approves a bundle itself, with two exceptions a reader can see: the
site policy requires zero reviewer signatures, or the demo switch ``auto_approve_key`` (a
scripted reviewer, only for simulations; the export records it in the manifest).

What leaves the node is only ever a signed reply and, in state approved / sent, the packed
bytes of a bundle that this node has just verified itself (every digest and signature, bound to
the round), so a half-written or altered bundle is never sent. A daemon killed while generating
holds no lock afterwards; the next poll finds the round in state "generating", adopts a bundle
that the killed run finished exporting (export is atomic), or generates again with the same
seed.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import NodeConfig, NodePaths, load_node_config
from node.rounds import (
    NodeRound,
    RoundRefused,
    check_policy,
    load_node_round,
    node_round_lock,
    save_node_round,
    verify_signed_request,
)
from protocols.audit import append_audit
from protocols.errors import SynthfedError, VerificationError
from protocols.files import sha256_hex
from protocols.keys import SigningKey, load_signing_key
from protocols.rounds import RoundReply, RoundRequest, pack_bundle, sign_reply

__all__ = ["DaemonReply", "handle_round_request", "GenerateFn", "own_trust"]

GenerateFn = Callable[..., Path]


@dataclass(frozen=True)
class DaemonReply:
    reply: RoundReply
    envelope: bytes
    bundle: bytes | None = None


def _default_generate(paths: NodePaths, config: NodeConfig, count: int, seed: int,
                      round_id: str, nonce: str, *, modality: str | None = None,
                      demo_auto_approved: bool = False) -> Path:
    """Contract B's generate; with the demo switch, its two steps so the manifest says so."""
    if not demo_auto_approved:
        from node.guard.run import generate

        return Path(generate(paths, config, count, seed=seed, round_id=round_id, nonce=nonce,
                             progress=False, modality=modality))
    from node.export import export_bundle
    from node.guard.run import generate_and_screen

    run = generate_and_screen(paths, config, count, seed=seed, round_id=round_id, nonce=nonce,
                              progress=False, modality=modality)
    return Path(export_bundle(paths, config, run.images_physical, modality=run.modality,
                              unit=run.unit, distances=run.distances, guard=run.report,
                              generator=run.generator, round_id=round_id, nonce=nonce,
                              pixel_spacing_mm=run.pixel_spacing_mm, demo_auto_approved=True))


def own_trust(paths: NodePaths, config: NodeConfig) -> Any:
    """A trust store holding only this site's own keys (to check a bundle before sending)."""
    from node.export import site_trust

    return site_trust(paths, config)


def _reply(site_key: SigningKey, site: str, request: RoundRequest | None, state: str,
           reason: str = "", bundle: bytes | None = None, bundle_sha256: str = "",
           timings: dict[str, float] | None = None) -> DaemonReply:
    reply = RoundReply(
        round_id=request.round_id if request else "",
        nonce=request.nonce if request else "",
        site=site,
        state=state,
        reason=reason,
        bundle_sha256=bundle_sha256,
        bundle_bytes=len(bundle) if bundle is not None else 0,
        archive_sha256=sha256_hex(bundle) if bundle is not None else "",
        sent=time.time(),
        timings_s=dict(timings or {}),
    )
    return DaemonReply(reply, sign_reply(reply, site_key), bundle)


def _transition(paths: NodePaths, record: NodeRound, state: str, reason: str = "",
                **fields: Any) -> None:
    history = list(record.history or [])
    history.append({"state": record.state, "until": time.time()})
    record.history = history
    record.state = state
    record.reason = reason
    for key, value in fields.items():
        setattr(record, key, value)
    save_node_round(paths, record)
    append_audit(paths.audit, f"round_{state}", {
        "round": record.round_id, "reason": reason, "bundle_id": record.bundle_id,
    })


def handle_round_request(
    paths: NodePaths,
    data: bytes,
    *,
    auto_approve_key: SigningKey | None = None,
    now: float | None = None,
    generate_fn: GenerateFn | None = None,
) -> DaemonReply:
    """Answer one round request (or poll); see the module docstring."""
    config = load_node_config(paths)
    site_key = load_signing_key(paths.site_key)
    try:
        request = verify_signed_request(config, data, now)
    except RoundRefused as exc:
        append_audit(paths.audit, "round_request_refused", {"reason": exc.what})
        return _reply(site_key, config.site, None, "refused", exc.what)
    started = time.perf_counter()
    with node_round_lock(paths, request.round_id, blocking=False) as held:
        if not held:
            return _reply(site_key, config.site, request, "generating",
                          "another worker of this node is on this round")
        record = load_node_round(paths, request.round_id)
        if record is not None and (record.nonce != request.nonce
                                   or record.request_sha256 != request.digest):
            reason = "a different request with this round id was answered before"
            append_audit(paths.audit, "round_request_refused",
                         {"round": request.round_id, "reason": reason})
            return _reply(site_key, config.site, request, "refused", reason)
        if record is None:
            try:
                check_policy(paths, config, request, now)
            except RoundRefused as exc:
                record = NodeRound(request.round_id, request.nonce, request.digest,
                                   request.modality, request.count, "refused", exc.what)
                save_node_round(paths, record)
                append_audit(paths.audit, "round_refused",
                             {"round": request.round_id, "reason": exc.what})
                return _reply(site_key, config.site, request, "refused", exc.what)
            record = NodeRound(
                request.round_id, request.nonce, request.digest, request.modality,
                request.count, "accepted",
                seed=int(request.nonce[:8], 16),
                accepted_at=time.time() if now is None else now,
            )
            save_node_round(paths, record)
            append_audit(paths.audit, "round_accepted", {
                "round": request.round_id, "modality": request.modality,
                "count": request.count, "request_sha256": request.digest,
            })
        reply = _advance(paths, config, site_key, request, record, auto_approve_key,
                         generate_fn or _default_generate)
    timings = dict(reply.reply.timings_s)
    timings["handler"] = time.perf_counter() - started
    return _reply(site_key, config.site, request, reply.reply.state, reply.reply.reason,
                  reply.bundle, reply.reply.bundle_sha256, timings)


def _find_round_bundle(paths: NodePaths, config: NodeConfig, record: NodeRound
                       ) -> tuple[str, str] | None:
    """(outbox state, bundle id) of a verified bundle of ours bound to this round, if any."""
    from protocols.bundle import verify_bundle

    trust = own_trust(paths, config)
    for state in ("sent", "approved", "pending"):
        folder = paths.outbox / state
        if not folder.is_dir():
            continue
        for bundle in sorted(folder.iterdir()):
            if not bundle.is_dir() or bundle.name.startswith("."):
                continue
            try:
                verify_bundle(bundle, trust, None, expected_round=(record.round_id, record.nonce))
            except SynthfedError:
                continue
            return state, bundle.name
    return None


def _advance(
    paths: NodePaths,
    config: NodeConfig,
    site_key: SigningKey,
    request: RoundRequest,
    record: NodeRound,
    auto_approve_key: SigningKey | None,
    generate_fn: GenerateFn,
) -> DaemonReply:
    timings: dict[str, float] = {}
    if record.state in ("refused", "failed"):
        return _reply(site_key, config.site, request, record.state, record.reason)

    if record.state in ("accepted", "generating"):
        if record.state == "generating":
            # We hold the round lock, so the run that set "generating" is gone (killed).
            append_audit(paths.audit, "round_generation_interrupted",
                         {"round": record.round_id, "attempts": record.attempts})
        found = _find_round_bundle(paths, config, record)
        if found is not None:
            where, bundle_id = found
            next_state = {"pending": "awaiting_approval", "approved": "approved",
                          "sent": "sent"}[where]
            _transition(paths, record, next_state, "adopted a finished export", bundle_id=bundle_id)
        else:
            if record.attempts >= 3:
                _transition(paths, record, "failed", "generation was interrupted three times")
                return _reply(site_key, config.site, request, "failed", record.reason)
            _transition(paths, record, "generating", attempts=record.attempts + 1)
            t0 = time.perf_counter()
            try:
                bundle_dir = generate_fn(paths, config, record.count, record.seed,
                                         record.round_id, record.nonce,
                                         modality=record.modality,
                                         demo_auto_approved=auto_approve_key is not None)
            except Exception as exc:  # recorded as the round's failure reason, and audited
                # Only an expected error's one-line reason leaves the node; anything else is
                # named by its type and kept in the local audit log.
                local = exc.what if isinstance(exc, SynthfedError) else (
                    f"{type(exc).__name__}: {exc}")
                append_audit(paths.audit, "round_generation_error",
                             {"round": record.round_id, "error": local[:2000]})
                shared = local if _expected(exc) else (
                    f"{type(exc).__name__} (details in the site's audit log)")
                _transition(paths, record, "failed", f"generation failed: {shared[:300]}")
                return _reply(site_key, config.site, request, "failed", record.reason)
            timings["generate"] = time.perf_counter() - t0
            _transition(paths, record, "awaiting_approval", bundle_id=Path(bundle_dir).name,
                        awaiting_since=time.time())

    if record.state == "awaiting_approval":
        pending = paths.outbox / "pending" / record.bundle_id
        approved = paths.outbox / "approved" / record.bundle_id
        if not approved.is_dir() and pending.is_dir():
            if config.policy.reviewer_signatures_required == 0 or auto_approve_key is not None:
                t0 = time.perf_counter()
                _self_approve(paths, pending, auto_approve_key)
                timings["approve"] = time.perf_counter() - t0
        if approved.is_dir():
            waited = time.time() - (record.awaiting_since or time.time())
            timings["review_wait"] = max(0.0, waited)
            _transition(paths, record, "approved")
        elif (paths.outbox / "sent" / record.bundle_id).is_dir():
            _transition(paths, record, "sent")
        elif not pending.is_dir():
            _transition(paths, record, "failed", "the pending bundle was removed before approval")
            return _reply(site_key, config.site, request, "failed", record.reason)
        else:
            return _reply(site_key, config.site, request, "awaiting_approval",
                          "waiting for the reviewer: synthfed-node approve", timings=timings)

    if record.state in ("approved", "sent"):
        approved = paths.outbox / "approved" / record.bundle_id
        bundle_dir = approved if approved.is_dir() else paths.outbox / "sent" / record.bundle_id
        if not bundle_dir.is_dir():
            _transition(paths, record, "failed", "the approved bundle left the outbox")
            return _reply(site_key, config.site, request, "failed", record.reason)
        t0 = time.perf_counter()
        try:
            data, digest = _checked_pack(paths, config, record, bundle_dir)
        except VerificationError as exc:
            _transition(paths, record, "failed", f"own bundle failed verification: {exc.what}")
            return _reply(site_key, config.site, request, "failed", record.reason)
        timings["pack"] = time.perf_counter() - t0
        if bundle_dir == approved:
            _move_to_sent(paths, approved)
        if record.state != "sent":
            _transition(paths, record, "sent", bundle_sha256=digest)
        append_audit(paths.audit, "round_bundle_replied", {
            "round": record.round_id, "bundle_id": record.bundle_id, "bundle_sha256": digest,
            "bytes": len(data),
        })
        return _reply(site_key, config.site, request, "bundle", "", data, digest, timings)

    raise VerificationError(f"round in unknown state {record.state!r}", record.round_id)


def _expected(exc: BaseException) -> bool:
    """An expected failure whose one-line message is written for people (ours or the guard's)."""
    if isinstance(exc, SynthfedError):
        return True
    # privacy must not be imported here just to name its error; match it as the CLIs do.
    return type(exc).__module__.startswith("privacy") and any(
        c.__name__ == "GuardError" for c in type(exc).__mro__)


def _checked_pack(paths: NodePaths, config: NodeConfig, record: NodeRound, bundle_dir: Path
                  ) -> tuple[bytes, str]:
    """Verify our own bundle (bound to the round), then pack exactly the verified bytes."""
    import tempfile

    from protocols.bundle import verify_bundle

    verified = verify_bundle(bundle_dir, own_trust(paths, config), None,
                             expected_round=(record.round_id, record.nonce))
    data = pack_bundle(bundle_dir)
    # Check the packed bytes themselves, so what leaves is exactly what was verified.
    from protocols.rounds import unpack_bundle

    with tempfile.TemporaryDirectory(dir=paths.root / "rounds") as tmp:
        again = verify_bundle(unpack_bundle(data, Path(tmp) / "b", len(data) + 1),
                              own_trust(paths, config), None,
                              expected_round=(record.round_id, record.nonce))
    if again.digest != verified.digest:
        raise VerificationError("packed bundle differs from the verified one", str(bundle_dir))
    return data, verified.digest


def _self_approve(paths: NodePaths, pending: Path, key: SigningKey | None) -> None:
    """The two visible exceptions to "a reviewer approves": a zero-signature site policy, or
    the demo switch (a scripted reviewer key, which must be one of policy.reviewer_keys)."""
    from node.export import approve_bundle
    from protocols.bundle import read_unverified

    if key is not None:
        # The scripted reviewer signs only a bundle whose signed manifest says it will.
        if not read_unverified(pending)[1]["predicate"]["demo_auto_approved"]:
            return
        append_audit(paths.audit, "demo_auto_approve", {
            "bundle_id": pending.name, "reviewer_keyid": key.public.keyid,
            "note": "DEMO SWITCH: scripted reviewer approval",
        })
    approve_bundle(paths, pending, key)


def _move_to_sent(paths: NodePaths, approved: Path) -> None:
    """Contract C's send_bundle (copy to a folder, move to sent); the copy is not needed."""
    from node.export import send_bundle

    scratch = paths.root / "rounds" / f".send-{secrets.token_hex(4)}"
    scratch.mkdir(parents=True)
    try:
        send_bundle(paths, approved, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
