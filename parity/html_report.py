"""Self-contained HTML reports a person reads: one ``report.html`` per component run, and an index.

``parity report PATH`` accepts a component report directory (holding ``report.json``), a run
directory (holding several), or a reports folder (every run in it; ``--latest`` for the newest
only), writes ``report.html`` next to each ``report.json`` and ``index.html`` in the reports
folder. Pages embed their plots as base64 PNGs and their CSS/JS inline, and forbid network
access with a Content-Security-Policy, so a page can be mailed or archived on its own.

Nothing here is specific to a component: sections are drawn by ``kind`` (curves -> line plot,
heatmap -> image, table -> HTML table), and tensor images come from the ``.npy`` dumps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from jinja2 import Environment, FileSystemLoader

from parity.dumps import layer_file, load_json, load_npy, write_text
from parity.report import load_report

TEMPLATES = Path(__file__).resolve().parent / "templates"
INDEX_NAME = "index.html"
HTML_NAME = "report.html"
#: Dumps larger than this are memory-mapped instead of read.
MMAP_BYTES = 256 << 20
_RUN_TIME = re.compile(r"^(\d{8}-\d{6})")


# --- formatting ------------------------------------------------------------------------------

def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return None


def fmt(value: Any, style: str = "g") -> str:
    """Text of a metric: ``–`` when absent, ``NaN``/``∞`` spelled out, else by ``style``
    (``cos``: 7 decimals, ``db``: 1 decimal, ``int``, ``g``: 3 significant digits)."""
    number = _float(value)
    if number is None:
        return "–" if value is None else str(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    if style == "int" or isinstance(value, (int, np.integer)):
        return str(int(number))
    if style == "cos":
        return f"{number:.7f}"
    if style == "db":
        return f"{number:.1f}"
    return f"{number:.3g}"


def sort_key(value: Any) -> str:
    """``data-sort`` value for the inline sorter: a number JS parses, or "" (missing; sorts last)."""
    number = _float(value)
    if number is None:
        return ""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return repr(number)


def cell(text: Any = "", sort: str | None = None, cls: str = "", href: str = "", badge: str = "",
         title: str = "", detail: str = "") -> dict[str, Any]:
    """A table cell for ``macros.table``: text, ``data-sort`` key, classes, link or badge, and a detail line."""
    return {"text": "" if text is None else str(text), "sort": sort, "cls": cls, "href": href,
            "badge": badge, "title": title, "detail": detail, "meta": ""}


def num_cell(value: Any, style: str = "g", bad: bool = False, title: str = "") -> dict[str, Any]:
    return cell(fmt(value, style), sort_key(value), "num bad" if bad else "num", title=title)


def column(label: str, num: bool = False, title: str = "") -> dict[str, Any]:
    return {"label": label, "num": num, "title": title}


def _json(value: Any, limit: int = 20000) -> str:
    text = json.dumps(value, indent=2, default=str, allow_nan=True)
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters)"


def _env() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True,
                       trim_blocks=False, lstrip_blocks=False)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


# --- the per-layer table -----------------------------------------------------------------------

#: (row key, header, style, header tooltip, words in ``reasons`` that mark the cell as the failing one)
METRIC_COLUMNS = [
    ("cosine", "cosine", "cos", "cosine similarity of MLX and reference", ("cosine",)),
    ("max_abs", "max abs", "g", "largest |MLX - reference|", ("max abs",)),
    ("abs_limit", "abs limit", "g", "atol + rtol * max|reference| (float32 threshold)", ()),
    ("max_rel", "max rel", "g", "largest relative error", ("max rel",)),
    ("mean_abs", "mean abs", "g", "mean |MLX - reference|", ()),
    ("rmse", "RMSE", "g", "root mean square of MLX - reference", ()),
    ("snr_db", "SNR dB", "db", "10 log10(|ref|^2 / |MLX - ref|^2)", ()),
    ("budget_ratio", "budget ratio", "g", "our error vs float64 truth / the reference's own bf16 error", ("budget",)),
    ("err_vs_truth", "MLX vs truth", "g", "RMSE of MLX against the float64 reference", ()),
    ("ref_err_vs_truth", "ref vs truth", "g", "RMSE of the bf16 reference against its float64 run", ()),
]


def _pair(a: Any, b: Any) -> str:
    if a == b:
        return fmt(a) if not isinstance(a, list) else str(a)
    return f"ref {a if a is not None else '–'} / MLX {b if b is not None else '–'}"


def layer_table(layers: list[dict[str, Any]], first: str | None) -> dict[str, Any]:
    """The per-layer table: metric columns present in any row; a failing row's reasons under its name."""
    present = [c for c in METRIC_COLUMNS if any(row.get(c[0]) is not None for row in layers)]
    columns = [column("#", True), column("layer", title="reference name (→ MLX name), shape · dtype, and why a failing layer fails"),
               column("verdict")]
    columns += [column(label, True, tip) for _key, label, _style, tip, _words in present]
    columns += [column("NaN/Inf", True, "non-finite values: ref NaN/Inf · MLX NaN/Inf")]
    rows = []
    for i, row in enumerate(layers):
        name = str(row.get("layer", "?"))
        verdict = str(row.get("verdict", "?"))
        reasons = row.get("reasons") or ""
        if isinstance(reasons, list):
            reasons = "; ".join(map(str, reasons))
        label = name if row.get("mlx_layer") in (None, name) else f"{name} → {row['mlx_layer']}"
        layer_cell = cell(label, name, "layer", detail=reasons)
        layer_cell["meta"] = f"{_pair(row.get('shape_ref'), row.get('shape_mlx'))} · {_pair(row.get('dtype_ref'), row.get('dtype_mlx'))}"
        cells = [cell(i + 1, str(i + 1), "num"), layer_cell, cell(verdict, badge=verdict)]
        for key, _label, style, _tip, words in present:
            value = row.get(key)
            bad = verdict != "PASS" and any(w in reasons for w in words)
            tip = ""
            if key == "budget_ratio" and row.get("budget_excused"):
                tip = "excused: agrees with the reference to float32 tolerance"
            c = num_cell(value, style, bad, tip)
            if tip:
                c["text"] += " (excused)"
            cells.append(c)
        nonfinite = {k: int(row.get(k) or 0) for k in ("nan_ref", "inf_ref", "nan_mlx", "inf_mlx")}
        total = sum(nonfinite.values())
        text = "0" if total == 0 else (f"{nonfinite['nan_ref']}/{nonfinite['inf_ref']} · "
                                       f"{nonfinite['nan_mlx']}/{nonfinite['inf_mlx']}")
        cells.append(cell(text, str(total), "num bad" if total else "num"))
        classes = [c for c, on in (("fail", verdict != "PASS"), ("first", name == first)) if on]
        rows.append({"cls": " ".join(classes), "id": f"layer-{i + 1}", "cells": cells})
    return {"id": "layers", "columns": columns, "rows": rows}


