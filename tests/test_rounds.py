"""Round requests and replies (protocols.rounds), coordinator round state, node-side checks."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from roundkit import make_coordinator, make_site, set_node_policy

from coordinator.rounds import load_round, open_round, set_site_state
from node.config import load_node_config
from node.rounds import RoundRefused, check_request
from protocols.dsse import add_signature, parse_envelope
from protocols.errors import UsageError, VerificationError
from protocols.keys import generate_keypair, load_public_key, load_signing_key
from protocols.rounds import (
    RoundReply,
    RoundRequest,
    join_chunks,
    new_round_id,
    pack_bundle,
    sign_reply,
    sign_request,
    split_chunks,
    unpack_bundle,
    verify_reply,
    verify_request,
)


def _request(key, **change) -> RoundRequest:  # type: ignore[no-untyped-def]
    now = time.time()
    fields = dict(round_id=new_round_id(now), nonce="ab" * 32, modality="CT", image_size=64,
                  count=8, sites=("site-a",), created=now, expires=now + 3600,
                  coordinator_keyid=key.public.keyid)
    fields.update(change)
    return RoundRequest(**fields)  # type: ignore[arg-type]


# -- protocols.rounds ------------------------------------------------------------------------


def test_request_signed_by_the_coordinator_verifies_to_the_same_request() -> None:
    key = generate_keypair()
    request = _request(key)
    assert verify_request(sign_request(request, key), key.public) == request


def test_request_signed_by_another_key_is_refused() -> None:
    key, other = generate_keypair(), generate_keypair()
    data = sign_request(_request(other), other)
    with pytest.raises(VerificationError, match="unknown key"):
        verify_request(data, key.public)


def test_request_with_an_extra_signature_is_refused() -> None:
    key, other = generate_keypair(), generate_keypair()
    envelope = parse_envelope(sign_request(_request(key), key))
    with pytest.raises(VerificationError, match="unknown key"):
        verify_request(add_signature(envelope, other).to_bytes(), key.public)


def test_request_with_a_changed_count_is_refused() -> None:
    key = generate_keypair()
    data = json.loads(sign_request(_request(key), key))
    import base64

    payload = json.loads(base64.b64decode(data["payload"]))
    payload["count"] = 9999
    data["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(VerificationError, match="bad signature"):
        verify_request(json.dumps(data).encode(), key.public)


def test_expired_request_is_refused() -> None:
    key = generate_keypair()
    request = _request(key, created=time.time() - 7200, expires=time.time() - 3600)
    with pytest.raises(VerificationError, match="expired"):
        verify_request(sign_request(request, key), key.public)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"round_id": "../../etc"}, "round_id is malformed"),
        ({"nonce": "short"}, "nonce"),
        ({"modality": "XR"}, "modality"),
        ({"image_size": 63}, "image_size"),
        ({"count": 0}, "count"),
        ({"sites": ("bad/site",)}, "site name"),
    ],
)
def test_malformed_request_is_refused_before_signing(change: dict, message: str) -> None:
    with pytest.raises(VerificationError, match=message):
        _request(generate_keypair(), **change)


def test_reply_verifies_only_with_the_site_key_of_the_site_it_names() -> None:
    site, other = generate_keypair(), generate_keypair()
    reply = RoundReply("r", "n", "site-a", "generating")
    data = sign_reply(reply, site)
    assert verify_reply(data, {"site-a": site.public}) == reply
    with pytest.raises(VerificationError, match="unknown key"):
        verify_reply(data, {"site-a": other.public})
    with pytest.raises(VerificationError, match="unknown site"):
        verify_reply(data, {"site-b": site.public})


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b", "./x"])
def test_archive_member_escaping_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    data = _tar([(tarfile.TarInfo(name), b"x")])
    with pytest.raises(VerificationError, match="not allowed"):
        unpack_bundle(data, tmp_path / "out", 1 << 20)
    assert not (tmp_path / "out").exists()


def test_archive_with_a_symlink_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("link")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    with pytest.raises(VerificationError, match="not allowed"):
        unpack_bundle(_tar([(info, b"")]), tmp_path / "out", 1 << 20)


def test_archive_over_the_byte_cap_is_refused(tmp_path: Path) -> None:
    data = _tar([(tarfile.TarInfo("images.npy"), b"x" * 5000)])
    with pytest.raises(VerificationError, match="larger than the policy"):
        unpack_bundle(data, tmp_path / "out", 4000)


_names = st.lists(st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8})?\.bin", fullmatch=True),
                  min_size=1, max_size=5, unique=True)


@settings(max_examples=25, deadline=None)
@given(names=_names, payload=st.binary(max_size=3000))
def test_pack_then_unpack_gives_back_the_same_files(names: list[str], payload: bytes) -> None:
    import tempfile

    # a file and a folder of the same name cannot coexist; drop such clashes
    tops = {n.split("/")[0] for n in names if "/" in n}
    names = [n for n in names if n not in tops]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for i, name in enumerate(names):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(payload + bytes([i]))
        out = unpack_bundle(pack_bundle(src), Path(tmp) / "out", 1 << 24)
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) \
            == sorted(names)
        for i, name in enumerate(names):
            assert (out / name).read_bytes() == payload + bytes([i])


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=5000), size=st.integers(1024, 4096))
def test_chunks_join_back_to_the_same_bytes(data: bytes, size: int) -> None:
    from protocols.files import sha256_hex

    chunks = split_chunks(data, size)
    assert all(len(c) <= size for c in chunks)
    assert join_chunks(chunks, sha256_hex(data)) == data


def test_chunks_altered_in_transit_are_refused() -> None:
    from protocols.files import sha256_hex

    chunks = split_chunks(b"a" * 3000, 1024)
    digest = sha256_hex(b"a" * 3000)
    chunks[1] = b"b" * 1024
    with pytest.raises(VerificationError, match="do not match"):
        join_chunks(chunks, digest)


# -- coordinator rounds ------------------------------------------------------------------------


def test_open_round_writes_a_signed_request_and_asks_every_trusted_site(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    for name in ("site-a", "site-b"):
        make_site(tmp_path, name, coord)
    handle = open_round(coord, "CT", 64, 12)
    request = verify_request(handle.request_bytes(), load_public_key(coord.coordinator_pub))
    state = handle.state()
    assert request.round_id == handle.round_id == state["round_id"]
    assert request.nonce == state["nonce"] and len(state["nonce"]) == 64
    assert request.sites == ("site-a", "site-b")
    assert {s: e["state"] for s, e in state["sites"].items()} == {
        "site-a": "asked", "site-b": "asked"}
    assert request.minimums["required_reviewer_signatures"] == 1
    assert open_round(coord, "CT", 64, 12).state()["nonce"] != state["nonce"]


def test_open_round_refuses_a_site_not_in_the_trust_store(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    make_site(tmp_path, "site-a", coord)
    with pytest.raises(UsageError, match="not in the trust store: site-z"):
        open_round(coord, "CT", 64, 4, ["site-a", "site-z"])


def test_site_state_follows_the_state_machine(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "MR", 64, 4)
    set_site_state(coord, handle, "site-a", "generating")
    set_site_state(coord, handle, "site-a", "refused", "modality MR is not offered")
    state = load_round(coord, handle.round_id).state()["sites"]["site-a"]
    assert (state["state"], state["reason"]) == ("refused", "modality MR is not offered")
    assert [h["state"] for h in state["history"]] == ["asked", "generating"]
    with pytest.raises(UsageError, match="cannot go from refused to verified"):
        set_site_state(coord, handle, "site-a", "verified")


# -- node-side checks --------------------------------------------------------------------------


def _node_check(tmp_path: Path, count: int = 4, modality: str = "CT", **policy: object):  # type: ignore[no-untyped-def]
    coord = make_coordinator(tmp_path)
    site = make_site(tmp_path, "site-a", coord, **policy)
    handle = open_round(coord, modality, 64, count)
    return site, handle, coord


def test_node_accepts_a_request_its_policy_allows(tmp_path: Path) -> None:
    site, handle, _ = _node_check(tmp_path)
    request = check_request(site.paths, load_node_config(site.paths), handle.request_bytes())
    assert request.round_id == handle.round_id


@pytest.mark.parametrize(
    ("policy", "count", "modality", "reason"),
    [
        ({"modalities_offered": ["MR"]}, 4, "CT", "modality CT is not offered"),
        ({"max_images_per_round": 3}, 4, "CT", "count 4 is over this site's cap of 3"),
        ({"coordinator_key": ""}, 4, "CT", "no coordinator key"),
    ],
)
def test_node_refuses_what_its_policy_does_not_allow(
    tmp_path: Path, policy: dict, count: int, modality: str, reason: str
) -> None:
    site, handle, _ = _node_check(tmp_path, count, modality)
    set_node_policy(site.paths, **policy)
    with pytest.raises(RoundRefused, match=reason):
        check_request(site.paths, load_node_config(site.paths), handle.request_bytes())


def test_node_refuses_a_second_round_inside_its_rate_limit(tmp_path: Path) -> None:
    from node.rounds import NodeRound, save_node_round

    site, handle, coord = _node_check(tmp_path, min_minutes_between_rounds=60.0)
    save_node_round(site.paths, NodeRound("r-20260101T000000Z-00000000", "aa" * 32, "x", "CT",
                                          4, "sent", accepted_at=time.time() - 600))
    with pytest.raises(RoundRefused, match="rate limit"):
        check_request(site.paths, load_node_config(site.paths), handle.request_bytes())


def test_node_refuses_a_request_for_another_image_size(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    site = make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "CT", 128, 4)
    with pytest.raises(RoundRefused, match="image size 128 differs"):
        check_request(site.paths, load_node_config(site.paths), handle.request_bytes())


def test_coordinator_key_is_written_0600(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    assert coord.coordinator_key.stat().st_mode & 0o777 == 0o600
    assert load_signing_key(coord.coordinator_key).public == load_public_key(coord.coordinator_pub)


def test_evaluate_reply_carries_only_numbers(node_home: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import node.evaluate
    from node.client_app import app

    seen = {}

    def fake_evaluate(paths, config, blob, task, seed=0):  # type: ignore[no-untyped-def]
        seen.update(blob=blob, task=task)
        return {"psnr": [30.0, 31.5], "psnr_mean": 30.75, "site_note": "text never leaves",
                "ok": True}

    monkeypatch.setattr(node.evaluate, "evaluate_model", fake_evaluate)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict({"synthfed": ConfigRecord({"model": [b"ab", b"cd"],
                                                        "task": "sr"})}),
                  dst_node_id=7, message_type="evaluate")
    ctx = Context(run_id=1, node_id=7, node_config={"home": str(node_home)},
                  state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    assert seen == {"blob": b"abcd", "task": "sr"}
    assert dict(reply.content.metric_records["metrics"]) == {"psnr": [30.0, 31.5],
                                                             "psnr_mean": 30.75}
    # the one text that goes back is the site's consortium id (node.yaml), to label the numbers
    assert {k: dict(v) for k, v in reply.content.config_records.items()} == {
        "site": {"site": "site-a"}}


def _signed(payload: bytes, key, kind: str = "request") -> bytes:  # type: ignore[no-untyped-def]
    from protocols.dsse import sign_envelope
    from protocols.rounds import ROUND_REPLY_TYPE, ROUND_REQUEST_TYPE

    return sign_envelope(payload, ROUND_REQUEST_TYPE if kind == "request" else ROUND_REPLY_TYPE,
                         [key]).to_bytes()


def test_signed_requests_with_malformed_payloads_are_refused() -> None:
    # Signed by the trusted coordinator key, and still refused: the node parses strictly.
    key = generate_keypair()
    good = json.loads(_request(key).to_payload())
    cases = [
        (b"not json", "payload is not JSON"),
        (b"[1, 2]", "payload is not a JSON object"),
        (json.dumps(dict(good, extra=1)).encode(), "fields wrong (extra ['extra'], missing [])"),
        (json.dumps({k: v for k, v in good.items() if k != "count"}).encode(),
         "fields wrong (extra [], missing ['count'])"),
        (json.dumps(dict(good, count="8")).encode(), "field count has the wrong type"),
        (json.dumps(dict(good, count=True)).encode(), "field count has the wrong type"),
    ]
    for payload, message in cases:
        with pytest.raises(VerificationError) as err:
            verify_request(_signed(payload, key), key.public)
        assert err.value.what.startswith(message), (message, err.value.what)
    other = generate_keypair()  # signed by the trusted key, naming another coordinator key
    naming_other = _request(other).to_payload()
    with pytest.raises(VerificationError, match="names a different coordinator key than"):
        verify_request(_signed(naming_other, key), key.public)
    future = _request(key, created=time.time() + 3600, expires=time.time() + 7200)
    with pytest.raises(VerificationError, match="request is dated in the future"):
        verify_request(sign_request(future, key), key.public)
    with pytest.raises(VerificationError, match="request names a different coordinator key"):
        sign_request(_request(other), key)


def test_replies_are_refused_unless_the_named_sites_key_signed_a_well_formed_one() -> None:
    site_a, site_b = generate_keypair(), generate_keypair()
    keys = {"site-a": site_a.public, "site-b": site_b.public}
    reply = RoundReply(round_id=new_round_id(), nonce="ab" * 32, site="site-a",
                       state="awaiting_approval", reason="waiting for the reviewer",
                       bundle_sha256="", bundle_bytes=0, archive_sha256="",
                       sent=time.time(), timings_s={"generate": 1.5})
    assert verify_reply(sign_reply(reply, site_a), keys) == reply
    with pytest.raises(VerificationError, match="unknown key"):
        verify_reply(sign_reply(reply, site_b), keys)  # site-b signs a reply naming site-a
    with pytest.raises(VerificationError, match="reply from unknown site 'site-a'"):
        verify_reply(sign_reply(reply, site_a), {"site-b": site_b.public})
    body = json.loads(reply.to_payload())
    for timings in ({"generate": "slow"}, {"generate": True}):
        with pytest.raises(VerificationError, match="timings_s must map names to numbers"):
            verify_reply(_signed(json.dumps(dict(body, timings_s=timings)).encode(), site_a,
                                 "reply"), keys)
