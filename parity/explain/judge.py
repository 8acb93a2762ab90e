"""Judge a hypothesis' candidates with the one verdict, and rank the hypotheses by what they explain.

A candidate is judged as its layer was (:func:`parity.compare.judge_tensors`): against the limits
recorded for the layer (an attention map's per-head ones too), in reduced-precision runs with the
float64 prediction as the truth. A mistake of precision (``Candidate.precision``) is judged by the
rules of that precision instead (the layer's bfloat16 limits): its error against the truth must be
what a computation in that dtype costs, within the budget ratio either way (more precise than that
is no such mistake), and for ``once`` no more than one rounding (``rounding_excess``).

A hypothesis **explains** the divergence when one of its candidates passes. Ranking: explaining
hypotheses first, in catalog order (the catalog goes from specific mistakes to generic fits);
then the others by the share of the error they remove (``1 - rmse after / rmse before``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from parity.compare import PASS, LayerResult, judge_tensors
from parity.explain.evidence import Candidate, Evidence
from parity.thresholds import Tolerance
from parity.vocab import fmt


@dataclass
class Outcome:
    """One hypothesis' best candidate: its judged result, whether it explains the layer, and how much of the error it removes."""

    name: str
    description: str
    family: str
    candidate: Candidate
    result: LayerResult
    explained: bool
    share: float
    why: str = ""


def _floored(limits: Tolerance, floor: float, ref_max_abs: float) -> Tolerance:
    if not floor or limits.atol is None and limits.rtol is None:
        return limits
    return replace(limits, atol=max(limits.atol or 0.0, floor * ref_max_abs))


def judge(evidence: Evidence, candidate: Candidate) -> tuple[LayerResult, bool, str]:
    """The candidate judged (see the module docstring): ``(result, explained, why not)``."""
    with np.errstate(all="ignore"):  # a candidate may be all zeros, or huge: its metrics say so, quietly
        return _judge(evidence, candidate)


def _judge(evidence: Evidence, candidate: Candidate) -> tuple[LayerResult, bool, str]:
    ours = candidate.ours if candidate.ours is not None else evidence.ours
    ref = np.asarray(candidate.ref)
    if tuple(ref.shape) != tuple(np.shape(ours)):
        return LayerResult(evidence.layer, evidence.layer, "FAIL", [], {}), False, "shapes differ"
    if candidate.precision:
        rules = evidence.rounding
        limits = Tolerance(budget_ratio=rules.budget_ratio, rounding_excess=rules.rounding_excess if candidate.once else None)
        truth = candidate.truth if candidate.truth is not None else ref.astype(np.float64)
        result = judge_tensors(evidence.layer, evidence.layer, ref, ours, truth, limits, None, evidence.dtype_ref,
                               candidate.precision)
        ratio = result.metrics.get("budget_ratio")
        if result.verdict == PASS and ratio is not None and rules.budget_ratio and ratio < 1 / rules.budget_ratio:
            return result, False, f"more precise than {candidate.precision} arithmetic (ratio {fmt(ratio)})"
        return result, result.verdict == PASS, "; ".join(result.reasons)
    if evidence.reduced and candidate.truth is None:
        return LayerResult(evidence.layer, evidence.layer, "FAIL", [], {}), False, "no float64 prediction"
    limits = _floored(evidence.limits, candidate.floor, float(np.max(np.abs(ref))) if ref.size else 0.0)
    result = judge_tensors(evidence.layer, evidence.layer, ref, ours, candidate.truth if evidence.reduced else None,
                           limits, evidence.exact, evidence.dtype_ref, evidence.dtype_mlx, key_groups=evidence.key_groups)
    return result, result.verdict == PASS, "; ".join(result.reasons)


def share(evidence: Evidence, candidate: Candidate, result: LayerResult) -> float:
    """How much of the layer's error a candidate removes: ``1 - rmse after / rmse before``, in [0, 1]."""
    if not candidate.comparable:
        return 0.0
    before, after = evidence.row.get("rmse"), result.metrics.get("rmse")
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or not before > 0 \
            or not math.isfinite(after):
        return 0.0
    return min(1.0, max(0.0, 1.0 - after / before))


def rank(outcomes: list[Outcome], order: list[str]) -> list[Outcome]:
    """Explaining hypotheses first, in catalog ``order``; then by the share of the error removed."""
    place = {name: i for i, name in enumerate(order)}
    return sorted(outcomes, key=lambda o: (not o.explained, place.get(o.name, len(order)) if o.explained else -o.share))


def _metric(result: LayerResult | dict[str, Any], key: str) -> Any:
    metrics = result.metrics if isinstance(result, LayerResult) else result
    return metrics.get(key)


def change(evidence: Evidence, outcome: Outcome) -> str:
    """``max abs 4.7e-4 -> 2.1e-7`` (and the budget ratio in reduced precision); for a mistake of precision, the
    error in roundings of that precision."""
    result, candidate = outcome.result, outcome.candidate
    before = f"max abs {fmt(evidence.row.get('max_abs'))}"
    if candidate.precision:
        against = "the reference" if candidate.once or evidence.truth is None else "float64"
        text = f"{before}; error vs {against} = {fmt(_metric(result, 'budget_ratio'))} x one {candidate.precision} rounding"
        excess = _metric(result, "rounding_excess")
        return text + (f" (excess over one rounding {fmt(excess)})" if candidate.once and excess is not None else "")
    text = f"{before} -> {fmt(_metric(result, 'max_abs'))}"
    if evidence.reduced and _metric(result, "budget_ratio") is not None:
        text += f", budget ratio {fmt(evidence.row.get('budget_ratio'))} -> {fmt(_metric(result, 'budget_ratio'))}"
    return text


def line(evidence: Evidence, outcome: Outcome) -> str:
    """One line a person reads: ``ffn/hidden: matches the reference with GELU(approximate="none") [gelu_approximation]:
    max abs 4.7e-4 -> 2.1e-7``."""
    what = f"{outcome.candidate.detail} [{outcome.name}]"
    verb = f"matches the reference with {what}" if outcome.explained else f"{what} removes {outcome.share:.0%} of the error"
    return f"{evidence.layer}: {verb}: {change(evidence, outcome)}"
