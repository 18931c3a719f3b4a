"""Render a `DoctorReport` for a terminal: summary, per-class table, findings, verdict line."""

from __future__ import annotations

from edge_build.doctor import DoctorReport, Finding, display_path
from edge_build.taxonomy import BY_CODE, CODES

_LABEL = {"error": "ERROR", "warning": "WARNING", "info": "NOTE"}


def verdict_line(report: DoctorReport) -> str:
    parts = []
    for severity, word in (("error", "error"), ("warning", "warning"), ("info", "note")):
        findings = report.of_severity(severity)
        paths = sum(len(f.paths) for f in findings)
        parts.append(f"{_plural(len(findings), word)} ({_plural(paths, 'path')})")
    strict = " (--strict: warnings count as errors)" if report.strict and report.warnings else ""
    return f"verdict: {report.verdict.upper()}: {', '.join(parts)}{strict}; exit {report.exit_code}"


def render_finding(finding: Finding, max_paths: int = 8, full_lines_up_to: int = 3) -> list[str]:
    """One self-contained line (path, problem, fix) per path when there are few; else a summary and the paths."""
    label = f"{_LABEL[finding.severity]:<8}"
    rows = list(zip(finding.paths, finding.details, strict=True))
    if len(rows) <= full_lines_up_to:
        return [f"{label}{path}: {detail or finding.message}. Fix: {finding.hint}" for path, detail in rows]
    lines = [f"{label}{finding.message}. Fix: {finding.hint}"]
    lines += [f"{'':8}  {path}: {detail}" if detail else f"{'':8}  {path}" for path, detail in rows[:max_paths]]
    if len(rows) > max_paths:
        lines.append(f"{'':8}  ... and {len(rows) - max_paths} more (--json lists all)")
    return lines


def render_text(report: DoctorReport, max_paths: int = 8) -> str:
    lines = [f"edge-build doctor: {display_path(str(report.root))}", ""]
    lines += _summary(report)
    if report.counts:
        lines += ["", *_class_table(report)]
    lines += ["", "findings:" if report.findings else "findings: none"]
    for finding in report.findings:
        lines += render_finding(finding, max_paths)
    lines += ["", verdict_line(report)]
    return "\n".join(lines)


def _summary(report: DoctorReport) -> list[str]:
    splits = "   ".join(
        f"{split}: {len(report.classes_found[split])}/{len(CODES)} classes, "
        f"{sum(c['files'] for c in report.counts[split].values())} files"
        for split in report.splits_found
    )
    label = report.label_file
    if label.get("path") is None:
        label_text = "absent (the built-in taxonomy is used)"
    elif not label.get("readable"):
        label_text = "unreadable"
    elif label["disagreements"]:
        label_text = f"{label['encoding'].upper()}, {len(label['disagreements'])} disagreements with the taxonomy"
    else:
        label_text = f"{label['encoding'].upper()}, agrees with the built-in taxonomy"
    images = report.images
    image_text = f"{images['files']} files, {images['usable']} usable, {images['bytes'] / 2**20:.1f} MiB"
    if images["usable"]:
        formats = ", ".join(f"{name} {n}" for name, n in images["formats"].items())
        modes = ", ".join(f"{mode} {m['count']}" for mode, m in images["modes"].items())
        sizes = ", ".join(f"{size} x{n}" for size, n in list(images["sizes"].items())[:3])
        more = f" (+{images['distinct_sizes'] - 3} more sizes)" if images["distinct_sizes"] > 3 else ""
        image_text += f"; {formats}; {modes}; {sizes}{more}; {len(images['exif_rotated'])} EXIF-rotated"
    dup = report.duplicates
    near = report.near_duplicates
    thresholds = near["thresholds"]
    return [
        f"layout:     {splits or 'no splits'}",
        f"label.txt:  {label_text}",
        f"images:     {image_text}",
        f"exact dups: {_plural(len(dup['groups']), 'group')}, {_plural(dup['redundant_files'], 'redundant file')}; "
        f"{len(dup['leakage'])} non-training files also in train; {len(dup['label_conflicts'])} under two classes",
        f"near dups:  {len(near['pairs'])} pairs (pHash <= {thresholds['phash']} and dHash <= {thresholds['dhash']}): "
        f"{near['counts']['across_classes']} across classes, {near['counts']['across_splits']} across splits, "
        f"{near['counts']['in_class']} within a class",
    ]


def _class_table(report: DoctorReport) -> list[str]:
    splits = list(report.counts)
    header = f"{'class':<6} {'name':<22}" + "".join(f"{split + ' files/distinct':>22}" for split in splits)
    lines = [header]
    flagged = {path for f in report.findings if f.code == "underrepresented_class" for path in f.paths}
    codes = sorted({code for per_class in report.counts.values() for code in per_class})
    for code in codes:
        row = f"{code:<6} {BY_CODE[code].english:<22}"
        for split in splits:
            c = report.counts[split].get(code)
            cell = f"{c['files']} / {c['distinct']}" if c else "missing"
            mark = " !" if f"{split}/{code}" in flagged else "  "
            row += f"{cell:>20}{mark}"
        lines.append(row)
    if flagged:
        lines.append("! fewer than half the split's median number of distinct images")
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")