# --- sections ----------------------------------------------------------------------------------

def render_section(section: dict[str, Any], number: int) -> dict[str, Any]:
    """A report section drawn by its ``kind``; a malformed one shows its data and the error, never aborts the page."""
    from parity import plots

    kind = section.get("kind")
    data = section.get("data") if isinstance(section.get("data"), dict) else {}
    passed = section.get("passed")
    title = str(section.get("title") or section.get("name") or f"section {number}")
    out = {"title": title, "anchor": f"{number}-{re.sub(r'[^A-Za-z0-9_-]', '_', str(section.get('name', '')))}",
           "status": "INFO" if passed is None else ("PASS" if passed else "FAIL"),
           "note": section.get("note") or "", "failing": section.get("failing") or "",
           "image": None, "table": None, "raw": None, "error": None}
    try:
        if kind == "curves":
            out["image"] = plots.curves_plot(data)
        elif kind == "heatmap":
            out["image"] = plots.heatmap_plot(data)
        elif kind == "table":
            out["table"] = section_table(data, section.get("failing"))
        else:
            out["error"] = f"unknown section kind {kind!r}"
        if out["image"] is None and out["table"] is None and not out["error"]:
            out["error"] = "no data"
    except Exception as err:  # noqa: BLE001 - a bad section must not take the whole report down
        out["error"] = f"{type(err).__name__}: {err}"
    if out["error"] or kind in ("curves", "heatmap"):
        raw = _json(section.get("data"))
        out["raw"] = raw if out["error"] or len(raw) <= 6000 else None
    return out


