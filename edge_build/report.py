"""The build report: one page (`report.html`) and its text twin (`report.md`) from a bundle's JSON.

`load_sources` reads whatever result files exist (doctor.json, training.json, eval.json,
parity.json, bench.json, manifest.json, the machine's benchmark history) and remembers why
each missing one is missing. `render_report` turns them into HTML and Markdown; every
section renders from the keys it finds and says "not available" (with the reason) for the
rest, so a half-finished or failed build still gets a readable report. `write_report`
writes both files atomically.

The HTML is self-contained: inline CSS, plots and thumbnails as base64 data URIs, no
scripts, and a Content-Security-Policy that forbids any network fetch.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_build import atomic, report_plots
from edge_build.taxonomy import BINS, BY_CODE, CLASSES, CODES, NUM_CLASSES

REPORT_HTML = "report.html"
REPORT_MD = "report.md"

#: source name -> (file name, the command that writes it)
SOURCE_FILES: dict[str, tuple[str, str]] = {
    "doctor": ("doctor.json", "edge-build doctor"),
    "training": ("training.json", "edge-build train"),
    "evaluation": ("eval.json", "edge-build eval"),
    "parity": ("parity.json", "edge-build verify"),
    "bench": ("bench.json", "edge-build bench"),
    "manifest": ("manifest.json", "edge-build all"),
}
#: How many of the worst-classified validation images get a thumbnail.
WORST_IMAGES = 12
THUMBNAIL_PX = 144
#: A benchmark run regressed when slower than the previous one by this much plus both runs' noise.
REGRESSION_PCT = 10.0


# --------------------------------------------------------------------------- sources


@dataclass
class ReportSources:
    """Everything the report shows, already parsed; `missing` says why an absent source is absent."""

    target: str
    bundle_dir: Path | None = None
    data_dir: Path | None = None
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    history_source: str | None = None
    failure: dict[str, Any] | None = None
    regression_pct: float = REGRESSION_PCT
    #: The target's budget for an artifact's top-1 below the network's (percentage points), if known.
    max_accuracy_drop_pt: float | None = None

    def get(self, name: str) -> dict[str, Any] | None:
        return self.payloads.get(name)

    def why_missing(self, name: str) -> str:
        return self.missing.get(name) or f"no {SOURCE_FILES.get(name, (name,))[0]} was found"


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path} cannot be read ({exc})"
    except ValueError as exc:
        return None, f"{path} is not valid JSON ({exc})"
    if not isinstance(payload, dict):
        return None, f"{path} holds a JSON {type(payload).__name__}, not an object"
    return payload, None


def load_sources(
    bundle_dir: Path,
    *,
    target: str | None = None,
    build_dir: Path | None = None,
    data_dir: Path | None = None,
    history_dir: Path | None = None,
    files: dict[str, Path] | None = None,
    failure: dict[str, Any] | None = None,
    max_accuracy_drop_pt: float | None = None,
) -> ReportSources:
    """Read the report's inputs by name, tolerating any of them being absent.

    Each result file is looked for in `bundle_dir` and in the stage directories of `build_dir`
    (`<build>/<stage>/<file>` or `<build>/<stage>/<target>/<file>`); the newest copy wins, so a
    failed build reports its fresh results next to the last published bundle's. `files` pins a
    source to one file. `history_dir` holds `<machine-id>.jsonl` benchmark histories, of which
    this machine's is read. The manifest is only ever read from the bundle.
    """
    bundle_dir = Path(bundle_dir)
    target = target or bundle_dir.name
    sources = ReportSources(target=target, bundle_dir=bundle_dir, failure=failure)
    sources.max_accuracy_drop_pt = max_accuracy_drop_pt
    sources.data_dir = Path(data_dir) if data_dir else None
    files = files or {}
    for name, (file_name, command) in SOURCE_FILES.items():
        if name in files:
            candidates = [Path(files[name])]
        else:
            candidates = [bundle_dir / file_name]
            if build_dir is not None and name != "manifest":
                candidates += _build_candidates(Path(build_dir), file_name, target)
        found = []
        problems = []
        for path in candidates:
            payload, problem = _read_json(path)
            if payload is not None and payload.get("target", target) != target:
                problems.append(f"{path} is for target {payload.get('target')}, not {target}")
            elif payload is not None:
                found.append((path.stat().st_mtime, str(path), payload))
            elif problem and path.exists():
                problems.append(problem)
        if found:
            _, origin, payload = max(found, key=lambda item: item[0])
            sources.payloads[name] = payload
            sources.origins[name] = origin
        elif problems:
            sources.missing[name] = "; ".join(problems)
        else:
            places = str(candidates[0].parent)
            if build_dir is not None and name not in files and name != "manifest":
                places += f" or the stage folders of {build_dir}"
            sources.missing[name] = f"no {file_name} in {places} (written by `{command}`)"
    if sources.data_dir is None:
        root = (sources.get("doctor") or {}).get("root")
        sources.data_dir = Path(root) if isinstance(root, str) else None
    _load_history(sources, history_dir)
    return sources


def _build_candidates(build_dir: Path, file_name: str, target: str) -> list[Path]:
    """`<build>/<stage>/<file>`, `<build>/<stage>-<target>/<file>` and `<build>/<stage>/<target>/<file>`.

    Per-target stage directories of other targets (`verify-gpu` for a lite report) are left out.
    """
    if not build_dir.is_dir():
        return []
    shared_or_ours = [
        path
        for path in build_dir.glob(f"*/{file_name}")
        if "-" not in path.parent.name or path.parent.name.endswith(f"-{target}")
    ]
    return sorted({*shared_or_ours, *build_dir.glob(f"*/{target}/{file_name}")})


def _load_history(sources: ReportSources, history_dir: Path | None) -> None:
    from edge_build import history
    from edge_build.errors import EdgeBuildError

    if history_dir is None:
        sources.history_source = "no benchmark history directory was given"
        return
    bench = sources.get("bench") or {}
    machine_key = bench.get("machine_id") or _dig(bench, "machine.id") or history.machine_id()
    path = history.history_file(Path(history_dir), str(machine_key))
    try:
        records = history.read_records(path)
    except EdgeBuildError as exc:
        sources.history_source = str(exc)
        return
    sources.history = [r for r in records if r.get("target") in (None, sources.target)]
    sources.history_source = str(path)


# --------------------------------------------------------------------------- formatting


def _dig(mapping: Any, *paths: str, default: Any = None) -> Any:
    """The first present, non-None value among dotted `paths` (`"a.b"` = mapping["a"]["b"])."""
    for dotted in paths:
        current = mapping
        for part in dotted.split("."):
            if isinstance(current, dict) and part in current:
                current = current[part]
            else:
                current = None
                break
        if current is not None:
            return current
    return default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any) -> str:
    """A value as short, readable text."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e6:
            return f"{value:.2e}"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value)


def pct(value: Any, digits: int = 1) -> str:
    """An accuracy as a percentage: fractions (<= 1) are scaled, larger numbers taken as percent."""
    if not _is_number(value) or not math.isfinite(value):
        return "—"
    scaled = value * 100 if abs(value) <= 1.0 else value
    return f"{scaled:.{digits}f} %"


def _fraction(value: Any) -> float | None:
    if not _is_number(value):
        return None
    return float(value) / 100 if value > 1.0 else float(value)


def size_text(size: Any) -> str:
    if not _is_number(size):
        return "—"
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{int(amount)} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"


def class_label(index_or_code: Any, chinese: bool = True) -> str:
    """`00_00 plastic bottle 塑料瓶` from a class index or code; unknown values as given."""
    cls = None
    if isinstance(index_or_code, int) and 0 <= index_or_code < NUM_CLASSES:
        cls = CLASSES[index_or_code]
    elif isinstance(index_or_code, str):
        cls = BY_CODE.get(index_or_code)
    if cls is None:
        return str(index_or_code)
    return f"{cls.code} {cls.english} {cls.chinese}" if chinese else f"{cls.code} {cls.english}"


