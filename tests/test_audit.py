import json
from pathlib import Path

import pytest

from protocols.audit import append_audit, verify_audit_log
from protocols.errors import VerificationError


def _log(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    for i in range(n):
        append_audit(path, "event", {"i": i})
    return path


def test_intact_chain_verifies(tmp_path: Path) -> None:
    report = verify_audit_log(_log(tmp_path))
    assert report.records == 5


def test_edited_middle_record_is_named(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    record = json.loads(lines[2])
    record["details"]["i"] = 99
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(VerificationError) as err:
        verify_audit_log(path)
    assert err.value.where == f"{path}:3"
    assert "edited" in err.value.reason


def test_deleted_middle_record_is_named(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    del lines[2]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(VerificationError) as err:
        verify_audit_log(path)
    assert err.value.where == f"{path}:3"
    assert "record 2 is missing" in err.value.reason


def test_rehashed_edit_still_breaks_the_chain(tmp_path: Path) -> None:
    # An attacker who recomputes the edited record's own hash still breaks the next one's prev.
    from protocols.files import canonical_json, sha256_hex

    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["details"]["i"] = 42
    body = {k: v for k, v in record.items() if k != "hash"}
    record["hash"] = sha256_hex(canonical_json(body))
    lines[1] = canonical_json(record).decode()
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(VerificationError) as err:
        verify_audit_log(path)
    assert err.value.where == f"{path}:3"


def test_truncated_last_record_is_reported(tmp_path: Path) -> None:
    path = _log(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(VerificationError) as err:
        verify_audit_log(path)
    assert err.value.where == f"{path}:5"


def test_concurrent_appenders_never_fork_the_chain(tmp_path: Path) -> None:
    import multiprocessing

    path = tmp_path / "audit.jsonl"
    append_audit(path, "start", {})
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert verify_audit_log(path).records == 1 + 4 * 25


def _append_many(path: Path, worker: int) -> None:
    for i in range(25):
        append_audit(path, "event", {"worker": worker, "i": i})


def test_damaged_last_record_stops_appending_and_every_damage_is_named(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    with pytest.raises(VerificationError, match="audit log not found"):
        verify_audit_log(log)
    append_audit(log, "first", {"n": 1})
    good = log.read_bytes()
    log.write_bytes(good + b'{"seq": "x"}\n')  # a last record without a usable seq
    with pytest.raises(VerificationError, match="last audit record is damaged; run audit"):
        append_audit(log, "second", {"n": 2})
    assert log.read_bytes() == good + b'{"seq": "x"}\n'  # nothing appended after the damage
    for tail, message in ((b"not json\n", "record is not JSON"),
                          (b"[1, 2]\n", "record is not a JSON object")):
        log.write_bytes(good + tail)
        with pytest.raises(VerificationError, match=message) as err:
            verify_audit_log(log)
        assert err.value.where == f"{log}:2"
    # A record re-serialised with its own hash intact but not in canonical form is an edit.
    record = json.loads(good)
    log.write_bytes(json.dumps(record, indent=None, separators=(", ", ": ")).encode() + b"\n")
    with pytest.raises(VerificationError, match="not in canonical form"):
        verify_audit_log(log)


def test_a_record_longer_than_the_tail_block_is_read_back_whole(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    append_audit(log, "big", {"text": "x" * 200_000})  # over the 64 KiB first block
    append_audit(log, "after", {})
    assert verify_audit_log(log).records == 2
