"""A bundle changed after the build: `check-bundle` fails naming the file (every file of a real bundle,
truncated / one byte flipped / emptied in rotation; removed, added, manifest damaged or lying)."""

from __future__ import annotations

import json
import shutil

import pytest
from harness import CORRUPTIONS, Reference, check_bundle, one_line_error

from edge_build import bundle
from edge_build.errors import CheckFailed

pytestmark = [pytest.mark.reliability, pytest.mark.slow]  # the bundle comes from the reference build


@pytest.fixture
def lite(reference: Reference, tmp_path):
    copy = tmp_path / "lite"
    shutil.copytree(reference.dist / "lite", copy)
    assert bundle.check_bundle(copy).ok
    return copy


def _listed(directory) -> list[str]:
    return [entry["path"] for entry in json.loads((directory / "manifest.json").read_text())["files"]]


def test_every_changed_file_is_named(lite):
    kinds = list(CORRUPTIONS)
    listed = _listed(lite)
    assert len(listed) >= 20
    for number, relative in enumerate(listed):
        path = lite / relative
        original = path.read_bytes()
        kind = kinds[number % len(kinds)]
        path.write_bytes(CORRUPTIONS[kind](original))
        try:
            problems = bundle.check_bundle(lite).problems
            assert problems == [f"{relative}: {problems[0].split(': ', 1)[1]}"], (relative, kind, problems)
            assert "content changed" in problems[0]
        finally:
            path.write_bytes(original)
    assert bundle.check_bundle(lite).ok


def test_missing_added_and_escaping_files_are_named(lite):
    (lite / "labels.json").unlink()
    (lite / "extra.onnx").write_bytes(b"not from the build")
    (lite / "mslite" / ".hidden").write_text("x")
    problems = bundle.check_bundle(lite).problems
    assert "labels.json: missing" in problems
    assert "extra.onnx: not listed in the manifest" in problems
    assert "mslite/.hidden: not listed in the manifest" in problems
    manifest = json.loads((lite / "manifest.json").read_text())
    manifest["files"].append({"path": "../../../etc/hostname", "size": 1, "sha256": "0" * 64})
    manifest["files"].append({"path": "/etc/hostname", "size": 1, "sha256": "0" * 64})
    (lite / "manifest.json").write_text(json.dumps(manifest))
    problems = bundle.check_bundle(lite).problems
    assert "../../../etc/hostname: names a path outside the bundle" in problems
    assert "/etc/hostname: names a path outside the bundle" in problems


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_damaged_manifest_is_refused(lite, kind):
    manifest = lite / "manifest.json"
    manifest.write_bytes(CORRUPTIONS[kind](manifest.read_bytes()))
    try:
        result = bundle.check_bundle(lite)
    except CheckFailed as error:
        assert str(manifest) in str(error)
    else:
        assert not result.ok, "a damaged manifest passed"


def test_a_leftover_report_temp_file_is_not_a_problem(lite):
    # `kill -9` while the report is rewritten (after the bundle was published) leaves its temp file.
    (lite / ".report.html.k1ll3d.html.tmp").write_text("<html>half")
    assert bundle.check_bundle(lite).ok
    (lite / ".model_int8.onnx.x.tmp").write_bytes(b"")
    assert bundle.check_bundle(lite).problems == [".model_int8.onnx.x.tmp: not listed in the manifest"]


def test_check_bundle_command_fails_in_one_line_naming_the_file(lite):
    path = lite / "model_int8.ort"
    path.write_bytes(path.read_bytes()[:-1])
    run = check_bundle(lite)
    assert run.returncode == 1
    assert "model_int8.ort: content changed" in one_line_error(run)