def _class_code(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < NUM_CLASSES:
        return CODES[value]
    if isinstance(value, str) and value in BY_CODE:
        return value
    return None


# --------------------------------------------------------------------------- document model


@dataclass
class Cell:
    """A table cell with optional styling (HTML only); Markdown shows `text`."""

    text: str
    css: str = ""
    style: str = ""
    title: str = ""


@dataclass
class Verdict:
    """One card in the summary panel. status: ok | warn | fail | na | info (figures, nothing to judge)."""

    label: str
    status: str
    headline: str
    detail: str = ""
    anchor: str = ""


_BADGE_MD = {"ok": "✅", "warn": "⚠️", "fail": "❌", "na": "➖", "info": "ℹ️"}
_BADGE_TEXT = {"ok": "PASS", "warn": "WARN", "fail": "FAIL", "na": "N/A", "info": "INFO"}


def badge(status: str, text: str | None = None) -> Cell:
    return Cell(text or _BADGE_TEXT.get(status, status), css=f"badge {status}")


def _md_cell(value: Any) -> str:
    text = value.text if isinstance(value, Cell) else fmt(value)
    if isinstance(value, Cell) and value.css.startswith("badge"):
        status = value.css.split()[-1]
        text = f"{_BADGE_MD.get(status, '')} {text}".strip()
    return text.replace("|", "\\|").replace("\n", " ")


def _html_cell(value: Any, tag: str = "td") -> str:
    if isinstance(value, Cell):
        attributes = ""
        if value.css:
            attributes += f' class="{value.css}"'
        if value.style:
            attributes += f' style="{html.escape(value.style)}"'
        if value.title:
            attributes += f' title="{html.escape(value.title)}"'
        inner = f'<span class="{value.css}">{html.escape(value.text)}</span>' if "badge" in value.css else ""
        if inner:
            return f"<{tag}>{inner}</{tag}>"
        return f"<{tag}{attributes}>{html.escape(value.text)}</{tag}>"
    css = ' class="num"' if _is_number(value) else ""
    return f"<{tag}{css}>{html.escape(fmt(value))}</{tag}>"


class Section:
    """One report section, built once as HTML and Markdown side by side."""

    def __init__(self, anchor: str, title: str) -> None:
        self.anchor = anchor
        self.title = title
        self.html: list[str] = []
        self.md: list[str] = []

    def heading(self, text: str) -> None:
        self.html.append(f"<h3>{html.escape(text)}</h3>")
        self.md.append(f"### {text}")

    def paragraph(self, text: str, css: str = "") -> None:
        attribute = f' class="{css}"' if css else ""
        self.html.append(f"<p{attribute}>{html.escape(text)}</p>")
        self.md.append(f"_{text}_" if css == "muted" else text)

    def unavailable(self, what: str, reason: str) -> None:
        self.html.append(
            f'<p class="na"><strong>{html.escape(what)}: not available</strong> — {html.escape(reason)}</p>'
        )
        self.md.append(f"> **{what}: not available** — {reason}")

    def table(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        caption: str = "",
        collapsed: str = "",
        css: str = "",
        md: bool = True,
    ) -> None:
        """A table; `collapsed` puts it in a <details> block with that summary text."""
        rows = list(rows)
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in rows)
        caption_html = f'<div class="caption">{html.escape(caption)}</div>' if caption else ""
        css_attr = f' class="{css}"' if css else ""
        table_html = (
            f'{caption_html}<div class="scroll"><table{css_attr}>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )
        md_lines = [
            "| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
            "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows),
        ]
        md_table = "\n".join(md_lines)
        if caption:
            md_table = f"**{caption}**\n\n{md_table}"
        if collapsed:
            self.html.append(f"<details><summary>{html.escape(collapsed)}</summary>{table_html}</details>")
            if md:
                self.md.append(f"<details><summary>{collapsed}</summary>\n\n{md_table}\n\n</details>")
        else:
            self.html.append(table_html)
            if md:
                self.md.append(md_table)

    def key_values(self, pairs: Iterable[tuple[str, Any]], caption: str = "") -> None:
        self.table(("", "value"), [(Cell(k, css="key"), v) for k, v in pairs], caption=caption, css="kv")

    def image(self, uri: str, alt: str, md_note: str = "") -> None:
        self.html.append(
            f'<figure><img src="{uri}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'
        )
        self.md.append(f"_Plot in report.html: {alt}.{(' ' + md_note) if md_note else ''}_")

    def raw(self, html_text: str, md_text: str = "") -> None:
        self.html.append(html_text)
        if md_text:
            self.md.append(md_text)


def _plot(section: Section, alt: str, make: Callable[[], str]) -> None:
    """Add a plot; a plot that cannot be drawn becomes a note instead of a crash."""
    try:
        uri = make()
    except Exception as exc:  # a broken plot must not cost the whole report
        section.unavailable(alt, f"the plot could not be drawn ({type(exc).__name__}: {exc})")
        return
    section.image(uri, alt)


# --------------------------------------------------------------------------- shared shapes


def _records(value: Any, key: str = "name") -> list[dict[str, Any]]:
    """Rows from the usual JSON shapes: a list of objects, or an object of objects keyed by name."""
    if isinstance(value, list):
        return [row for row in value if isinstance(row, dict)]
    if isinstance(value, dict):
        for nested in ("rows", "results", "records", "items"):
            if isinstance(value.get(nested), (list, dict)):
                return _records(value[nested], key)
        if value and all(isinstance(v, dict) for v in value.values()):
            return [{key: name, **row} for name, row in value.items()]
    return []


def _columns(rows: Sequence[dict[str, Any]], preferred: Sequence[str] = (), skip: Iterable[str] = ()) -> list[str]:
    """Preferred columns first (those present), then the other scalar columns in first-seen order."""
    skipped = set(skip)
    seen: list[str] = []
    for row in rows:
        for name, value in row.items():
            if name not in seen and name not in skipped and not isinstance(value, (dict, list)):
                seen.append(name)
    return [c for c in preferred if c in seen] + [c for c in seen if c not in preferred]


def _passed(row: dict[str, Any]) -> bool | None:
    for name in ("passed", "pass", "ok", "within_budget", "within_tolerance"):
        if isinstance(row.get(name), bool):
            return row[name]
    verdict = row.get("verdict") or row.get("status")
    if isinstance(verdict, str) and verdict.lower() in ("pass", "passed", "ok", "fail", "failed"):
        return verdict.lower() in ("pass", "passed", "ok")
    return None


def _pass_cell(passed: bool | None) -> Cell:
    if passed is None:
        return badge("na")
    return badge("ok") if passed else badge("fail")


def _scalar_pairs(payload: dict[str, Any], skip: Iterable[str]) -> list[tuple[str, Any]]:
    skipped = set(skip)
    return [
        (key, value)
        for key, value in payload.items()
        if key not in skipped and not isinstance(value, (dict, list)) and value is not None
    ]


# --------------------------------------------------------------------------- data set health


def _doctor_section(sources: ReportSources) -> tuple[Section, Verdict]:
    section = Section("data", "Data set health")
    doctor = sources.get("doctor")
    if doctor is None:
        section.unavailable("Doctor report", sources.why_missing("doctor"))
        return section, Verdict("Data health", "na", "not available", sources.why_missing("doctor"), "data")
    summary = doctor.get("summary") or {}
    errors, warnings = _finding_count(summary.get("error")), _finding_count(summary.get("warning"))
    leaked = len(_dig(doctor, "duplicates.leakage", default=[]) or [])
    images = doctor.get("images") or {}
    status = {"pass": "ok", "warn": "warn", "fail": "fail"}.get(str(doctor.get("verdict")), "na")
    headline = f"{fmt(errors)} errors, {fmt(warnings)} warnings" if errors is not None else str(doctor.get("verdict"))
    detail = f"{fmt(images.get('usable'))} usable images, {leaked} leaked into validation"
    verdict = Verdict("Data health", status, headline, detail, "data")

    section.paragraph(
        f"Doctor verdict: {doctor.get('verdict', 'unknown')} — {headline}; {detail}. "
        f"Data set: {doctor.get('root', '?')}."
    )
    splits = doctor.get("counts") or {}
    if splits:
        rows = []
        for split, per_class in splits.items():
            distinct = [c.get("distinct", 0) for c in per_class.values()]
            rows.append(
                (
                    split,
                    len(per_class),
                    sum(c.get("files", 0) for c in per_class.values()),
                    sum(c.get("usable", 0) for c in per_class.values()),
                    sum(distinct),
                    f"{min(distinct)} / {_median(distinct):g} / {max(distinct)}" if distinct else "—",
                )
            )
        section.table(
            ("split", "classes", "files", "usable", "distinct", "distinct per class min / median / max"),
            rows,
            caption="Images per split",
        )
    duplicates = doctor.get("duplicates") or {}
    near = _dig(doctor, "near_duplicates.counts", default={}) or {}
    if duplicates or near:
        section.table(
            ("check", "count"),
            [
                ("validation images byte-identical to training images (leakage)", leaked),
                ("exact duplicate groups (sha256)", len(duplicates.get("groups") or [])),
                ("redundant files in those groups", duplicates.get("redundant_files")),
                ("copies within one class folder", duplicates.get("within_class_copies")),
                ("same image under two classes", len(duplicates.get("label_conflicts") or [])),
                ("near-duplicate pairs across splits", near.get("across_splits")),
                ("near-duplicate pairs across classes", near.get("across_classes")),
                ("near-duplicate pairs within a class", near.get("within_class")),
            ],
            caption="Duplicates and leakage",
        )
    findings = doctor.get("findings") or []
    if findings:
        rows = [
            (
                badge({"error": "fail", "warning": "warn"}.get(f.get("severity"), "na"), str(f.get("severity"))),
                f.get("message", f.get("code", "")),
                f.get("hint", ""),
            )
            for f in findings
            if isinstance(f, dict)
        ]
        section.table(("severity", "finding", "fix"), rows, caption="Findings")
    else:
        section.paragraph("No findings: the data set is clean.")
    leakage = duplicates.get("leakage") or []
    if leakage:
        section.table(
            ("validation image", "same bytes in training"),
            [(item.get("path"), ", ".join(item.get("train") or [])) for item in leakage if isinstance(item, dict)],
            collapsed=f"Leaked validation images ({len(leakage)})",
        )
    facts = [
        ("image formats", fmt(images.get("formats"))),
        ("image sizes", fmt(images.get("sizes"))),
        ("total size", size_text(images.get("bytes"))),
        ("label.txt", _label_file_text(doctor.get("label_file") or {})),
        ("doctor run time", f"{fmt(doctor.get('elapsed_s'))} s"),
    ]
    section.key_values([(k, v) for k, v in facts if v not in ("—", "")], caption="Images")
    if splits:
        split_names = list(splits)
        rows = []
        for cls in CLASSES:
            row: list[Any] = [cls.code, cls.english, cls.chinese, cls.bin.english]
            for split in split_names:
                counts = splits[split].get(cls.code) or {}
                row += [counts.get("files"), counts.get("distinct")]
            rows.append(row)
        headers = ["code", "class", "中文", "bin"]
        for split in split_names:
            headers += [f"{split} files", f"{split} distinct"]
        section.table(headers, rows, collapsed="Images per class")
    return section, verdict


def _finding_count(value: Any) -> int | None:
    """Findings of one severity: `{"findings": n, "paths": m}` (or a bare count in older reports)."""
    if isinstance(value, dict):
        value = value.get("findings")
    return value if isinstance(value, int) else None


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _label_file_text(label: dict[str, Any]) -> str:
    if not label.get("path"):
        return "absent (built-in taxonomy used)"
    disagreements = label.get("disagreements") or []
    agreement = "agrees with the taxonomy" if not disagreements else f"{len(disagreements)} disagreements"
    return f"{label.get('encoding', '?')} encoded, {agreement}"


# --------------------------------------------------------------------------- manifest


def _manifest_section(sources: ReportSources) -> Section:
    section = Section("manifest", "Manifest")
    manifest = sources.get("manifest")
    if manifest is None:
        section.unavailable("Manifest", sources.why_missing("manifest"))
        return section
    facts = [
        ("created", manifest.get("created")),
        ("target", manifest.get("target")),
        ("edge-build", manifest.get("edge_build_version")),
        ("git commit", manifest.get("git_commit")),
    ]
    facts += _scalar_pairs(manifest, skip={"schema", "created", "target", "edge_build_version", "git_commit"})
    section.key_values([(k, v) for k, v in facts if v is not None], caption="Bundle")
    files = [f for f in manifest.get("files") or [] if isinstance(f, dict)]
    if files:
        total = sum(f.get("size", 0) for f in files if _is_number(f.get("size")))
        section.table(
            ("file", "size", "sha256"),
            [
                (f.get("path"), Cell(size_text(f.get("size")), css="num"), Cell(str(f.get("sha256", "—")), css="hash"))
                for f in files
            ],
            caption=f"Files ({len(files)}, {size_text(total)})",
        )
    else:
        section.unavailable("File list", "the manifest lists no files")
    versions = manifest.get("versions")
    if isinstance(versions, dict) and versions:
        section.table(("component", "version"), list(versions.items()), caption="Versions")
    nested = {k: v for k, v in manifest.items() if isinstance(v, dict) and k != "versions" and v}
    for key, value in nested.items():
        pairs = [(k, fmt(v)) for k, v in value.items()]
        section.table(("key", "value"), pairs, collapsed=f"{key} (from the manifest)")
    return section


def _manifest_and_inputs(sources: ReportSources) -> Section:
    section = _manifest_section(sources)
    _inputs_table(section, sources)
    return section


def _inputs_table(section: Section, sources: ReportSources) -> None:
    """Where each part of this report came from (or why it is missing)."""
    rows = []
    for name, (file_name, _) in SOURCE_FILES.items():
        if name in sources.payloads:
            rows.append((file_name, badge("ok", "read"), sources.origins.get(name, "")))
        else:
            rows.append((file_name, badge("na", "missing"), sources.why_missing(name)))
    rows.append(
        (
            "benchmark history",
            badge("ok" if sources.history else "na", f"{len(sources.history)} runs"),
            sources.history_source or "",
        )
    )
    section.table(("input", "status", "file"), rows, caption="Report inputs")


# --------------------------------------------------------------------------- training


def _numbers(values: Any) -> list[float] | None:
    if isinstance(values, list) and values and all(_is_number(v) for v in values):
        return [float(v) for v in values]
    return None


def _training_section(sources: ReportSources) -> Section:
    section = Section("training", "Training")
    training = sources.get("training")
    if training is None:
        section.unavailable("Training record", sources.why_missing("training"))
        return section
    search = training.get("search") if isinstance(training.get("search"), dict) else None
    hyper = training.get("hyperparameters")
    if isinstance(hyper, dict) and hyper:
        how = "chosen by cross-validation (table below)" if search else "given options (no search)"
        section.key_values([(k, v) for k, v in hyper.items()], caption=f"Hyperparameters — {how}")
    else:
        section.unavailable("Hyperparameters", "training.json has no `hyperparameters`")

    per_step = _numbers(_dig(training, "learning_rate.per_step"))
    steps_per_epoch = _dig(training, "learning_rate.steps_per_epoch")
    if per_step:
        if _is_number(steps_per_epoch) and steps_per_epoch > 0:
            xs, xlabel = [(i + 1) / steps_per_epoch for i in range(len(per_step))], "epoch"
        else:
            xs, xlabel = list(range(1, len(per_step) + 1)), "step"
        schedule = _dig(training, "hyperparameters.lr_schedule", default="")
        _plot(
            section,
            f"Learning-rate schedule ({schedule}, {len(per_step)} steps)".replace("(, ", "("),
            lambda: report_plots.line_chart({"learning rate": (xs, per_step)}, xlabel, "learning rate"),
        )
    else:
        section.unavailable("Learning-rate schedule", "training.json has no `learning_rate.per_step`")

    losses = _numbers(_dig(training, "history.epoch_loss"))
    if losses:
        epochs = list(range(1, len(losses) + 1))
        _plot(
            section,
            "Training loss per epoch (mean cross-entropy)",
            lambda: report_plots.line_chart({"training loss": (epochs, losses)}, "epoch", "loss"),
        )
        section.table(
            ("epoch", "loss"), list(zip(epochs, losses, strict=True)), collapsed=f"Loss per epoch ({len(losses)})"
        )
    else:
        section.unavailable("Loss curve", "training.json has no `history.epoch_loss`")
    history = training.get("history") or {}
    inputs = training.get("inputs") or {}
    facts = [
        ("architecture", training.get("architecture")),
        ("training images", inputs.get("train_images")),
        ("features computed by", inputs.get("feature_runtime")),
        ("final training loss", losses[-1] if losses else None),
        (
            "accuracy on the training images",
            pct(history.get("train_accuracy")) if history.get("train_accuracy") else None,
        ),
        ("training time", f"{fmt(training.get('seconds'))} s" if training.get("seconds") is not None else None),
    ]
    section.key_values([(k, v) for k, v in facts if v is not None], caption="Run")
    if search:
        _search_table(section, search)
    else:
        section.unavailable("Search table", "no hyperparameter search was run (`edge-build train --search` runs one)")
    return section


def _search_table(section: Section, search: dict[str, Any]) -> None:
    rows = [r for r in search.get("table") or [] if isinstance(r, dict)]
    if not rows:
        section.unavailable("Search table", "the search recorded no candidates")
        return
    chosen = search.get("chosen") or {}
    keys = [k for k in ("lr", "weight_decay", "epochs") if k in chosen] or [
        k for k in rows[0] if not k.startswith("cv_") and not isinstance(rows[0][k], list)
    ]
    table = []
    for row in rows:
        is_chosen = bool(chosen) and all(row.get(k) == chosen.get(k) for k in keys)
        std = row.get("cv_accuracy_std")
        accuracy = pct(row.get("cv_accuracy")) + (f" ± {pct(std)}" if _is_number(std) else "")
        folds = row.get("fold_accuracy")
        table.append(
            [
                *(row.get(k) for k in keys),
                Cell(accuracy, css="num"),
                row.get("cv_nll"),
                ", ".join(pct(f, 0) for f in folds) if isinstance(folds, list) else "—",
                badge("ok", "chosen") if is_chosen else "",
            ]
        )
    caption = (
        f"Hyperparameter search: {len(rows)} candidates, {search.get('folds', '?')}-fold cross-validation "
        f"on {fmt(search.get('images'))} training images ({fmt(search.get('duplicate_groups'))} duplicate-aware groups)"
    )
    section.table([*keys, "CV accuracy", "CV log-loss", "per fold", ""], table, caption=caption)
    if search.get("selection"):
        section.paragraph(f"Selection: {search['selection']}; search took {fmt(search.get('seconds'))} s.", css="muted")


# --------------------------------------------------------------------------- accuracy


def _accuracy_numbers(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "top1": _dig(payload, "top1", "top1_accuracy", "accuracy.top1", "metrics.top1", "accuracy"),
        "top5": _dig(payload, "top5", "top5_accuracy", "accuracy.top5", "metrics.top5"),
        "bin": _dig(payload, "bin_accuracy", "bin_top1", "accuracy.bin", "metrics.bin_accuracy"),
        "images": _dig(payload, "n", "images", "count", "num_images", "samples"),
        "correct": _dig(payload, "correct"),
    }


_SUBSET_NAMES = {
    "all": "all validation images",
    "without_exact_duplicates": "without images also in training (same file or pixels)",
    "without_any_duplicates": "without any training duplicate (incl. near-duplicates)",
}


def _evaluation_variants(evaluation: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, figures) for all validation images and each subset (e.g. without leaked images)."""
    subsets = evaluation.get("subsets")
    if isinstance(subsets, dict) and subsets:
        variants = [(_SUBSET_NAMES.get(k, k.replace("_", " ")), v) for k, v in subsets.items() if isinstance(v, dict)]
        if variants:
            return variants
    variants = [("all validation images", evaluation)]
    for key, value in evaluation.items():
        is_variant = isinstance(value, dict) and any(w in key.lower() for w in ("leak", "clean", "without", "dedup"))
        if is_variant and _accuracy_numbers(value)["top1"] is not None:
            variants.append((key.replace("_", " "), value))
    return variants


def _per_class(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """class code -> {accuracy, support, ...} from a list, an object keyed by code, or a list of numbers."""
    raw = _dig(evaluation, "per_class", "per_class_accuracy", "classes")
    result: dict[str, dict[str, Any]] = {}
    if isinstance(raw, list) and len(raw) == NUM_CLASSES and all(_is_number(v) for v in raw):
        return {code: {"accuracy": raw[i]} for i, code in enumerate(CODES)}
    if isinstance(raw, dict):
        for key, value in raw.items():
            code = _class_code(key) or (_class_code(int(key)) if str(key).isdigit() else None)
            if code:
                result[code] = value if isinstance(value, dict) else {"accuracy": value}
        return result
    for index, row in enumerate(_records(raw)):
        code = _class_code(row.get("code")) or _class_code(row.get("index")) or _class_code(row.get("class"))
        code = code or (CODES[index] if len(_records(raw)) == NUM_CLASSES else None)
        if code:
            result[code] = row
    return result


def _class_accuracy(row: dict[str, Any]) -> float | None:
    return _fraction(_dig(row, "accuracy", "recall", "top1", "acc"))


def _accuracy_section(sources: ReportSources) -> tuple[Section, Verdict]:
    section = Section("accuracy", "Accuracy")
    evaluation = sources.get("evaluation")
    if evaluation is None:
        reason = sources.why_missing("evaluation")
        section.unavailable("Evaluation", reason)
        return section, Verdict("Accuracy", "na", "not available", reason, "accuracy")
    numbers = _accuracy_numbers(evaluation)
    gate = _dig(evaluation, "gate", "accuracy_gate")
    gate_passed = _passed(gate) if isinstance(gate, dict) else None
    headline = f"top-1 {pct(numbers['top1'])}" if numbers["top1"] is not None else "no top-1 figure"
    detail = f"4-bin {pct(numbers['bin'])}, top-5 {pct(numbers['top5'])}"
    if numbers["images"] is not None:
        detail += f" on {fmt(numbers['images'])} validation images"
    if evaluation.get("runtime"):
        section.paragraph(f"The trained network in {evaluation['runtime']}, on the validation split only.")
    rows = []
    for name, payload in _evaluation_variants(evaluation):
        values = _accuracy_numbers(payload)
        rows.append((name, values["images"], pct(values["top1"]), pct(values["top5"]), pct(values["bin"])))
    section.table(("evaluated on", "images", "top-1", "top-5", "4-bin"), rows, caption="Validation accuracy")
    warnings = [w for w in evaluation.get("warnings") or [] if isinstance(w, str)]
    if warnings:
        section.table(("", "warning"), [(badge("warn", "WARN"), w) for w in warnings], caption="Evaluation warnings")
    if isinstance(gate, dict):
        section.key_values(_scalar_pairs(gate, skip=()), caption="Accuracy gate")
    over_budget = _artifact_accuracy(section, sources, numbers["top1"])
    if numbers["top1"] is None:
        status = "na"
    elif gate_passed is False or over_budget:
        status = "fail"
        if over_budget:
            detail = f"over the {sources.max_accuracy_drop_pt:g} pt drop budget: {', '.join(over_budget)}; " + detail
    elif gate_passed is True or over_budget == []:
        status = "ok"
    else:
        status = "info"  # figures without a budget to judge them by
    verdict = Verdict("Accuracy", status, headline, detail, "accuracy")

    per_class = _per_class(evaluation)
    if per_class:
        codes = [c for c in CODES if c in per_class]
        accuracies = [_class_accuracy(per_class[c]) for c in codes]
        _plot(
            section,
            "Top-1 accuracy per class (colour = bin: blue recyclable, grey residual, red hazardous, green kitchen)",
            lambda: report_plots.horizontal_bars(
                [class_label(c, chinese=False) for c in codes],
                [a if a is not None else math.nan for a in accuracies],
                [report_plots.BIN_COLOURS[int(c[:2])] for c in codes],
                "top-1 accuracy",
                limit=1.0,
            ),
        )
        extra = _columns(
            list(per_class.values()),
            skip=("code", "index", "class", "english", "chinese", "name", "accuracy", "recall", "top1", "acc"),
        )
        rows = [
            [
                c,
                BY_CODE[c].english,
                Cell(BY_CODE[c].chinese, css="zh"),
                BY_CODE[c].bin.english,
                Cell(pct(_class_accuracy(per_class[c])), css="num"),
                *(per_class[c].get(k) for k in extra),
            ]
            for c in codes
        ]
        section.table(["code", "class", "中文", "bin", "top-1", *extra], rows, collapsed="Accuracy per class (table)")
    else:
        section.unavailable("Per-class accuracy", "eval.json has no per-class figures")

    _bin_confusion(section, evaluation.get("bin_confusion"))
    _confusion(section, _dig(evaluation, "confusion", "confusion_matrix"))
    _worst_images(section, sources, evaluation)
    _leakage_lists(section, evaluation.get("leakage"))
    return section, verdict


def _artifact_accuracy(section: Section, sources: ReportSources, network_top1: Any) -> list[str] | None:
    """Top-1 of every benchmarked artifact (bench.json, in percent) against the network's.

    Returns the artifacts whose drop exceeds the target's budget, or None when nothing was judged.
    """
    bench = sources.get("bench") or {}
    budget = sources.max_accuracy_drop_pt
    reference = network_top1 * 100 if _is_number(network_top1) and network_top1 <= 1 else network_top1
    rows, over, judged = [], [], False
    for row in bench.get("results") or []:
        if not isinstance(row, dict) or not _is_number(row.get("top1")):
            continue
        drop = reference - row["top1"] if _is_number(reference) else None
        verdict: Any = ""
        if drop is not None and _is_number(budget):
            judged = True
            verdict = _pass_cell(drop <= budget)
            if drop > budget:
                over.append(f"{row.get('name')} (-{drop:.1f} pt)")
        rows.append(
            (
                Cell(str(row.get("name")), css="name"),
                row.get("runtime"),
                row.get("accuracy_images"),
                Cell(f"{row['top1']:.1f} %", css="num"),
                Cell(f"{drop:+.1f} pt", css="num") if drop is not None else "—",
                verdict,
            )
        )
    if rows:
        budget_text = f"; budget: at most {budget:g} pt below the network" if _is_number(budget) else ""
        section.table(
            ("artifact", "runtime", "images", "top-1", "drop vs network", "verdict"),
            rows,
            caption=f"Top-1 of each exported artifact (measured by `edge-build bench`){budget_text}",
        )
    return over if judged else None


def _bin_confusion(section: Section, matrix: Any) -> None:
    size = len(BINS)
    valid = (
        isinstance(matrix, list)
        and len(matrix) == size
        and all(isinstance(r, list) and len(r) == size and all(_is_number(v) for v in r) for r in matrix)
    )
    if not valid:
        return
    bins = [BINS[code] for code in sorted(BINS)]
    rows = []
    for i, row in enumerate(matrix):
        total = sum(row)
        rows.append(
            [
                Cell(f"{bins[i].english} {bins[i].chinese}", css="key"),
                *row,
                Cell(pct(row[i] / total) if total else "—", css="num"),
            ]
        )
    headers = ["true bin \\ predicted", *(f"{b.english} {b.chinese}" for b in bins), "bin accuracy"]
    section.table(headers, rows, caption="The 4-bin decision (rows: true bin, columns: predicted bin)")


def _leakage_lists(section: Section, leakage: Any) -> None:
    if not isinstance(leakage, dict):
        return
    rows = []
    for kind, label in (
        ("same_file", "same file as a training image"),
        ("same_pixels", "same decoded pixels as a training image"),
        ("near_duplicate", "near-duplicate of a training image"),
    ):
        rows += [(key, label) for key in leakage.get(kind) or [] if isinstance(key, str)]
    if rows:
        section.table(
            ("validation image", "also in training as"),
            rows,
            collapsed=f"Validation images that also occur in training ({len(rows)}): excluded in the subsets above",
        )


def _confusion(section: Section, matrix: Any) -> None:
    if isinstance(matrix, dict):
        matrix = _dig(matrix, "matrix", "counts", "values")
    valid = (
        isinstance(matrix, list)
        and len(matrix) == NUM_CLASSES
        and all(isinstance(r, list) and len(r) == NUM_CLASSES and all(_is_number(v) for v in r) for r in matrix)
    )
    if not valid:
        reason = (
            "eval.json has no confusion matrix"
            if matrix is None
            else f"the confusion matrix is not {NUM_CLASSES}x{NUM_CLASSES} numbers"
        )
        section.unavailable("Confusion matrix", reason)
        return
    # An HTML heat map, not a plot: class names stay text, so Chinese renders in any browser font.
    head = "".join(f'<th class="rot" title="{html.escape(class_label(c))}">{c}</th>' for c in CODES)
    body = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        cells = []
        for j, value in enumerate(row):
            share = value / total
            if value == 0:
                cells.append("<td></td>")
                continue
            colour = (
                f"rgba(0,114,178,{0.15 + 0.85 * share:.2f})"
                if i == j
                else f"rgba(213,94,0,{0.2 + 0.8 * min(1.0, share * 2):.2f})"
            )
            ink = "#fff" if share > 0.5 else "#000"
            title = f"true {class_label(CODES[i])} → predicted {class_label(CODES[j])}: {fmt(value)}"
            cells.append(f'<td style="background:{colour};color:{ink}" title="{html.escape(title)}">{fmt(value)}</td>')
        cls = CLASSES[i]
        label = (
            f'<th class="row"><span class="code">{cls.code}</span> {html.escape(cls.english)} '
            f'<span lang="zh">{html.escape(cls.chinese)}</span></th>'
        )
        body.append(f"<tr>{label}{''.join(cells)}</tr>")
    html_table = (
        '<div class="scroll"><table class="confusion">'
        "<caption>Confusion matrix (rows: true class, columns: predicted class)</caption>"
        f"<thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )
    legend = "; ".join(f"{c.code} {c.english} {c.chinese}" for c in CLASSES)
    md_rows = ["| true \\ predicted | " + " | ".join(CODES) + " |", "|---" * (NUM_CLASSES + 1) + "|"]
    md_rows += [
        f"| {CODES[i]} | " + " | ".join(fmt(v) if v else "" for v in row) + " |" for i, row in enumerate(matrix)
    ]
    md = (
        "<details><summary>Confusion matrix (rows: true, columns: predicted)</summary>\n\n"
        + "\n".join(md_rows)
        + f"\n\nClasses: {legend}\n\n</details>"
    )
    section.raw(html_table, md)
    confusions = sorted(
        ((matrix[i][j], i, j) for i in range(NUM_CLASSES) for j in range(NUM_CLASSES) if i != j and matrix[i][j]),
        reverse=True,
    )[:8]
    if confusions:
        section.table(
            ("true class", "predicted as", "images"),
            [(class_label(i), class_label(j), n) for n, i, j in confusions],
            caption="Most frequent confusions",
        )


def _prediction_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-image predictions normalised to {image, true, predicted, confidence, true_probability}."""
    raw = _dig(evaluation, "predictions", "per_image", "images_detail", "samples")
    rows = []
    for item in _records(raw, key="image"):
        true = _class_code(_dig(item, "true", "label", "true_code", "target", "code"))
        predicted = _class_code(_dig(item, "predicted", "prediction", "pred", "predicted_code", "top1"))
        if true is None or predicted is None:
            continue
        rows.append(
            {
                "image": _dig(item, "image", "path", "key", "file", default="?"),
                "true": true,
                "predicted": predicted,
                "confidence": _dig(item, "confidence", "probability", "prob", "predicted_probability"),
                "true_probability": _dig(item, "true_probability", "prob_true", "probability_true"),
                "leaked": _dig(item, "leaked", "leak"),
            }
        )
    return rows


def _worst_images(section: Section, sources: ReportSources, evaluation: dict[str, Any]) -> None:
    predictions = _prediction_rows(evaluation)
    if not predictions:
        section.unavailable(
            "Worst-classified images",
            "eval.json has no per-image predictions (field `predictions`: image, true, predicted, confidence)",
        )
        return
    wrong = [p for p in predictions if p["true"] != p["predicted"]]
    if not wrong:
        section.paragraph(f"Every one of the {len(predictions)} validation images is classified correctly.")
        return

    def badness(p: dict[str, Any]) -> tuple[float, float]:
        true_probability = p["true_probability"] if _is_number(p["true_probability"]) else 1.0
        confidence = p["confidence"] if _is_number(p["confidence"]) else 0.0
        return (true_probability, -confidence)

    worst = sorted(wrong, key=badness)[:WORST_IMAGES]
    cards, md_rows = [], []
    for p in worst:
        uri, problem = _thumbnail(sources.data_dir, str(p["image"]))
        picture = (
            f'<img src="{uri}" alt="{html.escape(str(p["image"]))}">'
            if uri
            else f'<div class="noimg">{html.escape(problem)}</div>'
        )
        confidence = f" ({pct(p['confidence'], 0)})" if _is_number(p["confidence"]) else ""
        leaked = f" · also in training ({str(p['leaked']).replace('_', ' ')})" if p["leaked"] else ""
        cards.append(
            '<div class="thumb">'
            + picture
            + f'<div class="pred">predicted <b>{html.escape(class_label(p["predicted"]))}</b>{confidence}</div>'
            + f'<div class="true">true <b>{html.escape(class_label(p["true"]))}</b></div>'
            + f'<div class="path">{html.escape(str(p["image"]))}{leaked}</div></div>'
        )
        md_rows.append(f"| {p['image']} | {class_label(p['true'])} | {class_label(p['predicted'])}{confidence} |")
    caption = (
        f"Worst-classified validation images ({len(worst)} of {len(wrong)} misclassified, "
        "most confident mistakes first)"
    )
    section.raw(
        f'<h3>{html.escape(caption)}</h3><div class="thumbs">{"".join(cards)}</div>',
        f"**{caption}**\n\n| image | true | predicted |\n|---|---|---|\n" + "\n".join(md_rows),
    )


def _thumbnail(data_dir: Path | None, image: str) -> tuple[str | None, str]:
    """A JPEG data URI of a small copy of `image` (absolute, or relative to the data set root)."""
    from PIL import Image

    from edge_build.errors import EdgeBuildError
    from edge_build.images import load_rgb

    path = Path(image)
    if not path.is_absolute():
        if data_dir is None:
            return None, "image not shown: the data set location is unknown"
        path = data_dir / image
    if not path.is_file():
        return None, f"image not found: {path}"
    try:
        picture = Image.fromarray(load_rgb(path))
    except EdgeBuildError as exc:
        return None, f"image not readable: {exc.message}"
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), ""


