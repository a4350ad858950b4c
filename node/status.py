"""What state a node home is in, for ``synthfed-node status``: one look for hospital IT.

Each part (store, generator, guard, outbox, audit log) is read on its own and reports its own
problem, so a half set-up or damaged home still gets a full answer. Nothing here writes: the
guard is not calibrated, no generator is loaded for sampling, no bundle is verified.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from node.config import NodeConfig, NodePaths
from protocols.errors import SynthfedError

__all__ = ["node_status", "format_status"]


def _problem(exc: Exception) -> str:
    if isinstance(exc, SynthfedError):
        return exc.diagnostics()
    return f"{type(exc).__name__}: {exc}"


def _store(paths: NodePaths) -> tuple[dict[str, Any], set[str], str | None]:
    """The store's counts, the pixel digests of its slices and the guard's reference digest
    (None for an empty store); from the catalog only, no pixel is read."""
    from node.errors import StoreError
    from node.guard.reference import reference_digest
    from node.store import Store

    if not (paths.store / "catalog.sqlite").exists():  # nothing ingested yet: create nothing
        return {"slices": 0, "patients": 0, "series": 0, "by_modality": {}, "by_split": {},
                "image_size": None}, set(), None
    with Store(paths.store) as store:
        out: dict[str, Any] = dict(store.summary())
        records = store.records()
        out["image_size"] = None
        if records:
            try:
                out["image_size"] = store.image_size()
            except StoreError as exc:  # several sizes: the counts still stand
                out["problem"] = exc.what
        digest = reference_digest(store) if records else None
        return out, {r.pixel_digest for r in records}, digest


def _generator(paths: NodePaths, held: set[str]) -> dict[str, Any]:
    from node.generator.checkpoint import checkpoint_path, load_checkpoint
    from node.generator.presets import config_from_dict
    from node.guard.run import check_generator_covered
    from privacy.errors import GuardError

    path = checkpoint_path(paths)
    if not path.exists():
        return {"state": "none", "next": "synthfed-node train"}
    state, sha = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    step, total = int(state["step"]), int(cfg.total_steps)
    out: dict[str, Any] = {
        "state": "trained" if step >= total else "partly trained",
        "preset": cfg.preset,
        "step": step,
        "total_steps": total,
        "run_id": state.get("run_id"),
        "train_slices": sum(int(v) for v in dict(state.get("counts_by_modality", {})).values()),
        "modalities": list(state.get("modalities", [])),
        "wall_s": round(float(state.get("wall_s", 0.0)), 1),
        "checkpoint_sha256": sha,
    }
    digests = state.get("train_pixel_digests")
    if digests is None and not held:  # an old checkpoint and no store: open (create) nothing
        out["store_holds_its_training_slices"] = False
        out["problem"] = "the store is empty: generate refuses it"
        return out
    try:  # the check generate makes before it samples anything
        check_generator_covered(paths, held, None if digests is None else set(digests),
                                str(state.get("train_split_digest", "")))
        out["store_holds_its_training_slices"] = True
    except GuardError as exc:
        out["store_holds_its_training_slices"] = False
        out["problem"] = f"generate refuses it: {exc.what}"
    if step < total and "problem" not in out:
        out["next"] = "synthfed-node train --resume"
    return out


def _guard(
    paths: NodePaths, config: NodeConfig, reference: str | None, image_size: int | None
) -> dict[str, Any]:
    from node.guard.calibration import inputs_digest

    cal = paths.guard / "calibration.json"
    if not cal.exists():
        return {"state": "not calibrated", "next": "the next generate or screen calibrates"}
    doc = json.loads(cal.read_text(encoding="utf-8"))
    current = (reference is not None and image_size is not None
               and doc.get("inputs_digest") == inputs_digest(reference, image_size, config))
    out: dict[str, Any] = {
        "state": "calibrated" if current else "stale",
        "reference_slices": doc.get("reference_slices"),
        "thresholds": {m: dict(entry.get("thresholds", {}))
                       for m, entry in dict(doc.get("modalities", {})).items()},
    }
    if not current:
        out["next"] = ("the store, guard settings or policy floors changed since calibration:"
                       " the next generate or screen recalibrates")
    return out


def _outbox(paths: NodePaths) -> dict[str, Any]:
    from node.export import list_outbox

    listing = list_outbox(paths)
    out: dict[str, Any] = {state: len(rows) for state, rows in listing.items()}
    unreadable = [row["bundle_id"] for rows in listing.values() for row in rows
                  if "problem" in row]
    if unreadable:
        out["problem"] = f"unreadable bundle(s): {', '.join(unreadable)} (review names why)"
    return out


def _audit(paths: NodePaths) -> dict[str, Any]:
    from protocols.audit import verify_audit_log

    report = verify_audit_log(paths.audit)
    return {"state": "intact", "records": report.records, "last_hash": report.last_hash}


def node_status(paths: NodePaths, config: NodeConfig) -> dict[str, Any]:
    """Every part's state; a part that cannot be read has ``{"problem": ...}`` instead."""
    from protocols.keys import load_public_key

    out: dict[str, Any] = {"home": str(paths.root), "site": config.site}
    try:
        out["site_keyid"] = load_public_key(paths.site_pub).keyid
    except Exception as exc:  # a missing or damaged key is reported, not raised
        out["site_keyid"] = None
        out["site_key_problem"] = _problem(exc)
    held: set[str] = set()
    reference: str | None = None
    try:
        out["store"], held, reference = _store(paths)
    except Exception as exc:
        out["store"] = {"problem": _problem(exc)}
    parts: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (
        ("generator", lambda: _generator(paths, held)),
        ("guard", lambda: _guard(paths, config, reference, out["store"].get("image_size"))),
        ("outbox", lambda: _outbox(paths)),
        ("audit", lambda: _audit(paths)),
    )
    for name, read in parts:
        try:
            out[name] = read()
        except Exception as exc:
            out[name] = {"state": "unreadable" if name != "audit" else "broken",
                         "problem": _problem(exc)}
    return out


