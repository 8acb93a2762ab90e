"""``parity gate``: the CI check. Runs components, judges every layer, compares with baselines.

    parity gate [--component C ...] [--dtype float32|bfloat16|all] [--thresholds FILE]
                [--baselines DIR] [--require-baselines] [--junit FILE] [--out DIR]

A component run fails the gate when

- a layer fails its absolute thresholds (``parity.toml``: defaults per dtype, per component,
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

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from parity import baseline as baseline_mod
from parity import component as registry
from parity.compare import _abs_limit
from parity.thresholds import Thresholds, Tolerance

#: Failing checks shown per component run in the terminal table (all are in gate.json / JUnit).
MAX_ROWS = 10


@dataclass
class Finding:
    """One failed check (or an improvement) of one layer."""

    component: str
    dtype: str
    layer: str
    metric: str
    value: Any
    threshold: str  # human-readable limit, e.g. "<= 5.3e-05" or ">= 0.99999"
    baseline: Any = None
    kind: str = "absolute"  # absolute | baseline | structure | error
    message: str = ""


@dataclass
class Outcome:
    """The gate's verdict on one component in one dtype."""

    component: str
    dtype: str
    layers: list[str] = field(default_factory=list)
    failures: list[Finding] = field(default_factory=list)
    improvements: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report_dir: str | None = None
    seconds: float | None = None
    baseline_path: str | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures and self.error is None

    @property
    def first_divergence(self) -> str | None:
        return self.failures[0].layer if self.failures else None


@dataclass
class GateResult:
    outcomes: list[Outcome]
    run_dir: Path | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


# --- judging one report -------------------------------------------------------------------------

