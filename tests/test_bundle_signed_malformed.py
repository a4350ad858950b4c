"""A dishonest or broken site signs malformed files: the verifier's own checks refuse them.

Every case rewrites one file of a freshly exported bundle and re-signs the statement with the
site's key, so every digest and signature is valid: what refuses the bundle is the verifier's
reading of the files behind the signature (the parsers a coordinator and a compliance tool
run on untrusted bytes), each with its own reason.
"""

from __future__ import annotations

import ast
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures.bundle_factory import configure, export_small, resign_statement, trust_of

from protocols.bundle import MANIFEST, MAX_NPY_HEADER_BYTES, verify_bundle
from protocols.errors import VerificationError
from protocols.files import canonical_json
from tests.test_bundle_tamper import _resign_with_file


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """One site and one pending two-image bundle; each test works on a copy of it."""
    from node.home import init_home

    home = tmp_path_factory.mktemp("malformed") / "home"
    init_home(home, "site-a")
    paths, config, _ = configure(home, reviewers=0, required=0)
    return (paths, config), export_small(paths, config, n=2)


@pytest.fixture
def bundle(exported: tuple[Any, Path], tmp_path: Path) -> Path:
    copy = tmp_path / exported[1].name
    shutil.copytree(exported[1], copy)
    return copy


def _reason(exported: tuple[Any, Path], bundle: Path) -> str:
    (paths, config), _ = exported
    with pytest.raises(VerificationError) as err:
        verify_bundle(bundle, trust_of(paths, config))
    return err.value.reason


def _lines(bundle: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (bundle / "images.jsonl").read_text().splitlines()]


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(canonical_json(r) + b"\n" for r in records)


def _npy(header: str, body: bytes = b"", version: int = 1, hlen: int | None = None) -> bytes:
    """A .npy file with the header text given verbatim (padded as numpy pads it)."""
    text = header.encode("latin1")
    lead = 10 if version == 1 else 12
    pad = (-(lead + len(text) + 1)) % 64
    text = text + b" " * pad + b"\n"
    size = len(text) if hlen is None else hlen
    packed = struct.pack("<H", size) if version == 1 else struct.pack("<I", size)
    return b"\x93NUMPY" + bytes([version, 0]) + packed + text + body


def _header_of(bundle: Path) -> tuple[dict[str, Any], bytes]:
    data = (bundle / "images.npy").read_bytes()
    (hlen,) = struct.unpack("<H", data[8:10])
    header = ast.literal_eval(data[10 : 10 + hlen].decode("latin1"))
    return header, data[10 + hlen :]


def _metadata_cases() -> dict[str, tuple[Callable[[list[dict[str, Any]]], bytes], str]]:
    def edit(fn: Callable[[list[dict[str, Any]]], None]) -> Callable[[list[dict[str, Any]]], bytes]:
        def run(records: list[dict[str, Any]]) -> bytes:
            fn(records)
            return _jsonl(records)
        return run

    def first_distance(records: list[dict[str, Any]]) -> str:
        return str(sorted(records[0]["distances"])[0])

    def drop_metric(records: list[dict[str, Any]]) -> None:
        del records[0]["distances"][first_distance(records)]

    def text_distance(records: list[dict[str, Any]]) -> None:
        records[0]["distances"][first_distance(records)] = "far"

    return {
        "not JSON": (lambda r: b"{not json\n" + _jsonl(r[1:]),
                     "metadata line 0 is not valid JSON"),
        "a key too many": (edit(lambda r: r[0].update(note="x")),
                           "metadata line 0 does not have exactly "
                           "['distances', 'index', 'modality', 'pixel_spacing_mm', 'size']"),
        "last line cut": (lambda r: _jsonl(r)[:-1], "metadata line 1 is truncated"),
        "index out of order": (edit(lambda r: r[0].update(index=5)),
                               "metadata line 0 has index 5"),
        "boolean index": (edit(lambda r: r[1].update(index=True)),
                          "metadata line 1 has index True"),
        "another modality": (edit(lambda r: r[1].update(modality="MR")),
                             "metadata line 1 has another modality"),
        "another size": (edit(lambda r: r[0].update(size=[8, 8])),
                         "metadata line 0 has another size"),
        "another spacing": (edit(lambda r: r[0].update(pixel_spacing_mm=[9.0, 9.0])),
                            "metadata line 0 has another pixel spacing"),
        "a metric missing": (edit(drop_metric),
                             "metadata line 0 does not give one distance per guard metric"),
        "a distance in words": (edit(text_distance), "metadata line 0: distance {m} is not a "
                                                     "number"),
        "a line missing": (lambda r: _jsonl(r[:1]), "metadata has 1 lines for 2 images"),
        "a line too many": (lambda r: _jsonl(r + [dict(r[1], index=2)]),
                            "metadata has 3 lines for 2 images"),
    }


@pytest.mark.parametrize("case", sorted(_metadata_cases()))
def test_malformed_signed_metadata_is_refused(
    case: str, exported: tuple[Any, Path], bundle: Path
) -> None:
    (paths, _), _ = exported
    make, reason = _metadata_cases()[case]
    records = _lines(bundle)
    metric = sorted(records[0]["distances"])[0]
    _resign_with_file(paths, bundle, "images.jsonl", make(records))
    assert _reason(exported, bundle) == reason.format(m=metric)