def section_table(data: dict[str, Any], failing: str | None = None) -> dict[str, Any]:
    columns = [str(c) for c in data.get("columns") or []]
    rows = data.get("rows") or []
    width = max([len(columns), *(len(r) for r in rows if isinstance(r, (list, tuple)))], default=0)
    columns += [""] * (width - len(columns))
    numeric = [any(_float(r[i]) is not None for r in rows if isinstance(r, (list, tuple)) and i < len(r))
               for i in range(width)]
    body = []
    for row in rows:
        row = list(row) if isinstance(row, (list, tuple)) else [row]
        cells = []
        for i in range(width):
            value = row[i] if i < len(row) else None
            if _float(value) is not None:
                cells.append(num_cell(value))
            else:
                cells.append(cell("–" if value is None else value, None if not numeric[i] else ""))
        hit = failing is not None and any(str(v) == str(failing) for v in row)
        verdicts = [str(v).upper() for v in row]
        body.append({"cls": "fail" if hit or "FAIL" in verdicts else "", "id": "", "cells": cells})
    return {"id": "", "columns": [column(c, numeric[i]) for i, c in enumerate(columns)], "rows": body}


# --- tensor images -----------------------------------------------------------------------------

def _load_dump(path: Path) -> np.ndarray:
    if path.is_file() and path.stat().st_size > MMAP_BYTES:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"dump {path} is not a valid .npy file: {err}") from None
    return load_npy(path)


def _dump_path(report_dir: Path, manifest: dict[str, Any], side: str, layer: str) -> Path:
    files = ((manifest.get("sides") or {}).get(side) or {}).get("files") or {}
    relative = files.get(layer) or f"{side}/{layer_file(layer)}"
    path = (report_dir / relative).resolve()
    if report_dir.resolve() not in path.parents:
        raise ValueError(f"manifest points {side} dump of {layer!r} outside the report: {relative}")
    return path


