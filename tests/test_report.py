"""The build report: sections from whatever results exist, self-contained HTML, Markdown twin, CLI."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from report_fixtures import evaluation_payload, make_bundle, rewrite

from edge_build import bundle, report, verify
from edge_build.cli import main
from edge_build.errors import CheckFailed
from edge_build.report import failure_from, load_sources, render_report, write_report

SECTIONS = ("data", "training", "accuracy", "parity", "latency", "manifest")


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    collector = _Collector()
    collector.feed(page)
    return collector.tags


def _card(page: str, label: str) -> tuple[str, str]:
    """(status, headline) of a summary card."""
    match = re.search(
        rf'<a class="card (\w+)" href="#\w+"><div class="label">{label}</div>'
        r'<div class="headline"><span class="badge \w+">[A-Z/]+</span> ([^<]*)</div>',
        page,
    )
    assert match, f"no summary card {label}"
    return match.group(1), match.group(2)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One complete bundle (int8 parity failing, a latency regression in the history), rendered once."""
    root = tmp_path_factory.mktemp("report")
    paths = make_bundle(root, int8_fails=True)
    written = write_report(
        paths["bundle"], data_dir=paths["data"], history_dir=paths["history"], max_accuracy_drop_pt=0.5
    )
    return {
        **paths,
        "written": written,
        "html": written[0].read_text(encoding="utf-8"),
        "md": written[1].read_text(encoding="utf-8"),
    }


def test_full_report_has_every_section_in_order_and_the_verdicts(full):
    page = full["html"]
    assert [p.name for p in full["written"]] == ["report.html", "report.md"]
    positions = [page.index(f'<section id="{anchor}">') for anchor in SECTIONS]
    assert positions == sorted(positions)
    assert "could not be rendered" not in page
    assert _card(page, "Data health") == ("fail", "1 errors, 1 warnings")
    # 47 of 52 right; ort_int8 (88.5 %) is 1.9 pt below the network, over the 0.5 pt budget
    assert _card(page, "Accuracy") == ("fail", "top-1 90.4 %")
    assert "over the 0.5 pt drop budget: ort_int8 (-1.9 pt)" in page
    assert _card(page, "Parity") == ("fail", "1 of 3 fail")
    # ort_int8 1.4 ms is within the 2 ms budget at batch 1, onnx_fp32 4.8 ms is not
    assert _card(page, "Latency") == ("warn", "ort_int8: p50 1.41 ms @ batch 1")
    assert _card(page, "Build") == ("ok", "bundle complete")


