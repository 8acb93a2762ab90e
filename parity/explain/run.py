"""Explain the divergences of a run: the first diverging layer (or given layers, or every failing one).

Two ways in, one way through (:func:`explain`):

- :func:`explain_run`, inside ``run_component``: the captures, the judge and the built reference
  are at hand; the result goes into ``report.json`` as ``explanation``;
- :func:`explain_folder`, for ``parity explain RUN_DIR``: tensors from the report folder's dumps,
  limits from its rows and thresholds files, and the reference when the caller could rebuild it
  (:func:`parity.runner.rebuild`; without it reference hypotheses are skipped, with a note).

The caller hands over how to run the reference (``parity.runner.run_reference``): this package
does not import the runner, which imports it.

Advice only: nothing here changes a verdict or a stored tensor (dumps are read, arrays never
written in place), and a hypothesis that raises is reported and skipped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from parity import thresholds as thresholds_mod
from parity.alignment import apply_adapter
from parity.explain import sublayer as sublayer_mod
from parity.explain.catalog import REFERENCE, SCHEDULE, Hypothesis, hypotheses
from parity.explain.evidence import Evidence, tolerance_of
from parity.explain.judge import Outcome, change, judge, line, rank, share
from parity.vocab import SECOND_CALL, InputError

ADVICE = ("advice only: the verdict and the stored tensors are unchanged; each line names a known porting mistake "
          "that would make the reference match the port, with the error before and after")
NONE_EXPLAINS = "no known mistake explains this"
#: Hypotheses listed per layer besides those that explain it: the best partial ones, removing at least half the error.
PARTIAL, PARTIAL_SHARE = 3, 0.5


@dataclass
class Source:
    """A run's rows, tensors and reference, wherever they come from (a live run, or a report folder)."""

    component: str
    dtype: str
    rows: dict[str, dict[str, Any]]
    tensor: Callable[[str, str], np.ndarray | None]          # (side, layer) -> array or None
    thresholds: thresholds_mod.Thresholds
    lineage: list[str]
    setup: Any = None                                        # a runner Setup with the reference and inputs, or None
    run_reference: Callable[..., Any] | None = None          # parity.runner.run_reference(setup, dtype, capture, inputs)
    notes: list[str] = field(default_factory=list)

    def ours(self, layer: str) -> np.ndarray | None:
        """Our tensor of reference layer ``layer``, in the reference's layout (its row's adapter applied)."""
        row = self.rows.get(layer) or {}
        array = self.tensor("mlx", str(row.get("mlx_layer") or layer))
        if array is None or not row.get("adapter"):
            return array
        try:
            return apply_adapter(row["adapter"], np.asarray(array), tuple(row.get("shape_ref") or ()))
        except InputError:
            return array


def _reference_run(source: Source, layer: str, dtype: str) -> Callable[[Any], None] | None:
    """``run(capture)``: the component's reference in ``dtype`` on the inputs of ``layer``'s call, into a capture."""
    setup = source.setup
    if setup is None or setup.reference is None or source.run_reference is None:
        return None
    inputs = setup.component.second_inputs(setup.config, setup.seed) if layer.startswith(SECOND_CALL) else None

    def run(capture: Any) -> None:
        crash = source.run_reference(setup, dtype, capture, inputs)
        if crash is not None and not crash.error.startswith(sublayer_mod.Found.__name__):
            raise RuntimeError(f"the reference re-run failed: {crash.error}")
    return run


def _finder(source: Source, layer: str, notes: list[str]) -> Callable[[], Any]:
    prefix = SECOND_CALL if layer.startswith(SECOND_CALL) else ""

    def port(name: str) -> np.ndarray | None:
        return source.ours(prefix + name) if (prefix + name) in source.rows else None

    def find() -> Any:
        run = _reference_run(source, layer, source.dtype)
        if run is None:
            notes.append("reference hypotheses not tested: no reference to re-run (a bundle, or an unknown component)")
            return None
        try:
            found = sublayer_mod.find(run, layer.removeprefix(prefix), port)
        except Exception as err:  # noqa: BLE001 - advice must not take the run down: say why it is missing
            notes.append(f"reference hypotheses not tested: {type(err).__name__}: {err}")
            return None
        if found is None:
            notes.append(f"reference hypotheses not tested: {layer} is no module's or function's result in the "
                         "reference (a traced local or a slice)")
        return found
    return find