def tensor_views(report_dir: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Images of the first diverging layer and of the worst layer (one if they are the same)."""
    from parity import plots

    rows = {str(r.get("layer")): r for r in report.get("layers") or []}
    wanted: list[tuple[str, str]] = []
    first = report.get("first_divergence")
    if first in rows:
        wanted.append(("First divergence", first))
    worst = (report.get("worst") or {}).get("layer")
    which = "lowest cosine among failing layers" if rows.get(worst, {}).get("verdict") == "FAIL" else "lowest cosine"
    if worst in rows and worst != first:
        wanted.append((f"Worst layer ({which})", worst))
    elif worst in rows:
        wanted[0] = (f"First divergence, also the worst layer ({which})", worst)
    try:
        manifest = load_json(report_dir / "manifest.json", "manifest")
    except ValueError:
        manifest = {}
    views = []
    for heading, layer in wanted:
        row = rows[layer]
        view = {"heading": heading, "layer": layer, "note": "", "caption": "", "image": None, "truth_image": None}
        views.append(view)
        try:
            ref = _load_dump(_dump_path(report_dir, manifest, "ref", layer))
            ours = _load_dump(_dump_path(report_dir, manifest, "mlx", str(row.get("mlx_layer") or layer)))
        except ValueError as err:
            view["note"] = f"No tensor image: {err}."
            continue
        if ref.shape != ours.shape:
            view["note"] = f"No image: shapes differ (reference {list(ref.shape)}, MLX {list(ours.shape)})."
            continue
        truth = None
        truth_path = _dump_path(report_dir, manifest, "truth", layer)
        if truth_path.is_file():
            try:
                truth = _load_dump(truth_path)
            except ValueError as err:
                view["note"] = f"Float64 truth not shown: {err}."
        try:
            view["image"], view["caption"], view["truth_image"] = plots.side_by_side(ref, ours, truth)
        except Exception as err:  # noqa: BLE001 - an odd tensor must not take the page down
            view["note"] = f"Could not draw this tensor: {type(err).__name__}: {err}."
    return views


# --- the run report ------------------------------------------------------------------------------

def _budget_limit(report: dict[str, Any]) -> float | None:
    try:
        from parity import thresholds

        return thresholds.load().for_component(str(report.get("component")), str(report.get("dtype"))).budget_ratio
    except Exception:  # noqa: BLE001 - only decorates a plot
        return None


def render_report(report_dir: str | Path, index_link: str | None = None) -> str:
    """The HTML page of one component report directory."""
    from parity import plots

    report_dir = Path(report_dir)
    report = load_report(report_dir)
    layers = [r for r in report.get("layers") or [] if isinstance(r, dict)]
    first = report.get("first_divergence")
    names = [str(r.get("layer")) for r in layers]
    first_info = None
    if first:
        index = names.index(first) if first in names else None
        reasons = layers[index].get("reasons") if index is not None else ""
        anchor = f"layer-{index + 1}" if index is not None else "sections"
        first_info = {"layer": first, "index": index, "reasons": reasons, "anchor": anchor}
    summary = report.get("summary") or {}
    raw_sections = [s for s in report.get("sections") or [] if isinstance(s, dict)]
    sections = [render_section(s, i + 1) for i, s in enumerate(raw_sections)]
    if first_info and first_info["index"] is None:  # a section failed first: point at it
        for raw, shown in zip(raw_sections, sections):
            if raw.get("passed") is False and first in (raw.get("failing"), f"section:{raw.get('name')}"):
                first_info.update(anchor=f"section-{shown['anchor']}", reasons=f"{shown['title']}: {shown['note']}".rstrip(": "))
                break
    cosines = [(r["cosine"], str(r.get("layer"))) for r in layers
               if _float(r.get("cosine")) is not None and math.isfinite(r["cosine"])]
    lowest = min(cosines, default=(summary.get("worst_cosine"), ""))
    failed = sum(r.get("verdict") != "PASS" for r in layers)
    cards = [
        {"label": "failing layers", "value": f"{failed} / {len(layers)}", "bad": failed > 0},
        {"label": "lowest cosine" + (f" ({lowest[1]})" if lowest[1] else ""), "value": fmt(lowest[0], "cos"),
         "bad": any(r.get("verdict") == "FAIL" and str(r.get("layer")) == lowest[1] for r in layers)},
        {"label": "max abs error", "value": fmt(summary.get("max_abs")), "bad": False},
    ]
    limit = _budget_limit(report)
    if summary.get("max_budget_ratio") is not None:
        ratio = _float(summary.get("max_budget_ratio"))
        over = any(r.get("verdict") == "FAIL" and "precision budget" in str(r.get("reasons") or "") for r in layers)
        cards.append({"label": "max budget ratio" + (f" (limit {limit:g})" if limit else ""),
                      "value": fmt(ratio), "bad": over})
    if sections:
        bad = sum(s["status"] == "FAIL" for s in sections)
        cards.append({"label": "failing sections", "value": f"{bad} / {len(sections)}", "bad": bad > 0})
    versions = report.get("versions") or {}
    commit = report.get("git_commit")
    meta = [("component", report.get("component")), ("dtype", report.get("dtype")),
            ("run", report.get("run_id") or report_dir.parent.name), ("seed", report.get("seed")),
            ("weights", report.get("weights", "–")), ("git commit", commit or "unknown"),
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform") or "–"),
            ("platform", versions.get("platform", "–")),
            ("duration", f"{report['seconds']} s" if report.get("seconds") is not None else "–"),
            ("report folder", report.get("report_dir") or str(report_dir))]
    files = [(name, name) for name in ("report.json", "report.csv", "manifest.json") if (report_dir / name).is_file()]
    html = _env().get_template("report.html.j2").render(
        r={"component": report.get("component", "?"), "dtype": report.get("dtype", "?"),
           "verdict": report.get("verdict", "UNKNOWN")},
        first=first_info, passed_layers=len(layers) - failed, total_layers=len(layers), cards=cards,
        meta=[(k, "–" if v is None else v) for k, v in meta],
        config_json=_json(report.get("config")), versions_json=_json(versions),
        depth_plot=plots.depth_plot(layers, first, limit) if layers else None,
        layer_table=layer_table(layers, first), sections=sections, slices=tensor_views(report_dir, report),
        index_link=index_link, generated=_now(), source=str(report_dir), files=files)
    return html


def write_html_report(report_dir: str | Path, index_link: str | None = None) -> Path:
    """Write ``report.html`` into one component report directory; returns its path."""
    report_dir = Path(report_dir)
    if index_link is None and (report_dir.parent.parent / INDEX_NAME).is_file():
        index_link = f"../../{INDEX_NAME}"
    path = report_dir / HTML_NAME
    write_text(path, render_report(report_dir, index_link))
    return path


def find_report_dirs(path: str | Path) -> list[Path]:
    """Component report directories under ``path``: itself, its children (a run), or its grandchildren (a reports folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / "report.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/report.json"))
    return found or sorted(p.parent for p in path.glob("*/*/report.json"))