# --------------------------------------------------------------------------- parity


def _tolerance_text(tolerance: Any) -> str:
    if not isinstance(tolerance, dict):
        return fmt(tolerance)
    parts = []
    if _is_number(tolerance.get("max_abs")):
        parts.append(f"abs ≤ {tolerance['max_abs']:g}")
    if _is_number(tolerance.get("min_cosine")):
        parts.append(f"cos ≥ {tolerance['min_cosine']:g}")
    if _is_number(tolerance.get("top1_agreement")):
        parts.append(f"top-1 ≥ {pct(tolerance['top1_agreement'], 0)}")
    return "; ".join(parts)


def _parity_section(sources: ReportSources) -> tuple[Section, Verdict]:
    section = Section("parity", "Parity")
    parity = sources.get("parity")
    if parity is None:
        reason = sources.why_missing("parity")
        section.unavailable("Parity", reason)
        return section, Verdict("Parity", "na", "not available", reason, "parity")
    artifacts = [a for a in parity.get("artifacts") or [] if isinstance(a, dict)]
    images = parity.get("images") or {}
    count = images.get("count")
    reference = _dig(parity, "reference.runtime", default="the reference network")
    if not artifacts:
        section.unavailable("Parity table", "parity.json lists no artifacts")
        return section, Verdict("Parity", "na", "no artifacts checked", "", "parity")
    statuses = {str(a.get("kind")): str(a.get("status")) for a in artifacts}
    bad = [kind for kind, status in statuses.items() if status != "pass"]
    if not bad:
        verdict = Verdict("Parity", "ok", f"all {len(artifacts)} artifacts pass", f"on {fmt(count)} images", "parity")
    else:
        verdict = Verdict(
            "Parity", "fail", f"{len(bad)} of {len(artifacts)} fail", "failing: " + ", ".join(bad), "parity"
        )
    section.paragraph(
        f"Each artifact's outputs against {reference} on {fmt(count)} validation images "
        f"({images.get('size', '?')} px); verdict: {parity.get('verdict', '?')}."
    )
    rows = []
    for artifact in artifacts:
        status = str(artifact.get("status"))
        kind = Cell(str(artifact.get("kind")), css="name")
        runtime = Cell(str(artifact.get("runtime") or "—"), css="nowrap")
        if status == "error" or not artifact.get("outputs"):
            rows.append(
                [
                    kind,
                    "—",
                    runtime,
                    *["—"] * 6,
                    Cell(_tolerance_text(artifact.get("tolerance")), css="nowrap"),
                    badge("fail", "ERROR" if status == "error" else status.upper()),
                ]
            )
            continue
        for output in artifact.get("outputs") or []:
            agreement = output.get("top1_agreement")
            agree_text = pct(agreement, 1)
            if _is_number(count) and _is_number(agreement):
                agree_text = f"{round(agreement * count)}/{count} ({pct(agreement, 1)})"
            rows.append(
                [
                    kind,
                    output.get("output"),
                    runtime,
                    output.get("max_abs"),
                    output.get("mean_abs"),
                    output.get("p99_abs"),
                    Cell(f"{output['cosine_min']:.6f}", css="num") if _is_number(output.get("cosine_min")) else "—",
                    Cell(agree_text, css="num"),
                    output.get("worst_image"),
                    Cell(_tolerance_text(artifact.get("tolerance")), css="nowrap"),
                    _pass_cell(output.get("passed") if isinstance(output.get("passed"), bool) else status == "pass"),
                ]
            )
    section.table(
        (
            "artifact",
            "output",
            "runtime",
            "max abs",
            "mean abs",
            "p99 abs",
            "cos min",
            "top-1 agreement",
            "worst image",
            "tolerance",
            "verdict",
        ),
        rows,
        caption="Error statistics per artifact and output",
    )
    notes = []
    for artifact in artifacts:
        kind = str(artifact.get("kind"))
        if artifact.get("error"):
            notes.append((kind, f"could not run: {artifact['error']}"))
        for output in artifact.get("outputs") or []:
            notes += [(kind, failure) for failure in output.get("failures") or []]
        notes += [(kind, f"diagnosis: {d}") for d in artifact.get("diagnosis") or []]
    if notes:
        section.table(("artifact", "why"), notes, caption="Failures and diagnosis")
    fold = _dig(parity, "reference.fold_check")
    facts = [
        ("reference", reference),
        ("checkpoint sha256", _dig(parity, "reference.checkpoint_sha256")),
        ("BatchNorm-folded reference check", fmt(fold) if isinstance(fold, dict) else None),
        ("checked", parity.get("created")),
        ("time", f"{fmt(parity.get('seconds'))} s" if parity.get("seconds") is not None else None),
    ]
    section.key_values([(k, v) for k, v in facts if v is not None], caption="How parity was checked")
    return section, verdict