def test_full_report_content(full):
    page = full["html"]
    # class names in English and Chinese, as text (not plot glyphs)
    assert '00_00</span> plastic bottle <span lang="zh">塑料瓶</span>' in page
    assert "03_03 banana peel 香蕉皮" in page
    # training: chosen row of the CV table marked, LR schedule and loss plotted
    assert "Hyperparameter search: 4 candidates, 3-fold" in page and ">chosen<" in page
    assert "Learning-rate schedule (cosine, 40 steps)" in page
    # accuracy with and without the leaked image
    assert 'without images also in training (same file or pixels)</td><td class="num">51</td><td>90.2 %' in page
    assert "The 4-bin decision" in page and "hazardous 有害垃圾" in page
    # each artifact's top-1 (bench, percent) against the network's 47/52
    assert '88.5 %</td><td class="num">+1.9 pt' in page
    # five misclassified thumbnails, predicted vs true
    assert page.count('src="data:image/jpeg;base64,') == 5
    assert "predicted <b>00_03 can 易拉罐</b> (78 %)" in page
    # parity: the int8 failure and its reasons
    assert "worst cosine" in page and "diagnosis: no known input mistake" in page
    # latency: reference ratios, the budget, the history with the slow run circled
    assert "× mindspore" in page and "× litert" in page
    assert "Regressions in the history (8)" in page
    # manifest: every file with its hash
    manifest = json.loads((full["bundle"] / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert entry["sha256"] in page


def test_html_is_self_contained(full):
    page = full["html"]
    tags = _tags(page)
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed", "base")]
    urls = [(tag, a[name]) for tag, a in tags for name in ("src", "href", "srcset", "action") if a.get(name)]
    assert all(url.startswith(("data:image/", "#")) for _, url in urls), urls
    images = [a["src"] for tag, a in tags if tag == "img"]
    assert len(images) >= 10 and all(
        src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for src in images
    )
    assert not re.search(r"https?://", page)
    assert "@import" not in page and "url(" not in page and "@font-face" not in page
    meta = next(a for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert meta["content"].startswith("default-src 'none'")


def test_markdown_twin_has_the_same_sections_as_text_and_tables(full):
    text = full["md"]
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings == ["Summary", "Data set health", "Training", "Accuracy", "Parity", "Latency", "Manifest"]
    assert "| Parity | ❌ 1 of 3 fail |" in text
    assert "| Accuracy | ❌ top-1 90.4 % |" in text
    assert "data:image" not in text  # plots stay in the HTML; the Markdown says so
    assert "_Plot in report.html: Learning-rate schedule" in text
    assert "| val/00_00/00001.jpg | 00_00 plastic bottle 塑料瓶 | 00_03 can 易拉罐 (78 %) |" in text
    # every table row has as many cells as its header
    for block in re.findall(r"((?:^\|.*\|\n)+)", text, flags=re.MULTILINE):
        rows = [r for r in block.splitlines() if r]
        widths = {len(re.split(r"(?<!\\)\|", r)) for r in rows}
        assert len(widths) == 1, rows[:3]


def test_bundle_with_a_report_still_checks_clean(full):
    check = bundle.check_bundle(full["bundle"])
    assert check.ok, check.problems


def test_empty_bundle_says_why_each_section_is_missing_and_shows_the_failure(tmp_path):
    failure = {"stage": "train", "message": "features cache corrupt", "hint": "rerun with --force"}
    html_path, md_path = write_report(tmp_path / "dist" / "lite", failure=failure)
    page = html_path.read_text(encoding="utf-8")
    assert page.index("Build failed at stage “train”") < page.index('<div class="cards">')
    assert "features cache corrupt" in page and "rerun with --force" in page
    for file_name, command in report.SOURCE_FILES.values():
        assert f"no {file_name} in" in page and f"(written by `{command}`)" in page
    for label in ("Data health", "Accuracy", "Parity", "Latency"):
        assert _card(page, label) == ("na", "not available")
    assert _card(page, "Build") == ("fail", "failed at train")
    text = md_path.read_text(encoding="utf-8")
    assert text.index("Build failed at stage `train`") < text.index("## Summary")


def test_unreadable_and_oddly_shaped_inputs_never_crash(tmp_path):
    bundle_dir = tmp_path / "lite"
    bundle_dir.mkdir()
    (bundle_dir / "eval.json").write_text("{not json", encoding="utf-8")
    (bundle_dir / "parity.json").write_text("[1, 2]", encoding="utf-8")
    (bundle_dir / "doctor.json").write_text(json.dumps({"summary": "?", "counts": {"train": {"00_00": {}}}}))
    (bundle_dir / "training.json").write_text(json.dumps({"learning_rate": {"per_step": "x"}, "search": {"table": 3}}))
    (bundle_dir / "bench.json").write_text(
        json.dumps({"results": [{"name": "x", "latency": {"1": {"p50_ms": "fast"}}}, 7], "comparison": [None]})
    )
    (bundle_dir / "manifest.json").write_text(json.dumps({"files": [{"path": None}, "junk"], "versions": []}))
    sources = load_sources(bundle_dir)
    assert "not valid JSON" in sources.why_missing("evaluation")
    assert "holds a JSON list" in sources.why_missing("parity")
    page, text = render_report(sources)
    assert page.count("<section ") == 6 and "## Manifest" in text
    assert "not valid JSON" in page


@pytest.mark.parametrize(
    "broken",
    [
        {"top1": "high", "per_class": {"zz": 1}, "confusion": [[1, 2]], "predictions": [{"true": 99}]},
        {"top1": 0.5, "per_class": [0.5] * 26, "confusion": {"matrix": [[0] * 26] * 26}, "predictions": "none"},
        {"accuracy": {"top1": 0.5}, "per_class": [{"index": 3, "recall": 0.2}], "predictions": {"a.jpg": {"label": 1}}},
    ],
)
def test_accuracy_section_tolerates_other_shapes(tmp_path, broken):
    bundle_dir = tmp_path / "lite"
    bundle_dir.mkdir()
    (bundle_dir / "eval.json").write_text(json.dumps(broken))
    page, _ = render_report(load_sources(bundle_dir))
    accuracy = page[page.index('<section id="accuracy">') : page.index('<section id="parity">')]
    assert "<h2>Accuracy</h2>" in accuracy
    assert "could not be rendered" not in accuracy


def test_missing_thumbnail_is_a_note_not_a_broken_image(tmp_path):
    bundle_dir = tmp_path / "lite"
    bundle_dir.mkdir()
    keys = [f"val/{code}/00001.jpg" for code in ("00_00", "00_01")]
    (bundle_dir / "eval.json").write_text(json.dumps(evaluation_payload(keys)))
    page, _ = render_report(load_sources(bundle_dir, data_dir=tmp_path / "no-data"))
    assert "image not found: " in page
    assert _card(page, "Accuracy")[0] == "info"  # figures, but no budget or gate to judge them by
    assert 'src="data:image/jpeg' not in page
    page, _ = render_report(load_sources(bundle_dir))
    assert "the data set location is unknown" in page


def test_newer_result_in_the_build_directory_wins_and_is_named(tmp_path):
    paths = make_bundle(tmp_path)
    build = tmp_path / "build"
    fresh = build / "eval" / "eval.json"
    fresh.parent.mkdir(parents=True)
    payload = json.loads((paths["bundle"] / "eval.json").read_text())
    fresh.write_text(json.dumps({**payload, "top1": 0.5}))
    os.utime(fresh, (2e9, 2e9))
    other_target = build / "bench" / "cpu" / "bench.json"
    other_target.parent.mkdir(parents=True)
    other_target.write_text(json.dumps({"target": "cpu", "results": []}))
    os.utime(other_target, (2e9, 2e9))
    sources = load_sources(paths["bundle"], build_dir=build)
    assert sources.payloads["evaluation"]["top1"] == 0.5
    assert sources.origins["evaluation"] == str(fresh)
    assert sources.origins["bench"] == str(paths["bundle"] / "bench.json")


def test_manifest_is_only_read_from_the_bundle_and_target_mismatch_is_explained(tmp_path):
    bundle_dir = tmp_path / "dist" / "lite"
    bundle_dir.mkdir(parents=True)
    (bundle_dir / "bench.json").write_text(json.dumps({"target": "gpu", "results": []}))
    (tmp_path / "build" / "x").mkdir(parents=True)
    (tmp_path / "build" / "x" / "manifest.json").write_text(json.dumps({"files": []}))
    sources = load_sources(bundle_dir, build_dir=tmp_path / "build")
    assert "manifest" not in sources.payloads
    assert "is for target gpu, not lite" in sources.why_missing("bench")


def test_history_without_two_runs_is_explained(tmp_path):
    paths = make_bundle(tmp_path)
    sources = load_sources(paths["bundle"], history_dir=tmp_path / "empty-history")
    sources.payloads.pop("training")  # keep the render short: no training plots
    sources.payloads.pop("evaluation")
    page, _ = render_report(sources)
    assert "Latency history: not available" in page and "at least two runs" in page


def test_cli_writes_the_report_of_a_target(tmp_path, monkeypatch):
    paths = make_bundle(tmp_path)
    for name in ("training.json", "eval.json"):  # fewer plots: a faster CLI test
        (paths["bundle"] / name).unlink()
    rewrite(paths["bundle"] / "bench.json", lambda payload: payload.update(comparison=[]))
    launched = []
    monkeypatch.setattr("click.launch", lambda url, **_: launched.append(url))
    monkeypatch.delenv("EDGE_BUILD_HISTORY", raising=False)
    result = CliRunner().invoke(
        main,
        ["report", "--out", str(tmp_path / "dist"), "--build", str(tmp_path / "build"), "--data", str(paths["data"]),
         "--history", str(paths["history"]), "--open"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert str(paths["bundle"] / "report.html") in result.output
    assert "not available: evaluation, training" in result.output
    assert launched == [str(paths["bundle"] / "report.html")]
    assert "Latency history on this machine (5 runs" in (paths["bundle"] / "report.html").read_text()


def test_cli_with_nothing_to_report_exits_2_naming_the_fix(tmp_path):
    result = CliRunner().invoke(
        main, ["report", "--target", "cpu", "--out", str(tmp_path / "dist"), "--build", str(tmp_path / "build")]
    )
    assert result.exit_code == 2
    assert "nothing to report for target cpu" in result.output
    assert "edge-build all --target cpu" in result.output


def test_failure_from_a_stage_error_and_an_artifact_that_could_not_run(tmp_path):
    failure = failure_from("verify", CheckFailed("onnx_int8 parity failed", "see parity.json"))
    assert failure == {
        "stage": "verify",
        "message": "onnx_int8 parity failed",
        "hint": "see parity.json",
        "exit_code": 1,
    }
    assert failure_from("bench", RuntimeError("boom"))["message"] == "RuntimeError: boom"
    broken = verify.ArtifactParity("ort_int8", "x.ort", "error", {"top1_agreement": 0.95}, error="cannot load x.ort")
    payload = verify.ParityReport([broken], {"runtime": "mindspore"}, {"count": 8}).as_dict()
    (tmp_path / "lite").mkdir()
    (tmp_path / "lite" / "parity.json").write_text(json.dumps(payload))
    page, text = render_report(load_sources(tmp_path / "lite", failure=failure))
    assert "ERROR" in page and "could not run: cannot load x.ort" in page
    assert "| Parity | ❌ 1 of 1 fail | failing: ort_int8 |" in text
    assert "**Fix:** see parity.json" in text
