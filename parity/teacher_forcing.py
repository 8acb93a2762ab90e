"""Teacher forcing: the error a block (or step) adds on its own, told from the error it inherits.

Free-running, every unit after a real divergence diverges too (*inherited* error). Run on the
reference's input to it, a unit shows only its *local* error. Components judge each local
output with the layers' own rules (:func:`parity.compare.judge_tensors` with the layer's
tolerance; in bf16 against the float64 reference unit on that same input, next to the
reference's own bf16 error) and hand the results here: the first unit whose local error breaks
its limit is the **culprit**, reported apart from where the free-running error first crosses.
"""
from __future__ import annotations

import math
from typing import Sequence

from parity.compare import FAIL, PASS, LayerResult
from parity.component import Section


def relative_error(result: LayerResult | None) -> float:
    """RMSE against the reference relative to the reference's RMS (NaN when not computed)."""
    if result is None or not result.metrics or result.metrics.get("rmse") is None:
        return math.nan
    return result.metrics["rmse"] / (result.metrics.get("ref_rms") or math.nan)


def _budget(result: LayerResult | None) -> float | None:
    return result.metrics.get("budget_ratio") if result is not None else None


def _failure(label: str, result: LayerResult) -> str:
    """A local failure's reasons, led by its own layer's name when the unit's label does not say it."""
    reasons = "; ".join(result.reasons)
    return reasons if result.name == label else f"{result.name}: {reasons}"


def sections(labels: Sequence[str], local: Sequence[LayerResult], inherited: Sequence[LayerResult | None],
             diverged: Sequence[bool], dtype: str, unit: str = "block") -> list[Section]:
    """``teacher_forcing`` (curves of both errors per unit; fails with the culprit) and ``teacher_forcing_{unit}s`` (a table).

    ``local[i]``: unit i judged on the reference's input; ``inherited[i]``: its free-running output as
    judged in the comparison (None: missing); ``diverged[i]``: any of its free-running layers failed.
    """
    bf16 = dtype != "float32"
    series = {"inherited: relative error (free-running)": [relative_error(r) for r in inherited],
              "local: relative error (teacher-forced)": [relative_error(r) for r in local]}
    if bf16:
        series["inherited: budget ratio"] = [_budget(r) if _budget(r) is not None else math.nan for r in inherited]
        series["local: budget ratio"] = [_budget(r) if _budget(r) is not None else math.nan for r in local]
    culprit_index = next((i for i, r in enumerate(local) if r.verdict == FAIL), None)
    culprit = labels[culprit_index] if culprit_index is not None else None
    crossing = next((labels[i] for i, bad in enumerate(diverged) if bad), None)
    why = f" ({_failure(labels[culprit_index], local[culprit_index])})" if culprit_index is not None else ""
    note = (f"culprit (first {unit} whose own, teacher-forced error breaks its limit): {culprit or 'none'}{why}; "
            f"free-running error first crosses at: {crossing or 'none'}. Each {unit} of ours runs on the reference's "
            f"input to it and is judged against the reference's output by the layers' rules"
            + (", its error against the float64 reference on that same input next to the reference's own." if bf16 else "."))
    data = {"x": list(labels), "series": series, "xlabel": unit, "ylabel": "relative error / budget ratio", "log": True,
            "culprit": culprit, "first_free_running": crossing}
    columns = [unit, "free-running (any layer)", "teacher-forced", "inherited rel. error", "local rel. error"]
    if bf16:
        columns += ["inherited budget ratio", "local budget ratio", "local ref err vs float64"]
    columns.append("local failures")
    rows = []
    for label, lo, inh, bad in zip(labels, local, inherited, diverged):
        row = [label, FAIL if bad or inh is None else PASS, lo.verdict, relative_error(inh), relative_error(lo)]
        if bf16:
            row += [_budget(inh), _budget(lo), lo.metrics.get("ref_err_vs_truth")]
        row.append("; ".join(lo.reasons))
        rows.append(row)
    return [Section("teacher_forcing", f"Teacher forcing: local vs inherited error per {unit}", "curves", data,
                    passed=culprit is None, failing=f"teacher_forcing/{culprit}" if culprit else None, note=note,
                    culprit=culprit),
            Section(f"teacher_forcing_{unit}s", f"Teacher forcing per {unit}", "table", {"columns": columns, "rows": rows},
                    failing=culprit)]