# --------------------------------------------------------------------------- latency


def _bench_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in bench.get("results") or [] if isinstance(r, dict)]


def _latency_at(row: dict[str, Any], batch: int) -> dict[str, Any] | None:
    latency = row.get("latency") or {}
    value = latency.get(str(batch), latency.get(batch)) if isinstance(latency, dict) else None
    return value if isinstance(value, dict) else None


def _latency_verdict(bench: dict[str, Any]) -> Verdict:
    settings = bench.get("settings") or {}
    budget = settings.get("latency_budget_ms")
    batch = settings.get("latency_budget_batch", 1)
    artifacts = [r for r in _bench_rows(bench) if r.get("role", "artifact") == "artifact"]
    if bench.get("refused"):
        return Verdict("Latency", "na", "not measured", str(bench["refused"]), "latency")
    timed = [(r, _latency_at(r, batch)) for r in artifacts]
    timed = [(r, lat) for r, lat in timed if lat and _is_number(lat.get("p50_ms"))]
    if not timed:
        return Verdict("Latency", "na", "no latency figures", "", "latency")
    fastest, lat = min(timed, key=lambda item: item[1]["p50_ms"])
    headline = f"{fastest.get('name')}: p50 {lat['p50_ms']:.2f} ms @ batch {batch}"
    if not _is_number(budget):
        return Verdict("Latency", "na", headline, "the target sets no latency budget", "latency")
    within = [r for r, lat in timed if lat["p50_ms"] <= budget]
    if len(within) == len(timed):
        status = "ok"
    elif within:
        status = "warn"
    else:
        status = "fail"
    detail = f"budget {budget:g} ms; {len(within)} of {len(timed)} artifacts within it"
    return Verdict("Latency", status, headline, detail, "latency")