def _npy_cases(header: dict[str, Any], body: bytes) -> dict[str, tuple[bytes, str]]:
    good = repr(header)
    big = MAX_NPY_HEADER_BYTES + 1
    dtype = {"<i2": "int16", "<f2": "float16"}[header["descr"]]
    wider = {"<i2": "<i4", "<f2": "<f4"}[header["descr"]]
    wide = np.frombuffer(body, dtype=header["descr"]).astype(wider).tobytes()
    return {
        "not an array": (b"PK\x03\x04 a zip, not a .npy", "images file is not a .npy array"),
        "format version 4": (_npy(good, body, version=4),
                             ".npy format version 4 is not supported"),
        "header over the cap": (_npy(good, body, version=2, hlen=big),
                                "images file header is oversized"),
        "header cut short": (_npy(good, version=1, hlen=4000)[:200],
                             "images file header is truncated"),
        "header not a literal": (_npy("{'descr': __import__('os')}", body),
                                 "images file header does not parse"),
        "header with an extra field": (_npy(repr(dict(header, extra=1)), body),
                                       "images file header has unexpected fields"),
        "descr not a string": (_npy(repr(dict(header, descr=2)), body),
                               "images file header has the wrong types"),
        "negative size": (_npy(repr(dict(header, shape=(2, -16, 16))), body),
                          "images file shape is not a tuple of sizes"),
        "4-byte pixels": (_npy(repr(dict(header, descr=wider)), wide),
                          f"images file holds {wider}, the predicate says {dtype}"),
        "Fortran order": (_npy(repr(dict(header, fortran_order=True)), body),
                          f"images file holds {header['descr']}, the predicate says {dtype}"),
        "another shape": (_npy(repr(dict(header, shape=(2, 8, 32))), body),
                          "images file shape [2, 8, 32] differs from the predicate's"),
        "pixels missing": (_npy(good, body[:-2]), "images file size does not match its header"),
    }


@pytest.mark.parametrize("case", sorted(_npy_cases({"descr": "<i2", "fortran_order": False,
                                                    "shape": (2, 16, 16)}, b"\0\0" * 512)))
def test_malformed_signed_images_file_is_refused(
    case: str, exported: tuple[Any, Path], bundle: Path
) -> None:
    (paths, _), _ = exported
    header, body = _header_of(bundle)
    assert header == {"descr": "<i2", "fortran_order": False, "shape": (2, 16, 16)}  # CT, HU
    data, reason = _npy_cases(header, body)[case]
    _resign_with_file(paths, bundle, "images.npy", data)
    assert _reason(exported, bundle) == reason


def test_the_same_pixels_under_a_version_2_header_verify(
    exported: tuple[Any, Path], bundle: Path
) -> None:
    # The refusals above are about content, not about one way of writing a valid file.
    (paths, config), _ = exported
    header, body = _header_of(bundle)
    _resign_with_file(paths, bundle, "images.npy", _npy(repr(header), body, version=2))
    verified = verify_bundle(bundle, trust_of(paths, config))
    assert verified.n_images == 2
    np.testing.assert_array_equal(np.load(bundle / "images.npy"),
                                  np.frombuffer(body, header["descr"]).reshape(2, 16, 16))


def test_signed_statements_that_misdescribe_the_bundle_are_refused(
    exported: tuple[Any, Path], bundle: Path
) -> None:
    (paths, _), _ = exported
    original = (bundle / MANIFEST).read_bytes()

    def attempt(change: Callable[[dict[str, Any]], None]) -> str:
        (bundle / MANIFEST).write_bytes(original)
        resign_statement(paths, bundle, change)
        return _reason(exported, bundle)

    def drop(name: str) -> Callable[[dict[str, Any]], None]:
        return lambda s: s.update(subject=[x for x in s["subject"] if x["name"] != name])

    def add(name: str) -> Callable[[dict[str, Any]], None]:
        return lambda s: s["subject"].append({"name": name, "digest": {"sha256": "0" * 64}})

    assert attempt(drop("review.html")) == "manifest does not list the bundle file review.html"
    assert attempt(drop("images.jsonl")) == "manifest does not list the bundle file images.jsonl"
    assert attempt(add("notes.txt")) == "subject notes.txt is not a file of the bundle format"
    assert attempt(add("dicom/000000.dcm")) == (
        "DICOM files listed but the predicate says there are none")

    def claim_dicom(s: dict[str, Any]) -> None:
        s["predicate"]["images"]["dicom"] = True
        add("dicom/000000.dcm")(s)

    assert attempt(claim_dicom) == "1 DICOM files for 2 images"


def test_a_bundle_that_is_not_a_plain_folder_is_refused(
    exported: tuple[Any, Path], bundle: Path, tmp_path: Path
) -> None:
    (paths, config), _ = exported
    trust = trust_of(paths, config)
    archive = tmp_path / "bundle.tar"
    archive.write_bytes(b"not a folder")
    link = tmp_path / "link"
    link.symlink_to(bundle, target_is_directory=True)
    for path in (archive, link, tmp_path / "missing"):
        with pytest.raises(VerificationError) as err:
            verify_bundle(path, trust)
        assert err.value.reason == "bundle is not a folder"
    (bundle / "extra").mkdir()
    with pytest.raises(VerificationError) as err:
        verify_bundle(bundle, trust)
    assert err.value.reason == "folder extra/ is not part of the bundle format"


def test_an_envelope_without_signatures_is_refused(
    exported: tuple[Any, Path], bundle: Path
) -> None:
    env = json.loads((bundle / MANIFEST).read_bytes())
    env["signatures"] = []
    (bundle / MANIFEST).write_text(json.dumps(env))
    assert _reason(exported, bundle) == "envelope carries no signature"
