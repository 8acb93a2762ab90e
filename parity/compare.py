"""Align two captures by layer name, compute metrics, and judge each layer.

The result lists layers in the reference's execution order; the first failing one is the
*first divergence*. A layer present on one side only, a shape mismatch, a NaN/Inf, or a
comparison with nothing in it is a failure, never a skip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from parity.capture import Capture
from parity.component import Section
from parity.metrics import precision_budget, tensor_metrics
from parity.thresholds import Thresholds, Tolerance

PASS, FAIL = "PASS", "FAIL"


@dataclass
class LayerResult:
    name: str
    mlx_name: str
    verdict: str
    reasons: list[str]
    metrics: dict[str, Any]
    shape_ref: tuple[int, ...] | None = None
    shape_mlx: tuple[int, ...] | None = None
    dtype_ref: str | None = None
    dtype_mlx: str | None = None

    def row(self) -> dict[str, Any]:
        """A flat dict for JSON/CSV reports."""
        return {
            "layer": self.name,
            "mlx_layer": self.mlx_name,
            "verdict": self.verdict,
            "reasons": "; ".join(self.reasons),
            "shape_ref": list(self.shape_ref) if self.shape_ref is not None else None,
            "shape_mlx": list(self.shape_mlx) if self.shape_mlx is not None else None,
            "dtype_ref": self.dtype_ref,
            "dtype_mlx": self.dtype_mlx,
            **self.metrics,
        }


@dataclass
class Comparison:
    component: str
    dtype: str
    layers: list[LayerResult]
    sections: list[Section] = field(default_factory=list)

    @property
    def first_divergence(self) -> str | None:
        for layer in self.layers:
            if layer.verdict == FAIL:
                return layer.name
        for section in self.sections:
            if section.passed is False:
                return section.failing or f"section:{section.name}"
        return None

    @property
    def verdict(self) -> str:
        if not self.layers:
            return FAIL  # a comparison of nothing must never pass
        return FAIL if self.first_divergence is not None else PASS

    @property
    def worst(self) -> LayerResult | None:
        """The layer with the lowest cosine (failing layers first)."""
        compared = [l for l in self.layers if "cosine" in l.metrics]
        if not compared:
            return None
        return min(compared, key=lambda l: (l.verdict == PASS, _finite(l.metrics["cosine"])))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def compare(
    component: str,
    dtype: str,
    ref: Capture,
    mlx: Capture,
    thresholds: Thresholds,
    alignment: dict[str, str] | None = None,
    truth: Capture | None = None,
    judged: Mapping[str, LayerResult] | None = None,
) -> Comparison:
    """Compare every reference layer with its aligned MLX layer (``alignment``: ref -> mlx name).

    ``judged`` holds results already computed for some reference layers (streaming runs judge
    each layer as its MLX tensor arrives, see ``parity.streaming``); those are used as they are.
    """
    alignment = alignment or {}
    judged = judged or {}
    layers = []
    matched_mlx = set()
    for name in ref.order:
        mlx_name = alignment.get(name, name)
        if mlx_name not in mlx:
            layers.append(LayerResult(name, mlx_name, FAIL, ["missing on the MLX side"], {},
                                      ref.shapes[name], None, ref.dtypes[name], None))
            continue
        matched_mlx.add(mlx_name)
        if name in judged:
            layers.append(judged[name])
            continue
        layers.append(judge_layer(component, dtype, name, mlx_name, ref, mlx, truth, thresholds))
    for mlx_name in mlx.order:
        if mlx_name not in matched_mlx:
            layers.append(LayerResult(mlx_name, mlx_name, FAIL, ["missing on the reference side"], {},
                                      None, mlx.shapes[mlx_name], None, mlx.dtypes[mlx_name]))
    return Comparison(component, dtype, layers)


def layer_tolerances(thresholds: Thresholds, component: str, dtype: str, name: str) -> tuple[Tolerance, Tolerance | None]:
    """The tolerance of layer ``name`` in ``dtype``, and in reduced precision its float32 tolerance too."""
    tol = thresholds.for_layer(component, dtype, name)
    exact = thresholds.for_layer(component, "float32", name) if dtype != "float32" else None
    return tol, exact


def judge_layer(component: str, dtype: str, name: str, mlx_name: str, ref: Capture, mlx: Capture,
                truth: Capture | None, thresholds: Thresholds) -> LayerResult:
    """Judge reference layer ``name`` against MLX layer ``mlx_name`` (both present) with its thresholds."""
    return _judge(name, mlx_name, ref, mlx, truth, *layer_tolerances(thresholds, component, dtype, name))


def _judge(name: str, mlx_name: str, ref: Capture, mlx: Capture, truth: Capture | None, tol: Tolerance,
           exact: Tolerance | None = None) -> LayerResult:
    """Judge one layer. ``exact`` (the float32 tolerance, in reduced-precision runs) excuses the
    precision budget when we agree with the reference to float32 precision anyway: then no
    precision is lost on our side, whatever the budget ratio says (e.g. a layer the reference
    computes in float32 even in a bf16 run, where its own error against float64 is ~0)."""
    result = LayerResult(name, mlx_name, PASS, [], {}, ref.shapes[name], mlx.shapes[mlx_name],
                         ref.dtypes[name], mlx.dtypes[mlx_name])
    if result.shape_ref != result.shape_mlx:
        result.verdict = FAIL
        result.reasons.append(f"shape mismatch: reference {result.shape_ref} vs MLX {result.shape_mlx}")
        return result
    a, b = ref[name], mlx[mlx_name]
    m = tensor_metrics(a, b)
    result.metrics = m
    reasons = result.reasons
    reasons += nonfinite_reasons(m)
    if truth is not None and name not in truth:
        reasons.append("missing in the float64 truth run")
    elif truth is not None:
        m.update(precision_budget(truth[name], a, b))
        over_budget = tol.budget_ratio is not None and not m["budget_ratio"] <= tol.budget_ratio
        if over_budget and exact is not None and _within(m, exact):
            m["budget_excused"] = True  # agrees with the reference to float32 tolerance
        elif over_budget:
            reasons.append(f"precision budget {m['budget_ratio']:.3g} > {tol.budget_ratio:g} "
                           f"(our error {m['err_vs_truth']:.3g} vs reference's {m['ref_err_vs_truth']:.3g})")
    reasons += limit_reasons(m, m, tol)
    if reasons:
        result.verdict = FAIL
    return result


def nonfinite_reasons(metrics: Mapping[str, Any]) -> list[str]:
    """Why a layer with these NaN/Inf counts (``nan_ref``, ``inf_ref``, ``nan_mlx``, ``inf_mlx``) fails."""
    reasons = []
    if metrics["nan_ref"] or metrics["inf_ref"]:
        reasons.append(f"reference has {metrics['nan_ref']} NaN / {metrics['inf_ref']} Inf")
    if metrics["nan_mlx"] or metrics["inf_mlx"]:
        reasons.append(f"MLX has {metrics['nan_mlx']} NaN / {metrics['inf_mlx']} Inf")
    return reasons


def limit_reasons(values: Mapping[str, Any], metrics: dict[str, Any], tol: Tolerance, label: str = "",
                  differences: Mapping[str, float] | None = None) -> list[str]:
    """Which limits of ``tol`` the ``max_abs``, ``cosine`` and ``max_rel`` in ``values`` break.

    The abs limit (``atol + rtol * metrics["ref_max_abs"]``, set as ``metrics["abs_limit"]``)
    applies to ``max_abs`` and to each of ``differences`` (name -> |difference|) too.
    ``label`` prefixes the metric names in the messages (``"sample "``: see ``parity.streaming``).
    """
    reasons = []
    if tol.atol is not None or tol.rtol is not None:
        limit = metrics["abs_limit"] = _abs_limit(metrics, tol)
        if not values["max_abs"] <= limit:
            reasons.append(f"{label}max abs {values['max_abs']:.3g} > {limit:.3g}")
        for key, difference in (differences or {}).items():
            if not difference <= limit:
                reasons.append(f"{key} differs by {difference:.3g} > {limit:.3g}")
    if tol.cosine_min is not None and not values["cosine"] >= tol.cosine_min:
        reasons.append(f"{label}cosine {values['cosine']:.6f} < {tol.cosine_min}")
    if tol.max_rel is not None and not values["max_rel"] <= tol.max_rel:
        reasons.append(f"{label}max rel {values['max_rel']:.3g} > {tol.max_rel:g}")
    return reasons


def _abs_limit(metrics: dict[str, Any], tol: Tolerance) -> float:
    return (tol.atol or 0.0) + (tol.rtol or 0.0) * metrics["ref_max_abs"]


def _within(metrics: dict[str, Any], tol: Tolerance) -> bool:
    """max_abs <= atol + rtol * max|ref| (an allclose scaled by the tensor's magnitude)."""
    return metrics["max_abs"] <= _abs_limit(metrics, tol)