def _latency_section(sources: ReportSources, regression_pct: float) -> tuple[Section, Verdict]:
    section = Section("latency", "Latency")
    bench = sources.get("bench")
    if bench is None:
        reason = sources.why_missing("bench")
        section.unavailable("Benchmark", reason)
        verdict = Verdict("Latency", "na", "not available", reason, "latency")
    else:
        verdict = _latency_verdict(bench)
        _bench_tables(section, bench)
        _comparison_table(section, bench, regression_pct)
    _history(section, sources, regression_pct)
    return section, verdict


def _bench_tables(section: Section, bench: dict[str, Any]) -> None:
    settings = bench.get("settings") or {}
    machine = bench.get("machine") or {}
    load = _dig(bench, "load_average.before", default=[]) or []
    budget = settings.get("latency_budget_ms")
    budget_batch = settings.get("latency_budget_batch", 1)
    section.paragraph(
        f"{machine.get('cpu', 'unknown CPU')}, {machine.get('cores', '?')} cores, load {load[0] if load else '?'}; "
        f"{settings.get('threads', '?')} threads, providers {fmt(settings.get('providers'))}; "
        + (f"budget p50 ≤ {budget:g} ms at batch {budget_batch}. " if _is_number(budget) else "no latency budget. ")
        + f"Measured {bench.get('created', '?')} in {fmt(bench.get('duration_s'))} s."
    )
    if bench.get("refused"):
        section.unavailable("Latency", str(bench["refused"]))
        return
    rows = _bench_rows(bench)
    if not rows:
        section.unavailable("Latency table", "bench.json has no results")
        return
    references = [r.get("name") for r in rows if r.get("role") == "reference"]
    table = []
    for row in rows:
        latency = row.get("latency") or {}
        batches = sorted(latency, key=lambda b: int(b)) if isinstance(latency, dict) else []
        for batch in batches:
            lat = latency[batch]
            ratios = _dig(row, f"ratios.{batch}", default={}) or {}
            judged = row.get("role") == "artifact" and _is_number(budget) and int(batch) == int(budget_batch)
            within = lat.get("p50_ms") <= budget if judged and _is_number(lat.get("p50_ms")) else None
            name = Cell(str(row.get("name")), css="name ref" if row.get("role") == "reference" else "name")
            table.append(
                [
                    name,
                    row.get("role"),
                    row.get("runtime"),
                    int(batch),
                    lat.get("p50_ms"),
                    lat.get("p90_ms"),
                    lat.get("p99_ms"),
                    lat.get("throughput_ips"),
                    lat.get("runs"),
                    *(_ratio_cell(ratios.get(f"vs_{ref}")) for ref in references),
                    _pass_cell(within) if judged else "",
                ]
            )
    headers = ["subject", "role", "runtime", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "runs"]
    headers += [f"× {ref}" for ref in references] + ["budget"]
    section.table(
        headers, table, caption="Latency per artifact and batch size (× ref: p50 ratio to that reference row)"
    )

    at_budget = [(r, _latency_at(r, budget_batch)) for r in rows]
    at_budget = [(r, lat) for r, lat in at_budget if lat and _is_number(lat.get("p50_ms"))]
    if at_budget:
        colours = [
            report_plots.PALETTE[5] if r.get("role") == "reference" else report_plots.PALETTE[0] for r, _ in at_budget
        ]
        _plot(
            section,
            f"p50 latency at batch {budget_batch} (orange: reference rows)",
            lambda: report_plots.horizontal_bars(
                [str(r.get("name")) for r, _ in at_budget],
                [lat["p50_ms"] for _, lat in at_budget],
                colours,
                "p50 latency (ms)",
                reference=budget if _is_number(budget) else None,
                reference_label=f"budget {budget:g} ms" if _is_number(budget) else "",
            ),
        )
    facts = [
        [
            Cell(str(r.get("name")), css="name"),
            r.get("device"),
            Cell(size_text(r.get("size_bytes")), css="num") if r.get("size_bytes") else "—",
            r.get("load_ms"),
            r.get("peak_rss_mb"),
            pct(r.get("top1")) if r.get("top1") is not None else "—",
            r.get("accuracy_images") or None,
            "; ".join(r.get("notes") or []),
        ]
        for r in rows
    ]
    section.table(
        ("subject", "device", "size", "load ms", "peak RSS MB", "top-1 (val)", "images", "notes"),
        facts,
        caption="Subjects",
    )
    if bench.get("method"):
        section.paragraph(f"Method: {bench['method']}.", css="muted")


