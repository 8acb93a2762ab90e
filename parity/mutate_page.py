"""The page of a ``parity mutate`` run (``mutations.html``): kill rate, survivors with their diffs, every mutant.

Drawn from ``mutations.json`` alone (:mod:`parity.mutate`); self-contained like every page of the
harness (inline style, no network) and escaped throughout (jinja autoescape).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from parity.dumps import write_text
from parity.html_report import _env, _now, cell, column, num_cell
from parity.vocab import fmt

#: Kill rate the harness aims at for every component (issue 18); the banner is green from here on.
TARGET = 0.9


def _where(m: dict[str, Any]) -> str:
    return f"{m['file']}:{m['line']}" + (f" ({m['function']})" if m.get("function") else "")


def _closest(m: dict[str, Any]) -> str:
    parts = []
    for run, entry in (m.get("runs") or {}).items():
        near = entry.get("closest")
        if near:
            parts.append(f"{run}: {near['layer']} {near['metric']} at {fmt(near['ratio'])} of its limit")
    return "; ".join(parts)


def _calibration(baseline: dict[str, Any]) -> str:
    """Which runs the judge used calibrated limits in (as a run does), or why not."""
    parts = []
    for run, entry in (baseline.get("runs") or {}).items():
        found = entry.get("calibration") or {}
        if "path" in found:
            parts.append(f"{run}: {found['path']} ({found['layers']} layers, {found['seeds']} seeds)")
        elif found.get("note"):
            parts.append(f"{run}: {found['note']}")
    return "; ".join(parts) or "none (global limits)"


def _killed_in(m: dict[str, Any]) -> str:
    return ", ".join(r for r, e in (m.get("runs") or {}).items() if e.get("status") == "killed")


def _table(rows: list[dict[str, Any]], columns: list[dict[str, Any]], ident: str) -> dict[str, Any]:
    return {"id": ident, "columns": columns, "rows": rows}


def mutant_tables(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The killed, crashed and equivalent mutants as tables, and the per-operator and per-source counts."""
    mutants = result.get("mutants") or []
    pick = lambda status: [m for m in mutants if m["status"] == status]  # noqa: E731
    killed = [{"cls": "", "id": "", "cells": [
        cell(m["id"], cls="mono"), cell(m["operator"]), cell(_where(m), cls="mono"), cell(m["change"], cls="mono"),
        cell(m.get("first_divergence") or "–", cls="mono", detail=m.get("failure") or ""),
        cell({True: "yes", False: f"no (first changed {m.get('first_changed')})", None: "–"}[m.get("localised")]),
        cell(_killed_in(m))]} for m in pick("killed")]
    crashed = [{"cls": "", "id": "", "cells": [
        cell(m["id"], cls="mono"), cell(m["operator"]), cell(_where(m), cls="mono"), cell(m["change"], cls="mono"),
        cell(m.get("reason") or "–")]} for m in pick("crashed")]
    equivalent = [{"cls": "", "id": "", "cells": [
        cell(m["id"], cls="mono"), cell(m["operator"]), cell(_where(m), cls="mono"), cell(m["change"], cls="mono")]}
        for m in pick("equivalent")]
    operators = []
    for name, counts in (result.get("by_operator") or {}).items():
        judged = counts["killed"] + counts["survived"]
        rate = counts["killed"] / judged if judged else None
        operators.append({"cls": "fail" if counts["survived"] else "", "id": "", "cells": [
            cell(name, cls="mono", title=(result.get("operators") or {}).get(name, "")),
            cell((result.get("operators") or {}).get(name, "")),
            *(num_cell(counts[s]) for s in ("killed", "survived", "equivalent", "crashed")),
            num_cell(None if rate is None else 100 * rate)]})
    sources = [{"cls": "", "id": "", "cells": [cell(s["file"], cls="mono"), num_cell(s["mutants"]),
                                               num_cell(s["executed"])]} for s in result.get("sources") or []]
    where = [column("mutant"), column("operator"), column("where"), column("change")]
    return {
        "killed": _table(killed, [*where, column("first divergence"),
                                  column("localised", title="the first divergence is the first layer the mutant changed"),
                                  column("killed in")], "killed"),
        "crashed": _table(crashed, [*where, column("reason")], "crashed"),
        "equivalent": _table(equivalent, where, "equivalent"),
        "operators": _table(operators, [column("operator"), column("what it does"), column("killed", True),
                                        column("survived", True), column("equivalent", True), column("crashed", True),
                                        column("kill rate %", True)], "operators"),
        "sources": _table(sources, [column("file"), column("mutants", True), column("on lines that ran", True)],
                          "sources"),
    }


def render(result: dict[str, Any]) -> str:
    counts = result.get("counts") or {}
    rate = result.get("kill_rate")
    survivors = [{**m, "where": _where(m), "closest_text": _closest(m),
                  "description": (result.get("operators") or {}).get(m["operator"], "")}
                 for m in result.get("mutants") or [] if m["status"] == "survived"]
    baseline = result.get("baseline") or {}
    rate_text = "–" if rate is None else f"{fmt(100 * rate)}%"
    cards = [{"label": "kill rate", "value": rate_text, "bad": rate is not None and rate < TARGET},
             {"label": "killed", "value": counts.get("killed", 0)},
             {"label": "survived", "value": counts.get("survived", 0), "bad": bool(counts.get("survived"))},
             {"label": "equivalent", "value": counts.get("equivalent", 0)},
             {"label": "crashed (timeouts)", "value": f"{counts.get('crashed', 0)} ({counts.get('timeouts', 0)})"},
             {"label": "run / on lines that ran / made",
              "value": f"{counts.get('run', 0)} / {counts.get('executed', 0)} / {counts.get('generated', 0)}"}]
    settings = result.get("settings") or {}
    meta = [
        ("component", result.get("component")), ("runs", ", ".join(result.get("runs") or [])),
        ("seed", result.get("seed")), ("sources found by", result.get("sources_found_by")),
        ("calibration", _calibration(baseline)),
        ("baseline", "; ".join(f"{r}: {e.get('verdict')}, {e.get('layers')} layers, {fmt(e.get('seconds'))} s"
                               for r, e in (baseline.get("runs") or {}).items())
         + ("; bit-reproducible" if baseline.get("reproducible") else
            "; NOT bit-reproducible: no mutant is called equivalent")),
        ("bounds", f"at most {settings.get('max_mutants') if settings.get('max_mutants') is not None else 'all'} "
                   f"mutants, {settings.get('jobs')} at a time ({settings.get('worker_threads')} thread(s) each), "
                   f"timeout {fmt(settings.get('timeout'))} s per mutant"),
        ("created", result.get("created")), ("duration", f"{fmt(result.get('seconds'))} s"),
        ("git commit", result.get("git_commit") or "–"),
        ("state", "interrupted: partial results" if result.get("interrupted") else
         "complete" if result.get("complete") else f"running ({counts.get('pending', 0)} pending)"),
    ]
    return _env().get_template("mutate.html.j2").render(
        r=result, rate=rate, banner="UNKNOWN" if rate is None else "PASS" if rate >= TARGET else "FAIL",
        rate_text=rate_text, target=f"{fmt(100 * TARGET)}%", counts=counts,
        cards=cards, meta=meta, survivors=survivors, tables=mutant_tables(result), generated=_now())


def write_page(path: str | Path, result: dict[str, Any]) -> Path:
    path = Path(path)
    write_text(path, render(result))
    return path