def _rerun(source: Source, layer: str) -> Callable[[Callable[[], Any]], tuple[np.ndarray | None, np.ndarray | None]]:
    target = layer.removeprefix(SECOND_CALL)

    def rerun(patch: Callable[[], Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
        values = []
        for dtype in (source.dtype, "float64") if source.dtype != "float32" else (source.dtype,):
            with patch():
                values.append(sublayer_mod.value(_reference_run(source, layer, dtype), target))
        return values[0], values[1] if len(values) > 1 else None
    return rerun


def evidence_for(source: Source, layer: str) -> tuple[Evidence | None, list[str]]:
    """The evidence of one layer, or None and why there is none."""
    row = source.rows[layer]
    notes: list[str] = []
    if row.get("stats_only"):
        return None, ["the layer was kept as statistics only: no tensors to test"]
    ref, ours = source.tensor("ref", layer), source.ours(layer)
    if ref is None or ours is None:
        return None, ["its tensors were not kept (keep_tensors, or a layer missing on one side)"]
    if any(row.get(k) for k in ("nan_ref", "inf_ref", "nan_mlx", "inf_mlx")):
        return None, ["it holds NaN/Inf: no hypothesis is tested on non-finite values"]
    truth = source.tensor("truth", layer) if source.dtype != "float32" else None
    lineage, name = source.lineage, layer.removeprefix(SECOND_CALL)
    exact = source.thresholds.for_layer(lineage, "float32", name) if source.dtype != "float32" else None
    # a layer that failed on its shape has no limits recorded: those of the thresholds for it
    limits = tolerance_of(row) if row.get("limits") else source.thresholds.for_layer(lineage, source.dtype, name)
    first_call = source.tensor("ref", name) if layer.startswith(SECOND_CALL) else None
    evidence = Evidence.of(layer, row, np.ascontiguousarray(ref), np.ascontiguousarray(ours),
                           np.ascontiguousarray(truth) if truth is not None else None, limits=limits,
                           exact=exact, rounding=source.thresholds.for_layer(lineage, "bfloat16", name),
                           dtype=source.dtype, first_call=first_call, notes=notes)
    evidence.find_sublayer = _finder(source, layer, evidence.notes)
    evidence.rerun = _rerun(source, layer) if _reference_run(source, layer, source.dtype) is not None else None
    return evidence, []


def _entry(evidence: Evidence, outcome: Outcome) -> dict[str, Any]:
    metrics = ("max_abs", "rmse", "cosine", "budget_ratio", "rounding_excess")
    return {"name": outcome.name, "description": outcome.description, "family": outcome.family,
            "detail": outcome.candidate.detail, "explained": outcome.explained, "share": round(outcome.share, 4),
            "before": {k: evidence.row.get(k) for k in metrics if evidence.row.get(k) is not None},
            "after": {k: outcome.result.metrics.get(k) for k in metrics if outcome.result.metrics.get(k) is not None},
            "change": change(evidence, outcome), "line": line(evidence, outcome), "why_not": outcome.why}


def _better(best: Outcome | None, new: Outcome) -> Outcome:
    return new if best is None or (new.explained, new.share) > (best.explained, best.share) else best


def _control(evidence: Evidence) -> str | None:
    """Whether the reference sublayer, unchanged, already agrees with the port on the port's inputs."""
    from parity.explain.reference import candidate

    sub = evidence.sublayer
    if sub is None:
        return None
    prefix = SECOND_CALL if evidence.layer.startswith(SECOND_CALL) else ""
    inputs = ", ".join(f"{slot} <- {prefix}{name}" for slot, name in sub.inputs.items()) or "none"
    note = f"reference sublayer: {sub.name} (the port's own tensors as its inputs: {inputs})"
    try:
        passed = judge(evidence, candidate(evidence, sub, "unchanged"))[1]
    except Exception as err:  # noqa: BLE001 - the port's inputs may not fit the reference's call
        return f"{note}; it cannot run on them unchanged: {type(err).__name__}: {err}"
    if passed:
        note += ("; unchanged on those inputs it agrees with the port: the difference comes from an input, "
                 "not from the sublayer")
    return note


def explain_layer(evidence: Evidence, catalog: Sequence[Hypothesis]) -> dict[str, Any]:
    """Test every applicable hypothesis on one layer and rank them (see :mod:`parity.explain.judge`)."""
    outcomes: list[Outcome] = []
    skipped: list[dict[str, str]] = []
    tested = 0
    for hypothesis in catalog:
        if not hypothesis.applies(evidence):
            continue
        if hypothesis.family == REFERENCE and evidence.sublayer is None or \
                hypothesis.family == SCHEDULE and evidence.rerun is None:
            continue
        best = None
        try:
            for candidate in hypothesis.test(evidence):
                result, explained, why = judge(evidence, candidate)
                best = _better(best, Outcome(hypothesis.name, hypothesis.description, hypothesis.family, candidate,
                                             result, explained, share(evidence, candidate, result), why))
                if explained:
                    break
        except Exception as err:  # noqa: BLE001 - one broken hypothesis must not stop the others
            skipped.append({"name": hypothesis.name, "error": f"{type(err).__name__}: {err}"})
            continue
        tested += 1
        if best is not None:
            outcomes.append(best)
    control = _control(evidence) if evidence.sublayer is not None else None
    ranked = rank(outcomes, [h.name for h in catalog])
    shown = [o for o in ranked if o.explained] + [o for o in ranked if not o.explained and o.share >= PARTIAL_SHARE][:PARTIAL]
    top = shown[0] if shown and shown[0].explained else None
    return {"layer": evidence.layer, "verdict": evidence.row.get("verdict"), "explained": top is not None,
            "top": top.name if top else None,
            "summary": line(evidence, top) if top else f"{evidence.layer}: {NONE_EXPLAINS}",
            "hypotheses": [_entry(evidence, o) for o in shown], "tested": tested, "skipped": skipped,
            "notes": [*evidence.notes, *([control] if control else [])]}


def explain(source: Source, layers: Sequence[str], catalog: Sequence[Hypothesis] | None = None) -> dict[str, Any]:
    """The ``explanation`` object of a report: one entry per layer asked about (see the module docstring)."""
    started = time.perf_counter()
    catalog = list(catalog) if catalog is not None else hypotheses()
    entries = []
    for layer in layers:
        if layer not in source.rows:
            entries.append({"layer": layer, "verdict": None, "explained": False, "top": None, "hypotheses": [],
                            "tested": 0, "skipped": [], "summary": f"{layer}: not a layer: nothing to test",
                            "notes": ["the divergence is a section or a crash, not a layer"]})
            continue
        if source.rows[layer].get("verdict") != "FAIL":
            entries.append({"layer": layer, "verdict": source.rows[layer].get("verdict"), "explained": False,
                            "top": None, "hypotheses": [], "tested": 0, "skipped": [],
                            "summary": f"{layer}: passes: nothing to explain", "notes": []})
            continue
        evidence, why = evidence_for(source, layer)
        if evidence is None:
            entries.append({"layer": layer, "verdict": "FAIL", "explained": False, "top": None, "hypotheses": [],
                            "tested": 0, "skipped": [], "summary": f"{layer}: {NONE_EXPLAINS} ({why[0]})", "notes": why})
            continue
        entries.append(explain_layer(evidence, catalog))
    return {"advice": ADVICE, "layers": entries, "catalog": len(catalog), "notes": source.notes,
            "seconds": round(time.perf_counter() - started, 3)}


# --- the two ways in ----------------------------------------------------------------------------------

def explain_run(setup: Any, judge_: Any, comparison: Any, context: Any, run_reference: Callable[..., Any]
                ) -> dict[str, Any] | None:
    """In ``run_component``: the first divergence of a failing run (None for a run with nothing to explain)."""
    first = comparison.first_divergence
    if first is None:
        return None
    captures = {"ref": context.ref, "mlx": context.mlx, "truth": context.truth}

    def tensor(side: str, layer: str) -> np.ndarray | None:
        capture = captures.get(side)
        return capture.tensors[layer] if capture is not None and layer in capture.tensors else None

    rows = {layer.name: layer.row() for layer in comparison.layers}
    source = Source(setup.component.name, setup.dtype, rows, tensor, judge_.thresholds, list(judge_.lineage), setup,
                    run_reference)
    return explain(source, [first])


def explain_folder(report_dir: str | Path, layers: Sequence[str] | None = None, every: bool = False,
                   rebuild: Callable[[Mapping[str, Any]], Any] | None = None,
                   run_reference: Callable[..., Any] | None = None) -> dict[str, Any]:
    """For ``parity explain``: the first divergence of a report folder (or ``layers``, or ``every`` failing one).

    ``rebuild(report)`` builds the run's reference again (a runner ``Setup``; an ``InputError`` when it cannot),
    ``run_reference`` runs it (:func:`parity.runner.run_reference`); without them, tensor hypotheses only."""
    from parity.dumps import dump_path, load_dump
    from parity.report import load_report
    from parity.vocab import load_json

    report_dir = Path(report_dir)
    report = load_report(report_dir)
    rows = {str(r["layer"]): r for r in report["layers"]}
    unknown = [name for name in layers or () if name not in rows]
    if unknown:
        raise InputError(f"report {report_dir}: no layer {unknown[0]!r}; layers include "
                         f"{', '.join(list(rows)[:8])}{' ...' if len(rows) > 8 else ''}")
    try:
        manifest = load_json(report_dir / "manifest.json", "manifest")
    except InputError:
        manifest = {}

    def tensor(side: str, layer: str) -> np.ndarray | None:
        try:
            path = dump_path(report_dir, manifest, side, layer)
            return load_dump(path) if path.is_file() else None
        except InputError:
            return None

    notes: list[str] = []
    files = [Path(p) for p in report.get("thresholds") or []]
    try:
        limits = thresholds_mod.load(files, base=False) if files else thresholds_mod.load()
    except InputError as err:
        limits = thresholds_mod.load()
        notes.append(f"the run's thresholds files could not be read ({err}); the harness's own are used for the "
                     "other precision's limits (the layers' own limits come from their rows)")
    setup = None
    if rebuild is not None:
        try:
            setup = rebuild(report)
        except InputError as err:
            notes.append(f"the reference cannot be rebuilt ({err}): only tensor hypotheses are tested")
    source = Source(report["component"], report["dtype"], rows, tensor, limits,
                    list(report.get("lineage") or [report["component"]]), setup, run_reference, notes)
    if layers:
        asked = list(layers)
    elif every:
        asked = [name for name, row in rows.items() if row.get("verdict") == "FAIL"]
    else:
        asked = [report["first_divergence"]] if report.get("first_divergence") else []
    explanation = explain(source, asked)
    explanation["report_dir"] = str(report_dir)
    return explanation