def _ratio_cell(ratio: Any) -> Any:
    return Cell(f"{ratio:.2f}×", css="num") if _is_number(ratio) else None


def _comparison_table(section: Section, bench: dict[str, Any], regression_pct: float) -> None:
    previous = bench.get("previous")
    changes = [c for c in bench.get("comparison") or [] if isinstance(c, dict)]
    if not previous or not changes:
        section.paragraph("No previous benchmark of this target on this machine to compare with.", css="muted")
        return
    rows = []
    for change in changes:
        before, now, noise = change.get("before_ms"), change.get("now_ms"), change.get("noise_ms", 0.0)
        regressed = None
        if all(_is_number(v) for v in (before, now, noise)):
            regressed = now > before * (1 + regression_pct / 100) + noise
        rows.append(
            [
                change.get("artifact"),
                change.get("batch"),
                before,
                now,
                f"{change['change_pct']:+.1f} %" if _is_number(change.get("change_pct")) else "—",
                noise,
                badge("fail", "REGRESSION") if regressed else badge("ok", "ok") if regressed is False else "",
            ]
        )
    section.table(
        ("artifact", "batch", "before p50 ms", "now p50 ms", "change", "noise ms", "verdict"),
        rows,
        caption=(
            f"Compared with {previous.get('date', '?')} (commit {str(previous.get('git_commit', '?'))[:12]}); "
            f"regression = slower by more than {regression_pct:g} % plus both runs' spread"
        ),
    )


