"""``synthfed-manifest keygen | verify | show``: the bundle tools a reviewer or coordinator runs.

Light on purpose: importing this module (and running ``verify``) loads no torch, ray, faiss or
numpy; digests are streamed from disk. ``verify`` exits 0 with a summary, or 2 with the reason.
``show`` prints what a manifest claims WITHOUT verifying it, and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from protocols.cli_support import emit

__all__ = ["register"]

JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]


def _human_summary(summary: dict[str, Any], policy_used: bool) -> str:
    rnd = summary["round"]
    lines = [
        f"bundle {summary['bundle_id']} verified",
        f"  site: {summary['site']}",
        f"  round: {'none' if rnd is None else rnd['id'] + ' (nonce ' + rnd['nonce'] + ')'}",
        f"  images: {summary['images']} x {summary['shape'][1]} x {summary['shape'][2]} "
        f"{summary['modality']} ({summary['unit']}, {summary['dtype']})",
        "  thresholds: "
        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary["thresholds"].items())),
        f"  signatures: {len(summary['signers'])} "
        f"({summary['reviewer_signatures']} reviewer)",
        f"  files: {summary['files']}, {summary['bytes']} bytes",
        f"  manifest sha256: {summary['manifest_sha256']}",
        f"  policy: {'checked' if policy_used else 'none given (signatures and files only)'}",
    ]
    if summary["demo_auto_approved"]:
        lines.append("  DEMO: approved by a scripted demo reviewer")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("keygen")
    def keygen_command(
        out: Annotated[
            Path, typer.Option("--out", help="PREFIX: writes PREFIX.ed25519 (0600), PREFIX.pub")
        ],
        audit_log: Annotated[
            Path | None,
            typer.Option(
                "--audit-log",
                help="also record the key's creation (key id only) in this audit log, e.g. "
                "the node home's audit.jsonl",
            ),
        ] = None,
        role: Annotated[
            str, typer.Option("--role", help="what the key is for, for the audit record")
        ] = "reviewer",
        json_out: JsonOption = False,
    ) -> None:
        """Make an Ed25519 key pair (site or reviewer key)."""
        from protocols.audit import append_audit
        from protocols.keys import generate_keypair, write_keypair

        private = out.with_name(out.name + ".ed25519")
        public = out.with_name(out.name + ".pub")
        from protocols.errors import UsageError

        if public.exists():
            raise UsageError("refusing to overwrite an existing key", str(public))
        key = generate_keypair()
        write_keypair(key, private, public)
        if audit_log is not None:
            append_audit(audit_log, "key_created", {"role": role, "keyid": key.public.keyid})
        emit(
            json_out,
            {"private_key": str(private), "public_key": str(public), "keyid": key.public.keyid,
             "public_hex": key.public.hex},
            f"wrote {private} (0600) and {public}\nkey id: {key.public.keyid}\n"
            f"public key (hex, for node.yaml / the trust store): {key.public.hex}",
        )

    @app.command("verify")
    def verify_command(
        bundle: Annotated[Path, typer.Argument(help="bundle folder")],
        key: Annotated[
            list[Path] | None,
            typer.Option("--key", help="trusted public key file (repeatable)"),
        ] = None,
        trust_store: Annotated[
            Path | None, typer.Option("--trust-store", help="trust store JSON file")
        ] = None,
        policy: Annotated[
            Path | None, typer.Option("--policy", help="policy file (JSON or YAML)")
        ] = None,
        round_id: Annotated[
            str | None, typer.Option("--round", help="expected round id (needs --nonce)")
        ] = None,
        nonce: Annotated[str | None, typer.Option("--nonce", help="expected round nonce")] = None,
        json_out: JsonOption = False,
    ) -> None:
        """Verify every signature, digest, file, the schema and (with --policy) the policy."""
        from protocols.bundle import verify_bundle
        from protocols.errors import UsageError
        from protocols.keys import PublicKey, load_public_key
        from protocols.policy import load_policy
        from protocols.trust import TrustStore

        if bool(key) == (trust_store is not None):
            raise UsageError("give either --key PUB (one or more) or --trust-store FILE")
        if (round_id is None) != (nonce is None):
            raise UsageError("--round and --nonce go together")
        trust: TrustStore | dict[str, PublicKey]
        if trust_store is not None:
            trust = TrustStore.load(trust_store)
        else:
            keys = [load_public_key(p) for p in key or []]
            trust = {k.keyid: k for k in keys}
        pol = load_policy(policy) if policy is not None else None
        expected = (round_id, nonce) if round_id is not None and nonce is not None else None
        verified = verify_bundle(bundle, trust, pol, expected)
        summary = verified.summary()
        summary["policy_checked"] = pol is not None
        emit(json_out, summary, _human_summary(summary, pol is not None))

    @app.command("show")
    def show_command(
        bundle: Annotated[Path, typer.Argument(help="bundle folder")],
        json_out: JsonOption = False,
    ) -> None:
        """Print what a manifest claims, WITHOUT verifying it (use verify for that)."""
        import json

        from protocols.bundle import read_unverified

        envelope, statement = read_unverified(bundle)
        pred = statement["predicate"]
        obj = {
            "verified": False,
            "payloadType": envelope.payload_type,
            "signature_keyids": [kid for kid, _ in envelope.signatures],
            "statement": statement,
        }
        human = (
            "UNVERIFIED manifest (run `synthfed-manifest verify` to check it)\n"
            f"signatures by key ids: {', '.join(k[:16] for k, _ in envelope.signatures)}\n"
            f"subjects: {len(statement['subject'])} files\n"
            f"predicateType: {statement['predicateType']}\n"
            + json.dumps(pred, indent=2, sort_keys=True)
        )
        emit(json_out, obj, human)
