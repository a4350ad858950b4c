"""The in-toto Statement v1 and the synthfed bundle predicate: strict schema."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import VerificationError
from protocols.files import canonical_json
from protocols.statement import (
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    check_subject_name,
    make_statement,
    parse_statement,
)

DIGEST = "ab" * 32


def predicate() -> dict[str, Any]:
    return {
        "bundle_id": "site-a-20260101T000000Z-0011aabb",
        "site": "site-a",
        "round": {"id": "r1", "nonce": "n1"},
        "created": "2026-01-01T00:00:00Z",
        "software": {"name": "synthfed", "version": "0.1.0"},
        "images": {
            "file": "images.npy",
            "metadata": "images.jsonl",
            "count": 2,
            "shape": [2, 16, 16],
            "dtype": "int16",
            "unit": "HU",
            "modality": "CT",
            "encoding": "physical values (HU) rounded to the nearest integer",
            "pixel_spacing_mm": 1.5,
            "dicom": False,
        },
        "thresholds": {"rmse": 0.05},
        "canary_catch_rates": {"exact": 1.0},
        "generator": {"architecture": "x", "counts_by_modality": {"CT": 3}},
        "guard": {"candidates_tried": 4, "quantiles": [0.1, 0.2]},
        "demo_auto_approved": False,
    }


def statement() -> dict[str, Any]:
    return make_statement({"images.npy": DIGEST, "images.jsonl": DIGEST}, predicate())


def test_statement_is_in_toto_v1_with_versioned_predicate_type() -> None:
    s = statement()
    assert s["_type"] == STATEMENT_TYPE == "https://in-toto.io/Statement/v1"
    assert s["predicateType"] == PREDICATE_TYPE == "https://synthfed.org/bundle/v1"
    assert s["subject"] == [
        {"name": "images.jsonl", "digest": {"sha256": DIGEST}},
        {"name": "images.npy", "digest": {"sha256": DIGEST}},
    ]
    assert parse_statement(canonical_json(s)) == s


def _mutated(path: list[str], value: Any) -> bytes:
    s = statement()
    target = s
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return canonical_json(s)


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (["_type"], "https://in-toto.io/Statement/v0.1", "_type is"),
        (["predicateType"], "https://synthfed.org/bundle/v2", "predicateType is"),
        (["predicate", "images", "count"], True, "count has the wrong type"),
        (["predicate", "images", "count"], 2.0, "count has the wrong type"),
        (["predicate", "images", "count"], 3, "count differs from shape"),
        (["predicate", "images", "dtype"], "float64", "dtype 'float64' is not one of"),
        (["predicate", "images", "shape"], [2, 16], "three positive integers"),
        (["predicate", "site"], "", "predicate.site is empty"),
        (["predicate", "extra"], 1, "unknown field(s) extra"),
        (["predicate", "guard"], _DELETE, "predicate lacks guard"),
        (["predicate", "round"], {"id": "r1"}, "predicate.round lacks nonce"),
        (["predicate", "thresholds"], {}, "thresholds is empty"),
        (["predicate", "thresholds"], {"rmse": -1}, "not a non-negative number"),
        (["predicate", "thresholds"], {"rmse": True}, "not a non-negative number"),
        (["predicate", "canary_catch_rates"], {"exact": 1.5}, "is above 1"),
        (["predicate", "demo_auto_approved"], 0, "demo_auto_approved has the wrong type"),
        (["subject"], [], "subject list is empty"),
        (["predicate", "images", "file"], "dicom/000000.dcm", "must be a top-level file"),
        (["predicate", "images", "metadata"], "images.npy", "file and metadata must differ"),
    ],
)
def test_schema_violation_is_refused(path: list[str], value: Any, reason: str) -> None:
    with pytest.raises(VerificationError) as err:
        parse_statement(_mutated(path, value))
    assert reason in err.value.reason


def test_non_finite_number_is_refused() -> None:
    text = canonical_json(statement()).replace(b'"candidates_tried":4', b'"candidates_tried":NaN')
    with pytest.raises(VerificationError, match="not valid JSON"):
        parse_statement(text)


def test_duplicate_subject_is_refused() -> None:
    s = statement()
    s["subject"].append(copy.deepcopy(s["subject"][0]))
    with pytest.raises(VerificationError, match="listed twice"):
        parse_statement(canonical_json(s))


def test_uppercase_digest_is_refused() -> None:
    s = statement()
    s["subject"][0]["digest"]["sha256"] = DIGEST.upper()
    with pytest.raises(VerificationError, match="lowercase sha256"):
        parse_statement(canonical_json(s))


def test_deeply_nested_free_form_section_is_refused() -> None:
    p = predicate()
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(12):
        node["x"] = {}
        node = node["x"]
    p["guard"] = deep
    with pytest.raises(VerificationError, match="nested too deeply"):
        make_statement({"images.npy": DIGEST}, p)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../x", "leaves the bundle"),
        ("dicom/../../x", "leaves the bundle"),
        ("./images.npy", "leaves the bundle"),
        ("/etc/passwd", "absolute path"),
        ("C:evil", "absolute path"),
        ("dicom\\x", "leaves the bundle"),
        ("dicom/sub/x.dcm", "nested"),
        ("other/x.dcm", "nested"),
        (".hidden", "characters not allowed"),
        ("a b", "characters not allowed"),
        ("", "non-empty string"),
    ],
)
def test_unsafe_subject_name_is_refused(name: str, reason: str) -> None:
    with pytest.raises(VerificationError) as err:
        check_subject_name(name)
    assert reason in err.value.reason


_SAFE = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,20}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.one_of(_SAFE, _SAFE.map(lambda s: "dicom/" + s)), min_size=1,
                      max_size=6, unique=True))
def test_safe_subject_names_round_trip(names: list[str]) -> None:
    s = make_statement(dict.fromkeys(names, DIGEST), predicate())
    assert sorted(x["name"] for x in parse_statement(canonical_json(s))["subject"]) == sorted(
        names
    )


@settings(max_examples=60, deadline=None)
@given(prefix=_SAFE, suffix=_SAFE)
def test_any_dotdot_component_is_refused(prefix: str, suffix: str) -> None:
    for name in (f"../{suffix}", f"{prefix}/../{suffix}", f"dicom/../{suffix}"):
        with pytest.raises(VerificationError):
            check_subject_name(name)


def test_statement_over_the_size_cap_is_refused() -> None:
    from protocols.statement import MAX_STATEMENT_BYTES

    with pytest.raises(VerificationError, match="over the"):
        parse_statement(b" " * (MAX_STATEMENT_BYTES + 1))


def test_payload_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(VerificationError, match="statement is not an object"):
        parse_statement(json.dumps([1, 2]).encode())