def _history(section: Section, sources: ReportSources, regression_pct: float) -> None:
    from edge_build import history

    records = sorted(sources.history, key=lambda r: str(r.get("date", "")))
    if len(records) < 2:
        reason = f"{len(records)} run(s) recorded" if sources.history_source and records else sources.history_source
        section.unavailable(
            "Latency history",
            f"a history needs at least two runs of target {sources.target} on this machine "
            f"({reason or 'none recorded'})",
        )
        return
    flagged: set[tuple[int, str, int]] = set()
    for index in range(1, len(records)):
        try:
            changes = history.compare(records[index - 1], records[index])
        except (KeyError, TypeError, ValueError):
            continue
        flagged.update((index, c.artifact, c.batch) for c in changes if c.regressed(regression_pct))
    series: dict[str, list[tuple[int, float, bool]]] = {}
    for index, record in enumerate(records):
        for name, by_batch in (record.get("latency") or {}).items():
            for batch, values in (by_batch or {}).items():
                if isinstance(values, dict) and _is_number(values.get("p50_ms")):
                    key = f"{name} b{batch}"
                    series.setdefault(key, []).append(
                        (index, float(values["p50_ms"]), (index, name, int(batch)) in flagged)
                    )
    labels = [f"{str(r.get('date', '?'))[5:16].replace('T', ' ')}\n{str(r.get('git_commit', ''))[:7]}" for r in records]
    budget = _dig(sources.get("bench") or {}, "settings.latency_budget_ms")
    _plot(
        section,
        f"Latency history on this machine ({len(records)} runs, regressions circled)",
        lambda: report_plots.history_chart(series, labels, budget if _is_number(budget) else None),
    )
    regressions = sorted(flagged)
    rows = [(labels[i].replace("\n", " commit "), artifact, batch) for i, artifact, batch in regressions]
    if rows:
        section.table(("run", "artifact", "batch"), rows, caption=f"Regressions in the history ({len(rows)})")
    else:
        section.paragraph(
            f"No regression in the {len(records)} recorded runs (threshold {regression_pct:g} % plus noise)."
        )
    if sources.history_source:
        section.paragraph(f"History file: {sources.history_source}", css="muted")


# --------------------------------------------------------------------------- the page

_CSS = """
:root { --ok:#1e7e34; --warn:#b36b00; --fail:#c0392b; --na:#6c757d; --ink:#1d2330; --muted:#5f6b7a;
  --line:#e3e7ee; --bg:#f6f8fb; --accent:#0072B2; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC","Microsoft YaHei",
  "PingFang SC","Hiragino Sans GB","WenQuanYi Micro Hei",sans-serif; }
main { max-width:1180px; margin:0 auto; padding:24px 28px 64px; }
header h1 { margin:0 0 4px; font-size:26px; }
header .meta { color:var(--muted); font-size:13px; }
nav { margin:14px 0 4px; font-size:13px; }
nav a { color:var(--accent); text-decoration:none; margin-right:14px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px; margin:18px 0; }
section > h2 { margin:0 0 10px; font-size:20px; border-bottom:2px solid var(--line); padding-bottom:6px; }
h3 { font-size:15px; margin:18px 0 6px; }
.failure { background:#fdecea; border:2px solid var(--fail); border-radius:10px; padding:14px 20px; margin:18px 0; }
.failure h2 { margin:0 0 6px; color:var(--fail); font-size:20px; }
.failure pre { white-space:pre-wrap; margin:6px 0; font-size:13px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(200px,1fr)); gap:12px; margin:16px 0; }
.card { background:#fff; border:1px solid var(--line); border-left:6px solid var(--na); border-radius:8px;
  padding:10px 14px; color:inherit; text-decoration:none; display:block; }
.card.ok { border-left-color:var(--ok); }
.card.warn { border-left-color:var(--warn); }
.card.fail { border-left-color:var(--fail); }
.card.info { border-left-color:var(--accent); }
.card .label { font-size:12px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted); }
.card .headline { font-size:16px; font-weight:600; margin:2px 0; }
.card .detail { font-size:12px; color:var(--muted); }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:11px; font-weight:700; color:#fff;
  background:var(--na); }
.badge.ok { background:var(--ok); }
.badge.warn { background:var(--warn); }
.badge.fail { background:var(--fail); }
.badge.info { background:var(--accent); }
.scroll { overflow-x:auto; margin:8px 0 12px; }
table { border-collapse:collapse; font-size:13px; }
.caption, caption { text-align:left; font-weight:600; padding:4px 0 2px; font-size:13px; margin-top:14px; }
th, td { border-bottom:1px solid var(--line); padding:4px 10px; text-align:left; vertical-align:top; }
thead th { background:#f0f3f7; font-weight:600; white-space:nowrap; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.hash { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:11px; word-break:break-all; }
td.name { font-weight:600; white-space:nowrap; }
td.nowrap { white-space:nowrap; }
td.ref { color:var(--warn); }
table.kv td.key { color:var(--muted); white-space:nowrap; }
table.kv thead { display:none; }
table.confusion { font-size:11px; }
table.confusion td { text-align:center; padding:2px 3px; min-width:24px; border:1px solid #f1f1f1; }
table.confusion th.rot { writing-mode:vertical-rl; transform:rotate(180deg); padding:4px 2px; font-weight:500; }
table.confusion th.row { white-space:nowrap; font-weight:500; padding:2px 8px; }
.code { font-family:ui-monospace,"DejaVu Sans Mono",monospace; color:var(--muted); }
figure { margin:10px 0 16px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; }
figcaption { font-size:12px; color:var(--muted); }
p.na { color:var(--na); background:#f7f7f9; border-left:4px solid var(--na); padding:6px 10px; border-radius:4px; }
p.muted { color:var(--muted); font-size:12px; }
details { margin:8px 0; }
summary { cursor:pointer; font-weight:600; font-size:13px; color:var(--accent); }
.thumbs { display:grid; grid-template-columns:repeat(auto-fill,minmax(168px,1fr)); gap:12px; }
.thumb { border:1px solid var(--line); border-radius:8px; padding:8px; font-size:12px; background:#fff; }
.thumb img, .thumb .noimg { width:144px; height:144px; object-fit:cover; display:block; margin:0 auto 6px;
  border-radius:4px; }
.thumb .noimg { background:#eee; color:var(--muted); font-size:11px; padding:8px; overflow:hidden; }
.thumb .pred { color:var(--fail); }
.thumb .true { color:var(--ok); }
.thumb .path { color:var(--muted); font-size:11px; word-break:break-all; }
footer { color:var(--muted); font-size:12px; margin-top:30px; }
"""