def write_html_reports(run_dir_or_report_dir: str | Path, stale_only: bool = False,
                       index_link: bool | None = None) -> list[Path]:
    """Write ``report.html`` for every report under a report dir, a run dir or a reports folder.

    ``stale_only`` skips reports whose ``report.html`` is newer than their ``report.json``.
    ``index_link`` True links each page to ``../../index.html`` (the reports folder's index, e.g.
    when :func:`write_index` runs next); otherwise a page links to it only if it exists already.
    Returns the pages written.
    """
    dirs = find_report_dirs(run_dir_or_report_dir)
    if not dirs:
        raise ValueError(f"no report.json under {run_dir_or_report_dir}")
    written = []
    for report_dir in dirs:
        html = report_dir / HTML_NAME
        if stale_only and html.is_file() and html.stat().st_mtime >= (report_dir / "report.json").stat().st_mtime:
            continue
        written.append(write_html_report(report_dir, f"../../{INDEX_NAME}" if index_link else None))
    return written


# --- the index of runs -------------------------------------------------------------------------

def _run_time(run_dir: Path) -> float:
    match = _RUN_TIME.match(run_dir.name)
    if match:
        try:
            return datetime.strptime(match.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            pass
    return run_dir.stat().st_mtime


def run_dirs(reports_root: str | Path) -> list[Path]:
    """Run directories (folders holding ``<component>/report.json``) in a reports folder, newest first."""
    root = Path(reports_root)
    runs = [d for d in root.iterdir() if d.is_dir() and any(d.glob("*/report.json"))] if root.is_dir() else []
    return sorted(runs, key=lambda d: (_run_time(d), d.name), reverse=True)


def latest_run(reports_root: str | Path) -> Path:
    runs = run_dirs(reports_root)
    if not runs:
        raise ValueError(f"no runs (folders with <component>/report.json) in {reports_root}")
    return runs[0]


def _when(run_dir: Path) -> str:
    return datetime.fromtimestamp(_run_time(run_dir), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def write_index(reports_root: str | Path) -> Path:
    """Write ``<reports_root>/index.html``: every run's component reports, newest first, and any bisections."""
    root = Path(reports_root)
    if not root.is_dir():
        raise FileNotFoundError(f"reports folder {root} does not exist")
    runs = run_dirs(root)
    columns = [column("run"), column("time (UTC)"), column("component"), column("dtype"), column("verdict"),
               column("layers failing", True), column("first divergence"), column("worst cosine", True),
               column("max budget ratio", True), column("commit")]
    rows = []
    for run in runs:
        first_row = len(rows)
        for report_dir in sorted(p.parent for p in run.glob("*/report.json")):
            html = report_dir / HTML_NAME
            link = html if html.is_file() else report_dir / "report.json"
            try:
                report = load_report(report_dir)
            except ValueError as err:
                rows.append({"cls": "fail", "id": "", "cells": [
                    cell(run.name, cls="mono nowrap"), cell(_when(run), cls="nowrap"),
                    cell(report_dir.name, href=_rel(link, root)), cell("–"),
                    cell("UNREADABLE", badge="FAIL"), cell("", ""), cell(str(err)), cell("", ""), cell("", ""),
                    cell("–")]})
                continue
            summary = report.get("summary") or {}
            layers = report.get("layers") or []
            failed = summary.get("failed", sum(r.get("verdict") != "PASS" for r in layers))
            verdict = str(report.get("verdict", "UNKNOWN"))
            commit = str(report.get("git_commit") or "–")
            name = cell(report.get("component", report_dir.name), href=_rel(link, root))
            name["meta"] = "" if link is html else "no HTML yet: parity report"
            rows.append({"cls": "fail" if verdict != "PASS" else "", "id": "", "cells": [
                cell(run.name, cls="mono nowrap"), cell(_when(run), cls="nowrap"),
                name,
                cell(report.get("dtype", "–")), cell(verdict, badge=verdict),
                cell(f"{failed} / {summary.get('layers', len(layers))}", str(failed), "num"),
                cell(report.get("first_divergence") or "–", cls="mono"),
                num_cell(summary.get("worst_cosine"), "cos"), num_cell(summary.get("max_budget_ratio")),
                cell(commit[:12] + ("-dirty" if commit.endswith("-dirty") else ""), cls="mono nowrap", title=commit)]})
        if len(rows) > first_row:
            rows[first_row]["cls"] = (rows[first_row]["cls"] + " run-start").strip()
    bisect_rows = []
    for path in sorted(root.glob("*/bisect.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = load_json(path, "bisect")
        except ValueError:
            continue
        html = path.parent / "bisect.html"
        first = data.get("first_bad") or {}
        bisect_rows.append({"cls": "", "id": "", "cells": [
            cell(path.parent.name, cls="mono"), cell(data.get("created", "–")),
            cell(", ".join(data.get("components") or ["all"])), cell(data.get("dtype", "–")),
            cell(str(data.get("good", ""))[:12], cls="mono"), cell(str(data.get("bad", ""))[:12], cls="mono"),
            cell(f"{str(first.get('commit', ''))[:12]} {first.get('subject', '')}".strip() or data.get("status", "–"),
                 cls="mono"),
            cell("HTML" if html.is_file() else "bisect.json", href=_rel(html if html.is_file() else path, root))]})
    html = _env().get_template("index.html.j2").render(
        root=str(root), run_count=len(runs), generated=_now(),
        runs_table={"id": "runs", "columns": columns, "rows": rows},
        bisect_table={"id": "bisections", "rows": bisect_rows, "columns": [
            column("bisection"), column("created"), column("components"), column("dtype"), column("good"),
            column("bad"), column("first bad commit"), column("report")]})
    path = root / INDEX_NAME
    write_text(path, html)
    return path


# --- command line ------------------------------------------------------------------------------

def _reports_root(path: Path, report_dirs: Iterable[Path]) -> Path:
    dirs = list(report_dirs)
    if (path / "report.json").is_file():
        return path.parent.parent
    if dirs and all(d.parent == path for d in dirs):
        return path.parent
    return path


def cmd_report(args: argparse.Namespace) -> int:
    path: Path = args.path.resolve()  # "." has no parent to find the reports folder by
    if args.latest:
        target = latest_run(path)
        root = path
    else:
        target = path
        root = _reports_root(path, find_report_dirs(path))
    whole_folder = not args.latest and target == root and not (root / "report.json").is_file()
    written = write_html_reports(target, stale_only=whole_folder and not args.force,
                                 index_link=None if args.no_index else True)
    for page in written:
        print(page)
    if not args.no_index:
        print(write_index(root))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report", help="write self-contained HTML reports and the reports index",
        description="Write report.html next to each report.json under PATH (a component report folder, a run "
                    "folder, or a reports folder) and index.html in the reports folder.")
    p.add_argument("path", type=Path, help="a report folder, a run folder, or a reports folder (e.g. reports/)")
    p.add_argument("--latest", action="store_true", help="PATH is a reports folder: only render its newest run")
    p.add_argument("--force", action="store_true",
                   help="with a whole reports folder, re-render pages that look up to date")
    p.add_argument("--no-index", action="store_true", help="do not write the reports folder's index.html")
    p.set_defaults(func=cmd_report)