def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        return f"{value:.6f}" if 0.01 <= abs(value) <= 1 else f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return str(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _absolute(component: str, dtype: str, row: dict[str, Any], tol: Tolerance,
              base: dict[str, Any] | None) -> list[Finding]:
    """Failed absolute checks of one report row (structure first: those make metrics meaningless)."""
    base = base or {}

    def finding(metric: str, value: Any, threshold: str, message: str, kind: str = "absolute") -> Finding:
        return Finding(component, dtype, row["layer"], metric, value, threshold, base.get(metric), kind, message)

    found = []
    reasons = [r for r in (row.get("reasons") or "").split("; ") if r]
    for reason in reasons:
        if reason.startswith("missing on the"):
            found.append(finding("presence", "missing", "present", reason, "structure"))
    shape_ref, shape_mlx = row.get("shape_ref"), row.get("shape_mlx")
    if shape_ref is not None and shape_mlx is not None and list(shape_ref) != list(shape_mlx):
        found.append(finding("shape", fmt(shape_mlx), f"== {fmt(shape_ref)}",
                             f"shape mismatch: reference {fmt(shape_ref)} vs MLX {fmt(shape_mlx)}", "structure"))
    if found:
        return found
    if row.get("numel") == 0:
        return [finding("numel", 0, ">= 1", "empty tensor: nothing compared", "structure")]
    if not _number(row.get("cosine")) and not _number(row.get("max_abs")):
        return [finding("metrics", "none", "present", "no metrics: the layer was not compared", "structure")]
    counts = {k: int(row.get(k) or 0) for k in ("nan_ref", "inf_ref", "nan_mlx", "inf_mlx")}
    if any(counts.values()):
        text = (f"reference {counts['nan_ref']} NaN / {counts['inf_ref']} Inf, "
                f"MLX {counts['nan_mlx']} NaN / {counts['inf_mlx']} Inf")
        found.append(finding("nan/inf", sum(counts.values()), "== 0", text))
    for metric in ("max_abs", "rmse", "cosine"):
        value = row.get(metric)
        if _number(value) and math.isnan(value) and not any(counts.values()):
            found.append(finding(metric, value, "finite", f"{metric} is NaN"))
    max_abs = row.get("max_abs")
    if (tol.atol is not None or tol.rtol is not None) and _number(max_abs):
        limit = _abs_limit({"ref_max_abs": row.get("ref_max_abs") or 0.0}, tol)
        if not max_abs <= limit:
            found.append(finding("max_abs", max_abs, f"<= {fmt(limit)}",
                                 f"max abs {fmt(max_abs)} > {fmt(limit)} (atol + rtol * max|ref|)"))
    cosine = row.get("cosine")
    if tol.cosine_min is not None and _number(cosine) and not cosine >= tol.cosine_min:
        found.append(finding("cosine", cosine, f">= {tol.cosine_min:g}", f"cosine {cosine:.6f} < {tol.cosine_min:g}"))
    max_rel = row.get("max_rel")
    if tol.max_rel is not None and _number(max_rel) and not max_rel <= tol.max_rel:
        found.append(finding("max_rel", max_rel, f"<= {tol.max_rel:g}", f"max rel {fmt(max_rel)} > {tol.max_rel:g}"))
    ratio = row.get("budget_ratio")
    if (tol.budget_ratio is not None and _number(ratio) and not row.get("budget_excused")
            and not ratio <= tol.budget_ratio):
        found.append(finding("budget_ratio", ratio, f"<= {tol.budget_ratio:g}",
                             f"precision budget {fmt(ratio)} > {tol.budget_ratio:g} (our error vs float64 truth "
                             f"over the reference's)"))
    for reason in reasons:
        if "float64 truth" in reason:
            found.append(finding("truth", "missing", "present", reason, "structure"))
    return found


def evaluate(report: dict[str, Any], limits: Thresholds, baseline: baseline_mod.Baseline | None = None,
             device: str | None = None, no_baseline: str | None = None) -> Outcome:
    """Judge one run's report (the ``report.json`` contract) against thresholds and its baseline.

    The report's own verdict is honoured too: the gate is never more lenient than the run.
    ``device`` is the MLX device of the run (a baseline from another device is not used);
    ``no_baseline`` says why there is no baseline, for the notes.
    """
    component, dtype = report["component"], report["dtype"]
    rows = report.get("layers") or []
    out = Outcome(component, dtype, [r["layer"] for r in rows], report_dir=report.get("report_dir"),
                  seconds=report.get("seconds"))
    if baseline is not None:
        reason = baseline.mismatch(report.get("config", {}), report.get("seed", 0), device)
        if reason:
            no_baseline, baseline = f"{baseline_mod.shown(baseline.path)} {reason}", None
        else:
            out.baseline_path = baseline_mod.shown(baseline.path)
    if baseline is None:
        out.notes.append(f"no baseline ({no_baseline or 'none given'}): gated on absolute thresholds only")

    if not rows:
        out.failures.append(Finding(component, dtype, "(none)", "layers", 0, ">= 1", kind="structure",
                                    message="nothing compared: the component captured no layers"))
    new_layers = []
    for row in rows:
        tol = limits.for_layer(component, dtype, row["layer"])
        base = baseline.layers.get(row["layer"]) if baseline else None
        found = _absolute(component, dtype, row, tol, base)
        if not found and row.get("verdict") == "FAIL":
            found = [Finding(component, dtype, row["layer"], "verdict", "FAIL", "PASS", kind="absolute",
                             message=row.get("reasons") or "the run judged this layer FAIL")]
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
        with_baseline = sum(o.baseline_path is not None for o in result.outcomes)
        lines.append(f"gate PASS: {n}/{n} component runs pass "
                     f"({sum(len(o.layers) for o in result.outcomes)} layers; baselines for {with_baseline}/{n})")
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
    thresholds_path: str | Path | None = None,
    baselines_dir: str | Path = baseline_mod.DEFAULT_DIR,
    junit: str | Path | None = None,
    out: str | Path = "reports",
    require_baselines: bool = False,
    max_rows: int = MAX_ROWS,
) -> GateResult:
    """Run the gate; the Python entry point behind ``parity gate``.

    Input errors (unknown component, malformed thresholds or baseline file, missing baseline with
    ``require_baselines``) raise before anything runs; ``result.exit_code`` is 0 or 1.
    """
    from parity import cli
    from parity import thresholds as thresholds_mod
    from parity.dumps import write_json
    from parity.runner import run_many

    started = time.perf_counter()
    names = cli._components(list(components or []))
    dtypes = list(dtypes)
    limits = thresholds_mod.load(thresholds_path, known_components=registry.available())
    for name in names:
        for dtype in dtypes:
            limits.for_component(name, dtype)  # a dtype without defaults is an input error, not a crash

    device = baseline_mod.mlx_device()
    baselines: dict[tuple[str, str], baseline_mod.Baseline] = {}
    missing: dict[tuple[str, str], str] = {}
    for name in names:
        config = registry.get(name).load_config()
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
        raise cli.UsageError("--require-baselines: no usable baseline for "
                             + "; ".join(f"{n} {d} ({why})" for (n, d), why in missing.items())
                             + ". Record them with `parity baseline save`.")

    errors: dict[tuple[str, str], Exception] = {}
    results = run_many(names, dtypes, out_dir=out, thresholds=limits,
                       on_error=lambda n, d, e: errors.__setitem__((n, d), e)) if names else []
    by_key = {(r.comparison.component, r.comparison.dtype): r for r in results}
    outcomes = []
    for name in names:
        for dtype in dtypes:
            if (name, dtype) in by_key:
                outcomes.append(evaluate(by_key[name, dtype].report, limits, baselines.get((name, dtype)), device,
                                         missing.get((name, dtype))))
            else:
                outcomes.append(crashed(name, dtype, errors.get((name, dtype), RuntimeError("no result"))))
    run_dir = Path(results[0].report_dir).parent if results and results[0].report_dir else None
    result = GateResult(outcomes, run_dir, time.perf_counter() - started)
    print(summary(result, max_rows), flush=True)
    if run_dir is not None:
        write_json(run_dir / "gate.json", to_json(result))
    if junit:
        from parity import junit as junit_mod

        junit_mod.write(junit, outcomes)
        print(f"JUnit XML: {junit}")
    return result


def cmd_gate(args: argparse.Namespace) -> int:
    from parity import cli

    result = run_gate(args.component, cli._dtypes(args.dtype), args.thresholds, args.baselines, args.junit,
                      args.out, args.require_baselines, max_rows=args.max_rows)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``parity gate ARGS``, in-process (exit code returned)."""
    from parity import cli

    return cli.main(["gate", *(sys.argv[1:] if argv is None else argv)])


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "gate", help="CI check: run components, judge against thresholds and baselines, write JUnit",
        description=(__doc__ or "").replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--component", action="extend", nargs="+", metavar="C",
                   help="components to gate (default: all registered)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "all"],
                   help="precision (default float32)")
    p.add_argument("--thresholds", type=Path, help="thresholds file (default: the repository's parity.toml)")
    p.add_argument("--baselines", type=Path, default=baseline_mod.DEFAULT_DIR,
                   help=f"baseline folder (default {baseline_mod.DEFAULT_DIR})")
    p.add_argument("--require-baselines", action="store_true",
                   help="a component without a usable baseline is an error (exit 2) instead of a note")
    p.add_argument("--junit", type=Path, help="write JUnit XML here")
    p.add_argument("--out", type=Path, default=Path("reports"), help="where run directories go (default reports/)")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS,
                   help=f"failed checks shown per component run (default {MAX_ROWS})")
    p.set_defaults(func=cmd_gate)
    baseline_mod.register_save(subparsers)