#: No fetch of any kind: the page must render from this one file, offline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _guarded(anchor: str, title: str, label: str, build: Callable[[], Any]) -> tuple[Section, Verdict | None]:
    """Run a section builder; a bug or an unexpected shape becomes a note in that section only."""
    try:
        result = build()
    except Exception as exc:  # the report must render whatever the inputs look like
        section = Section(anchor, title)
        reason = (
            f"the section could not be rendered ({type(exc).__name__}: {exc}); the input file has an unexpected shape"
        )
        section.unavailable(title, reason)
        return section, Verdict(label, "na", "could not render", reason, anchor)
    if isinstance(result, tuple):
        return result
    return result, None


def _build_verdict(sources: ReportSources) -> Verdict:
    failure = sources.failure
    if failure:
        stage = failure.get("stage", "?")
        return Verdict("Build", "fail", f"failed at {stage}", str(failure.get("message", ""))[:140], "failure")
    manifest = sources.get("manifest")
    if manifest is None:
        return Verdict("Build", "na", "no bundle", sources.why_missing("manifest"), "manifest")
    files = len(manifest.get("files") or [])
    return Verdict(
        "Build", "ok", "bundle complete", f"{files} files, created {manifest.get('created', '?')}", "manifest"
    )


def _failure_html_md(sources: ReportSources) -> tuple[str, str]:
    failure = sources.failure
    if not failure:
        return "", ""
    stage = str(failure.get("stage", "unknown stage"))
    message = str(failure.get("message", "no message"))
    hint = failure.get("hint")
    created = _dig(sources.get("manifest") or {}, "created")
    stale = f"The sections below show the result files present in {sources.bundle_dir}" + (
        f"; the bundle there is from an earlier build ({created})." if created else "."
    )
    extra = "".join(
        f"<p><strong>{html.escape(str(k))}:</strong> {html.escape(fmt(v))}</p>"
        for k, v in failure.items()
        if k not in ("stage", "message", "hint")
    )
    page = (
        f'<div class="failure" id="failure"><h2>Build failed at stage “{html.escape(stage)}”</h2>'
        f"<pre>{html.escape(message)}</pre>"
        + (f"<p><strong>Fix:</strong> {html.escape(str(hint))}</p>" if hint else "")
        + extra
        + f"<p>{html.escape(stale)}</p></div>"
    )
    text = f"> ❌ **Build failed at stage `{stage}`**\n>\n> {message}\n"
    if hint:
        text += f">\n> **Fix:** {hint}\n"
    text += f">\n> {stale}"
    return page, text


def _cards(verdicts: Sequence[Verdict]) -> tuple[str, str]:
    cards = "".join(
        f'<a class="card {v.status}" href="#{v.anchor}"><div class="label">{html.escape(v.label)}</div>'
        f'<div class="headline"><span class="badge {v.status}">{_BADGE_TEXT[v.status]}</span> '
        f"{html.escape(v.headline)}</div>"
        f'<div class="detail">{html.escape(v.detail)}</div></a>'
        for v in verdicts
    )
    rows = ["| check | verdict | detail |", "|---|---|---|"]
    rows += [
        f"| {v.label} | {_BADGE_MD[v.status]} {v.headline} | {v.detail.replace('|', '/')} |".replace("\n", " ")
        for v in verdicts
    ]
    return f'<div class="cards">{cards}</div>', "\n".join(rows)


def render_report(sources: ReportSources) -> tuple[str, str]:
    """The report as (HTML page, Markdown text); never raises on odd or missing inputs."""
    pct_threshold = sources.regression_pct
    built = [
        _guarded("data", "Data set health", "Data health", lambda: _doctor_section(sources)),
        _guarded("training", "Training", "Training", lambda: _training_section(sources)),
        _guarded("accuracy", "Accuracy", "Accuracy", lambda: _accuracy_section(sources)),
        _guarded("parity", "Parity", "Parity", lambda: _parity_section(sources)),
        _guarded("latency", "Latency", "Latency", lambda: _latency_section(sources, pct_threshold)),
        _guarded("manifest", "Manifest", "Manifest", lambda: _manifest_and_inputs(sources)),
    ]
    sections = [section for section, _ in built]
    verdicts = [_build_verdict(sources), *(v for _, v in built if v is not None)]
    cards_html, cards_md = _cards(verdicts)
    failure_html, failure_md = _failure_html_md(sources)
    manifest = sources.get("manifest") or {}
    commit = manifest.get("git_commit") or _dig(sources.get("bench") or {}, "provenance.git_commit") or "unknown"
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    meta = f"generated {generated} · bundle {sources.bundle_dir} · commit {str(commit)[:12]}"
    title = f"edge-build report — {sources.target}"

    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{"".join(s.html)}</section>' for s in sections
    )
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f'<body><main><header><h1>{html.escape(title)}</h1><div class="meta">{html.escape(meta)}</div></header>'
        f"{failure_html}{cards_html}<nav>{nav}</nav>{body}"
        "<footer>Written by <code>edge-build report</code>. Self-contained: no scripts, no network; "
        "every plot and thumbnail is embedded in this file.</footer></main></body></html>\n"
    )
    parts = [f"# {title}", f"_{meta}_"]
    if failure_md:
        parts.append(failure_md)
    parts += ["## Summary", cards_md]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += section.md
    text = "\n\n".join(parts) + "\n"
    return page, text


def failure_from(stage: str, error: BaseException) -> dict[str, Any]:
    """The `failure` argument of `write_report` for a stage that raised `error`."""
    from edge_build.errors import EdgeBuildError

    if isinstance(error, EdgeBuildError):
        return {"stage": stage, "message": error.message, "hint": error.hint, "exit_code": error.exit_code}
    return {"stage": stage, "message": f"{type(error).__name__}: {error}"}


def write_report(
    bundle_dir: Path,
    *,
    target: str | None = None,
    build_dir: Path | None = None,
    data_dir: Path | None = None,
    history_dir: Path | None = None,
    files: dict[str, Path] | None = None,
    failure: dict[str, Any] | None = None,
    regression_pct: float | None = None,
    max_accuracy_drop_pt: float | None = None,
) -> list[Path]:
    """Render the report of `bundle_dir` and write `report.html` and `report.md` into it.

    `failure` ({"stage": ..., "message": ..., "hint": ...}) is shown at the top: `edge-build all`
    passes it when a stage failed, so a failed build still leaves a report.
    """
    bundle_dir = Path(bundle_dir)
    sources = load_sources(
        bundle_dir,
        target=target,
        build_dir=build_dir,
        data_dir=data_dir,
        history_dir=history_dir,
        files=files,
        failure=failure,
        max_accuracy_drop_pt=max_accuracy_drop_pt,
    )
    if regression_pct is not None:
        sources.regression_pct = regression_pct
    return write_sources(sources)


def write_sources(sources: ReportSources) -> list[Path]:
    """Render already loaded sources into `sources.bundle_dir` (report.html, report.md)."""
    if sources.bundle_dir is None:
        raise ValueError("ReportSources.bundle_dir is not set: nowhere to write the report")
    page, text = render_report(sources)
    return [
        atomic.write_text(sources.bundle_dir / REPORT_HTML, page),
        atomic.write_text(sources.bundle_dir / REPORT_MD, text),
    ]