def _counts(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items()))


def _store_line(st: dict[str, Any]) -> str:
    if "slices" not in st:
        return "store: UNREADABLE"
    if not st["slices"]:
        return "store: empty (synthfed-node ingest SOURCES)"
    size = "" if st["image_size"] is None else f" at {st['image_size']}x{st['image_size']}"
    return (f"store: {st['slices']:,} slices of {st['patients']:,} patients{size}"
            f" ({_counts(st['by_modality'])}); splits {_counts(st['by_split'])}")


def _generator_lines(g: dict[str, Any]) -> list[str]:
    if "preset" not in g:
        return [f"generator: {g['state']}" + (f" ({g['next']})" if "next" in g else "")]
    return [f"generator: {g['state']}, preset {g['preset']}, step {g['step']:,} of"
            f" {g['total_steps']:,}, {g['train_slices']:,} train slices, run {g['run_id']}"]


def _guard_lines(gd: dict[str, Any]) -> list[str]:
    if "thresholds" not in gd:
        return [f"guard: {gd['state']}" + (f" ({gd['next']})" if "next" in gd else "")]
    out = [f"guard: {gd['state']} against {gd['reference_slices']:,} slices"]
    for modality, th in sorted(gd["thresholds"].items()):
        out.append(f"  {modality} thresholds: "
                   + ", ".join(f"{m} {v:.4g}" for m, v in sorted(th.items())))
    return out


def _outbox_lines(ob: dict[str, Any]) -> list[str]:
    counts = {k: v for k, v in ob.items() if k not in ("problem", "state")}
    return ["outbox: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "UNREADABLE")]


def _audit_lines(au: dict[str, Any]) -> list[str]:
    if au["state"] == "intact":
        return [f"audit log: intact, {au['records']:,} records"]
    return ["audit log: BROKEN"]


def format_status(s: dict[str, Any]) -> str:
    """The human summary of :func:`node_status`: a line per part, then its problem and what
    to do next where there is one."""
    key = s.get("site_keyid") or f"UNREADABLE ({s.get('site_key_problem')})"
    lines = [f"node home {s['home']}: site {s['site']}, site key id {key}"]
    parts = (("store", lambda p: [_store_line(p)]), ("generator", _generator_lines),
             ("guard", _guard_lines), ("outbox", _outbox_lines), ("audit", _audit_lines))
    for name, render in parts:
        part = s[name]
        lines.extend(render(part))
        if "problem" in part:
            lines.append(f"  problem: {part['problem']}")
        if "next" in part and ("preset" in part or "thresholds" in part):
            lines.append(f"  next: {part['next']}")
    return "\n".join(lines)
