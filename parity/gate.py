"""``parity gate``: the CI check. Runs components, judges every layer, compares with baselines.

    parity gate [--component C ...] [--dtype float32|bfloat16|all] [--thresholds FILE]
                [--baselines DIR] [--require-baselines] [--junit FILE] [--out DIR]

A component run fails the gate when

- a layer fails its absolute thresholds (``parity/thresholds.toml``: defaults per dtype, per component,
  per layer glob): max abs, cosine, max rel, precision budget;
- a layer is present on one side only, shapes differ, a tensor holds NaN/Inf, a tensor is
  empty, or a layer has no metrics;
- the component compared nothing, crashed, or a report section (e.g. drift) failed;
- a layer's max_abs / rmse / budget_ratio grew past ``baseline_factor`` times its committed
  baseline (``baselines/<component>-<dtype>.json``), even within the absolute thresholds;
  the baseline is floored so a bit-exact (0) baseline does not turn rounding noise into a
  regression (see ``parity.baseline``);
- a layer recorded in the baseline is no longer compared (re-save the baseline if intended).

Shrunken errors are reported as improvements (information only). A component without a usable
baseline (no file; or recorded for another config, seed or MLX device) is gated on its absolute
thresholds alone and the gate says "no baseline"; ``--require-baselines`` makes that an error.
A gate that compared nothing never passes.

Prints a failure table (component, dtype, layer, metric, value, threshold, baseline), writes the
reports to ``<out>/<run-id>/`` with a ``gate.json`` summary, and with ``--junit`` a JUnit XML
file: one testcase per component+dtype and layer group (first ``/``-separated part of the layer
name), its failure message naming the first diverging layer.

Exit codes: 0 pass, 1 parity failure, 2 usage or input error (bad arguments, malformed
thresholds or baseline file, missing baseline with --require-baselines).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from parity import baseline as baseline_mod
from parity import junit, registry
from parity import thresholds as thresholds_mod
from parity.dumps import write_json
from parity.outcome import Finding, GateResult, Outcome
from parity.thresholds import Thresholds
from parity.vocab import UsageError, fmt

#: What the gate says of a coverage cell's run (it has no baseline by design).
COVERAGE_NOTE = "coverage cell: gated on absolute thresholds"
#: Failing checks shown per component run in the terminal table (all are in gate.json / JUnit).
MAX_ROWS = 10
#: How a recorded failure's limit reads, by metric.
_AT_LEAST = ("cosine", "sample_cosine")
_EQUAL = ("presence", "shape", "truth", "sample")


def _threshold(failure: dict[str, Any]) -> str:
    metric, limit = failure.get("metric", ""), failure.get("limit")
    op = ">=" if metric in _AT_LEAST or metric == "numel" else "==" if metric in _EQUAL else "<="
    return f"{op} {fmt(limit)}"


def recorded(component: str, dtype: str, row: dict[str, Any], base: dict[str, Any] | None) -> list[Finding]:
    """The failures the run recorded for a report row (the one verdict), as findings."""
    base = base or {}
    findings = [Finding(component, dtype, row["layer"], f.get("metric", "verdict"), f.get("value"), _threshold(f),
                        base.get(f.get("metric")), f.get("kind", "absolute"), f.get("message", ""))
                for f in row.get("failures") or []]
    if not findings and row.get("verdict") == "FAIL":
        findings.append(Finding(component, dtype, row["layer"], "verdict", "FAIL", "== PASS", kind="absolute",
                                message=row.get("reasons") or "the run judged this layer FAIL"))
    return findings


def evaluate(report: dict[str, Any], limits: Thresholds, baseline: baseline_mod.Baseline | None = None,
             device: str | None = None, no_baseline: str | None = None) -> Outcome:
    """Judge one run's report (the ``report.json`` contract) against thresholds and its baseline.

    The report's own verdict is honoured too: the gate is never more lenient than the run.
    ``device`` is the MLX device of the run (a baseline from another device is not used);
    ``no_baseline`` says why there is no baseline, for the notes.
    """
    component, dtype = report.get("variant") or report["component"], report["dtype"]
    lineage = report.get("lineage") or [report["component"]]
    rows = [r for r in report.get("layers") or [] if r.get("verdict") != "EXCLUDED"]
    out = Outcome(component, dtype, [r["layer"] for r in rows], report_dir=report.get("report_dir"),
                  seconds=report.get("seconds"))
    if baseline is not None:
        reason = baseline.mismatch(report.get("config", {}), report.get("seed", 0), device)
        if reason:
            no_baseline, baseline = f"{baseline_mod.shown(baseline.path)} {reason}", None
        else:
            out.baseline_path = baseline_mod.shown(baseline.path)
    if baseline is None and no_baseline == COVERAGE_NOTE:
        out.notes.append(COVERAGE_NOTE)
    elif baseline is None:
        out.notes.append(f"no baseline ({no_baseline or 'none given'}): gated on absolute thresholds only")

    crash = report.get("crash")
    if crash:
        out.failures.append(Finding(component, dtype, "(run)", "crash", crash.get("error"), "completes", kind="error",
                                    message=f"the {crash.get('side')} forward raised after "
                                            f"{crash.get('after') or 'no layer'}: {crash.get('error')}"))
    if not rows:
        out.failures.append(Finding(component, dtype, "(none)", "layers", 0, ">= 1", kind="structure",
                                    message="nothing compared: the component captured no layers"))
    new_layers = []
    for row in rows:
        tol = limits.for_layer(lineage, dtype, row["layer"])
        base = baseline.layers.get(row["layer"]) if baseline else None
        found = recorded(component, dtype, row, base)
        if found:
            out.failures.extend(found)
            continue
        if baseline is None or tol.baseline_factor is None:
            continue
        if base is None:
            new_layers.append(row["layer"])
            continue
        for change in baseline_mod.check_layer(row, base, tol.baseline_factor):
            against = f"{tol.baseline_factor:g}x {'floor' if change.floored else 'baseline'}"
            if change.regressed:
                out.failures.append(Finding(
                    component, dtype, row["layer"], change.metric, change.value, f"<= {fmt(change.limit)} ({against})",
                    change.baseline, "baseline",
                    f"{change.metric} {fmt(change.value)} regressed past {against} {fmt(change.limit)} "
                    f"(baseline {fmt(change.baseline)}), within absolute thresholds"))
            elif change.improved:
                out.improvements.append(Finding(
                    component, dtype, row["layer"], change.metric, change.value, f"< {fmt(change.baseline / tol.baseline_factor)}",
                    change.baseline, "baseline", f"{change.metric} improved {fmt(change.baseline)} -> {fmt(change.value)}"))
    for section in report.get("sections") or []:
        if section.get("passed") is False:
            out.failures.append(Finding(component, dtype, section.get("failing") or f"section:{section.get('name')}",
                                        "section", section.get("name"), "passed", kind="absolute",
                                        message=f"{section.get('title', section.get('name'))} failed {section.get('note', '')}".rstrip()))
    if baseline is not None:
        compared = set(out.layers)
        for layer in baseline.layers:
            if layer not in compared:
                out.failures.append(Finding(component, dtype, layer, "presence", "not compared", "compared", "recorded",
                                            "baseline", "recorded in the baseline but no longer compared "
                                            "(re-save the baseline if the layer was renamed or removed)"))
        if new_layers:
            out.notes.append(f"{len(new_layers)} layer(s) not in the baseline (absolute thresholds only): "
                             + ", ".join(new_layers[:5]) + (" ..." if len(new_layers) > 5 else ""))
    if report.get("verdict") != "PASS" and not out.failures:
        out.failures.append(Finding(component, dtype, report.get("first_divergence") or "(run)", "verdict",
                                    report.get("verdict"), "PASS", message="the run's verdict is not PASS"))
    return out


def crashed(component: str, dtype: str, error: BaseException) -> Outcome:
    """A component run that raised before it could write a report."""
    message = f"{type(error).__name__}: {error}"
    return Outcome(component, dtype, error=message, failures=[
        Finding(component, dtype, "(run)", "run", "crashed", "completes", kind="error", message=message)])


# --- output ------------------------------------------------------------------------------------

COLUMNS = ("component", "dtype", "layer", "metric", "value", "threshold", "baseline")


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _cells(f: Finding) -> list[str]:
    return [f.component, f.dtype, f.layer, f.metric, fmt(f.value), f.threshold, fmt(f.baseline)]


def failure_table(outcomes: Sequence[Outcome], max_rows: int = MAX_ROWS) -> list[str]:
    """The compact table of failed checks (at most ``max_rows`` per component run)."""
    rows, more = [list(COLUMNS)], []
    for outcome in outcomes:
        rows.extend(_cells(f) for f in outcome.failures[:max_rows])
        if len(outcome.failures) > max_rows:
            more.append(f"  ... {len(outcome.failures) - max_rows} more failed checks in {outcome.component} "
                        f"{outcome.dtype} (see {outcome.report_dir or 'gate.json'})")
    return _table(rows) + more if len(rows) > 1 else []


def summary(result: GateResult, max_rows: int = MAX_ROWS) -> str:
    lines = []
    table = failure_table(result.outcomes, max_rows)
    if table:
        lines += ["", "FAILED CHECKS", *table]
    improvements = [f for o in result.outcomes for f in o.improvements]
    if improvements:
        lines += ["", "improvements (information only; `parity baseline save` to lock them in)",
                  *_table([["component", "dtype", "layer", "metric", "value", "baseline"]]
                          + [_cells(f)[:5] + [fmt(f.baseline)] for f in improvements])]
    notes = [f"  {o.component} {o.dtype}: {n}" for o in result.outcomes for n in o.notes]
    if notes:
        lines += ["", "notes", *notes]
    failed = [o for o in result.outcomes if not o.passed]
    n = len(result.outcomes)
    lines.append("")
    if not result.outcomes:
        lines.append("gate FAIL: nothing was compared")
    elif failed:
        lines.append(f"gate FAIL: {len(failed)}/{n} component runs fail")
        for o in failed:
            lines.append(f"  FAIL {o.component} {o.dtype}: first divergence {o.first_divergence} "
                         f"({o.failures[0].message})")
    else:
        cells = sum(COVERAGE_NOTE in o.notes for o in result.outcomes)
        with_baseline = sum(o.baseline_path is not None for o in result.outcomes)
        lines.append(f"gate PASS: {n}/{n} component runs pass "
                     f"({sum(len(o.layers) for o in result.outcomes)} layers; baselines for {with_baseline}/{n - cells}"
                     + (f"; {cells} coverage cells" if cells else "") + ")")
    lines.append(f"gate wall time {result.seconds:.1f}s" + (f"; reports in {result.run_dir}" if result.run_dir else ""))
    return "\n".join(lines)


def to_json(result: GateResult) -> dict[str, Any]:
    return {
        "verdict": "PASS" if result.passed else "FAIL",
        "seconds": round(result.seconds, 3),
        "outcomes": [{**asdict(o), "passed": o.passed, "first_divergence": o.first_divergence} for o in result.outcomes],
    }


# --- running -----------------------------------------------------------------------------------

def run_gate(
    components: Sequence[str] | None = None,
    dtypes: Iterable[str] = ("float32",),
    thresholds: Thresholds | None = None,
    baselines_dir: str | Path = baseline_mod.DEFAULT_DIR,
    junit_path: str | Path | None = None,
    out: str | Path = "reports",
    require_baselines: bool = False,
    max_rows: int = MAX_ROWS,
    progress: Any = None,
    coverage: bool = True,
) -> GateResult:
    """Run the gate: every component run judged (one verdict), then checked against its baseline;
    with ``coverage``, each component's coverage cells too (float32, absolute thresholds: a cell
    has no baseline).

    Input errors (unknown component, malformed thresholds or baseline file, missing baseline with
    ``require_baselines``) raise before anything runs; ``result.exit_code`` is 0 or 1.
    """
    from parity.runner import run_many, variant

    started = time.perf_counter()
    names = registry.select(list(components or []))
    dtypes = list(dtypes)
    limits = thresholds or thresholds_mod.load()
    limits.check_components(registry.available())
    for name in names:
        for dtype in dtypes:
            limits.for_component(registry.get(name).lineage(), dtype)  # a dtype without defaults: an input error

    device = baseline_mod.mlx_device()
    baselines: dict[tuple[str, str], baseline_mod.Baseline] = {}
    missing: dict[tuple[str, str], str] = {}
    for name in names:
        config = registry.get(name).load_config().to_dict()
        for dtype in dtypes:
            found = baseline_mod.find(baselines_dir, name, dtype)
            path = baseline_mod.shown(baseline_mod.path_for(baselines_dir, name, dtype))
            if found is None:
                missing[name, dtype] = f"{path} does not exist"
            elif reason := found.mismatch(config, 0, device):
                missing[name, dtype] = f"{path} {reason}"
            else:
                baselines[name, dtype] = found
    if require_baselines and missing:
        raise UsageError("--require-baselines: no usable baseline for "
                         + "; ".join(f"{n} {d} ({why})" for (n, d), why in missing.items())
                         + ". Record them with `parity baseline save`.")

    errors: dict[tuple[str, str], Exception] = {}
    results = run_many(names, dtypes, out_dir=out, thresholds=limits, progress=progress, coverage=coverage,
                       on_error=lambda n, d, e: errors.__setitem__((n, d), e)) if names else []
    by_key = {(r.report["variant"], r.comparison.dtype): r for r in results}
    outcomes = []
    for name in names:
        runs = [(name, dtype, missing.get((name, dtype))) for dtype in dtypes]
        runs += [(variant(registry.get(name), cell), "float32", COVERAGE_NOTE)
                 for cell in (registry.get(name).coverage if coverage else ())]
        for run, dtype, no_baseline in runs:
            if (run, dtype) in by_key:
                outcomes.append(evaluate(by_key[run, dtype].report, limits, baselines.get((run, dtype)), device,
                                         no_baseline))
            else:
                outcomes.append(crashed(run, dtype, errors.get((run, dtype), RuntimeError("no result"))))
    run_dir = Path(results[0].report_dir).parent if results and results[0].report_dir else None
    result = GateResult(outcomes, run_dir, time.perf_counter() - started)
    print(summary(result, max_rows), flush=True)
    if run_dir is not None:
        write_json(run_dir / "gate.json", to_json(result))
    if junit_path:
        junit.write(junit_path, outcomes)
        print(f"JUnit XML: {junit_path}")
    return result
