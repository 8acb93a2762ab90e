"""The verdict: align two captures, compute metrics, judge each layer -- the one place thresholds are applied.

Each layer yields :class:`Failure` records (kind, metric, value, limit, message); its verdict is
FAIL when it has any. The report carries the records and the limits that were applied, and the
gate and the HTML read them as they are. Layers are listed in the reference's execution order
(MLX-only layers after them); the first failing one is the *first divergence*. A layer present
on one side only, a shape mismatch, a NaN/Inf, a crash before a layer was produced, or a
comparison with nothing in it is a failure, never a skip. A layer an :class:`~parity.alignment.Alignment`
excludes is EXCLUDED, with its reason.

How a layer is judged (``parity/thresholds.toml`` holds the numbers and their reasons):

- float32: ``max_abs <= atol + rtol * max|ref|``, ``cosine >= cosine_min``, ``max_rel <= max_rel``;
- bfloat16: our RMSE against the float64 truth at most ``budget_ratio`` times the reference's own
  (:func:`parity.metrics.precision_budget`), unless we agree with the reference to the float32
  limits anyway (``budget_excused``: no precision is lost on our side); plus any limits set for it;
- a float tensor in a wider dtype than the reference's fails (float32 where the reference holds
  bfloat16: a rounding the reference makes is skipped, which no error budget can flag), unless the
  layer allows it (``allow_wider_dtype``); a narrower one is judged by the limits above;
- a tensor with NaN/Inf fails, and its metrics (computed over finite elements) are not shown as
  if they meant anything: cosine and errors are ``None`` ("not available");
- an attention map (``<attention>/probs``, :mod:`parity.attention`) also has per-head limits
  (``attn_*``); its failures name the failing heads (``Failure.heads``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from parity import attention
from parity.alignment import Alignment, apply_adapter
from parity.capture import Capture
from parity.metrics import precision_budget, tensor_metrics
from parity.stats import tensor_stats
from parity.thresholds import Thresholds, Tolerance, ThresholdsError
from parity.vocab import fmt

PASS, FAIL, EXCLUDED = "PASS", "FAIL", "EXCLUDED"
#: Metrics that mean nothing once a tensor holds NaN/Inf (they are computed over the finite elements).
FINITE_ONLY = ("cosine", "max_abs", "max_rel", "mean_abs", "rmse", "snr_db", "budget_ratio", "err_vs_truth")


@dataclass
class Failure:
    """One broken rule of one layer."""

    kind: str      # structure (missing, shape, a wider dtype, empty, no truth) | absolute (a limit, NaN/Inf, the budget)
    metric: str    # presence, shape, dtype, numel, truth, nan/inf, max_abs, cosine, max_rel, budget_ratio, sample_max_abs, ...
    value: Any
    limit: Any     # the bound or the expected value
    message: str
    heads: list[int] | None = None  # attention maps: the heads that break the limit


@dataclass
class LayerResult:
    name: str
    mlx_name: str
    verdict: str
    failures: list[Failure]
    metrics: dict[str, Any]
    shape_ref: tuple[int, ...] | None = None
    shape_mlx: tuple[int, ...] | None = None
    dtype_ref: str | None = None
    dtype_mlx: str | None = None
    limits: dict[str, float] = field(default_factory=dict)
    adapter: str | None = None
    excluded: str | None = None

    @property
    def reasons(self) -> list[str]:
        return [f.message for f in self.failures]

    def fail(self, kind: str, metric: str, value: Any, limit: Any, message: str, heads: list[int] | None = None) -> None:
        self.failures.append(Failure(kind, metric, value, limit, message, heads))
        self.verdict = FAIL

    def row(self) -> dict[str, Any]:
        """A flat dict for JSON/CSV reports."""
        row = {
            "layer": self.name,
            "mlx_layer": self.mlx_name,
            "verdict": self.verdict,
            "reasons": "; ".join(self.reasons),
            "failures": [{k: v for k, v in asdict(f).items() if v is not None or k != "heads"} for f in self.failures],
            "shape_ref": list(self.shape_ref) if self.shape_ref is not None else None,
            "shape_mlx": list(self.shape_mlx) if self.shape_mlx is not None else None,
            "dtype_ref": self.dtype_ref,
            "dtype_mlx": self.dtype_mlx,
            "limits": self.limits,
            **self.metrics,
        }
        if self.adapter:
            row["adapter"] = self.adapter
        if self.excluded:
            row["excluded"] = self.excluded
        return row


@dataclass
class Crash:
    """An exception raised inside a forward: which side, after which layer, and the traceback."""

    side: str
    error: str
    traceback: str
    after: str | None

    @property
    def label(self) -> str:
        return f"{self.side} crashed after {self.after or 'no layer'}"


@dataclass
class Comparison:
    component: str
    dtype: str
    layers: list[LayerResult]
    sections: list[Any] = field(default_factory=list)
    crash: Crash | None = None

    @property
    def first_divergence(self) -> str | None:
        for layer in self.layers:
            if layer.verdict == FAIL:
                return layer.name
        for section in self.sections:
            if section.passed is False:
                return section.failing or f"section:{section.name}"
        return self.crash.label if self.crash else None

    @property
    def culprit(self) -> str | None:
        """The first block / step whose own (teacher-forced) error breaks its limit, from the sections that say."""
        return next((section.culprit for section in self.sections if getattr(section, "culprit", None)), None)

    @property
    def verdict(self) -> str:
        if not any(layer.verdict != EXCLUDED for layer in self.layers):
            return FAIL  # a comparison of nothing must never pass
        return FAIL if self.first_divergence is not None else PASS

    @property
    def worst(self) -> LayerResult | None:
        """The layer to show first: failing layers before passing ones; among them the lowest cosine,
        then the failing layers without metrics (missing: crashed, or never produced)."""
        candidates = [l for l in self.layers if l.verdict != EXCLUDED]
        if not candidates:
            return None

        def rank(layer: LayerResult) -> tuple[bool, bool, float]:
            cosine = layer.metrics.get("cosine")
            has = isinstance(cosine, (int, float)) and math.isfinite(cosine)
            return layer.verdict != FAIL, not has, cosine if has else 0.0
        return min(candidates, key=rank)


# --- judging one layer -------------------------------------------------------------------------

def _check_limits(result: LayerResult, values: Mapping[str, Any], tol: Tolerance, ref_max_abs: float,
                  label: str = "", differences: Mapping[str, float] | None = None) -> None:
    """Fail ``result`` for each limit of ``tol`` that ``values`` (``max_abs``, ``cosine``, ``max_rel``) break.

    The abs limit (``atol + rtol * max|ref|``) applies to ``max_abs`` and to each of ``differences``
    (name -> |difference|, stats-only layers). ``label`` prefixes metric names (``sample_``).
    """
    limit = tol.abs_limit(ref_max_abs)
    if limit is not None:
        result.limits["abs_limit"] = limit
        calibrated = limit != tol.global_abs_limit(ref_max_abs)
        if calibrated:
            result.limits["calibrated"] = [*result.limits.get("calibrated", []), "abs_limit"]
        why = "calibrated on this layer's noise" if calibrated else "atol + rtol * max|ref|"
        if not values["max_abs"] <= limit:
            result.fail("absolute", f"{label}max_abs", values["max_abs"], limit,
                        f"{label.replace('_', ' ')}max abs {fmt(values['max_abs'])} > {fmt(limit)} ({why})")
        for key, difference in (differences or {}).items():
            if not difference <= limit:
                result.fail("absolute", key, difference, limit, f"{key} differs by {fmt(difference)} > {fmt(limit)}")
    if tol.cosine_min is not None and not values["cosine"] >= tol.cosine_min:
        result.fail("absolute", f"{label}cosine", values["cosine"], tol.cosine_min,
                    f"{label.replace('_', ' ')}cosine {fmt(values['cosine'], 'cos')} < {tol.cosine_min:g} "
                    f"(1 - cos = {fmt(1.0 - values['cosine'])})")
    if tol.max_rel is not None and not values["max_rel"] <= tol.max_rel:
        result.fail("absolute", f"{label}max_rel", values["max_rel"], tol.max_rel,
                    f"{label.replace('_', ' ')}max rel {fmt(values['max_rel'])} > {tol.max_rel:g}")


def _check_nonfinite(result: LayerResult, counts: Mapping[str, int]) -> bool:
    """Fail ``result`` for NaN/Inf on either side; True when there were any."""
    total = sum(int(counts[k]) for k in ("nan_ref", "inf_ref", "nan_mlx", "inf_mlx"))
    if total:
        sides = [f"{label} has {counts[f'nan_{side}']} NaN / {counts[f'inf_{side}']} Inf"
                 for side, label in (("ref", "reference"), ("mlx", "MLX")) if counts[f"nan_{side}"] or counts[f"inf_{side}"]]
        result.fail("absolute", "nan/inf", total, 0, "; ".join(sides))
    return bool(total)


def _check_budget(result: LayerResult, tol: Tolerance, exact: Tolerance | None, prefix: str = "") -> None:
    """The bf16 precision budget on the ``{prefix}budget_ratio`` metrics: over ``tol.budget_limit()`` fails,
    unless excused (we agree with the reference to the float32 limits); then, where the reference
    computes the tap exactly, more than one rounding of its value fails (``rounding_excess``)."""
    m = result.metrics
    dtypes = "" if result.dtype_ref == result.dtype_mlx else f" (ours {result.dtype_mlx}, reference {result.dtype_ref})"
    budget = tol.budget_limit()
    if budget is not None:
        result.limits["budget_ratio"] = budget
        calibrated = budget != tol.budget_ratio
        if calibrated:
            result.limits["calibrated"] = [*result.limits.get("calibrated", []), "budget_ratio"]
        ratio = m[f"{prefix}budget_ratio"]
        error = m.get(f"{prefix}max_abs", m.get("max_abs"))
        limit = exact.global_abs_limit(m.get("ref_max_abs") or 0.0) if exact is not None else None
        if ratio <= budget:
            pass
        elif limit is not None and error is not None and error <= limit:
            m[f"{prefix}budget_excused"] = True  # agrees with the reference to float32 tolerance
        else:
            rounding = m.get(f"{prefix}rounding_err")
            floor = f", floored at one {result.dtype_mlx} rounding {fmt(rounding)}" if rounding is not None else ""
            where = "on the sample " if prefix else ""
            result.fail("absolute", f"{prefix}budget_ratio", ratio, budget,
                        f"precision budget {where}{fmt(ratio)} > {fmt(budget)}{' (calibrated)' if calibrated else ''}"
                        f"{dtypes}: our error vs float64 "
                        f"{fmt(m.get(f'{prefix}err_vs_truth'))}, the reference's "
                        f"{fmt(m.get(f'{prefix}ref_err_vs_truth'))}{floor}")
    excess = m.get(f"{prefix}rounding_excess")
    if excess is not None and tol.rounding_excess is not None:
        result.limits["rounding_excess"] = tol.rounding_excess
        if not excess <= tol.rounding_excess:
            result.fail("absolute", f"{prefix}rounding_excess", excess, tol.rounding_excess,
                        f"more than one {result.dtype_mlx} rounding of a value the reference computes exactly"
                        f"{dtypes}: rmse(ours - round(reference)) is {fmt(excess)} x one rounding > "
                        f"{tol.rounding_excess:g} (computed in {result.dtype_mlx}, or rounded twice?)")


#: Per-head limits of attention maps: (tolerance key, metric, lower bound?, what it measures).
ATTENTION_RULES = (
    ("attn_js_mean", "attn_js_mean", False, "JS divergence (bits), mean query row"),
    ("attn_js_max", "attn_js_max", False, "JS divergence (bits), worst query row"),
    ("attn_topk_min", "attn_topk_overlap", True, "top-k key overlap"),
    ("attn_entropy_diff", "attn_entropy", False, "|entropy difference| (normalised)"),
    ("attn_sparsity_diff", "attn_sparsity", False, "|difference of the share of keys holding 90% of the mass|"),
    ("attn_mass_diff", "attn_mass", False, "|mass difference|"),
    ("attn_dropped", "attn_dropped", False, "reference mass on keys we give zero"),
)


def _check_attention(result: LayerResult, tol: Tolerance) -> None:
    """The per-head limits of an attention map; each failure names its heads (worst value first in the message)."""
    m = result.metrics
    for key, metric, lower, what in ATTENTION_RULES:
        limit = getattr(tol, key)
        if limit is None:
            continue
        result.limits[key] = limit
        if metric in ("attn_entropy", "attn_sparsity", "attn_mass"):
            names = [f"{metric}_{g}" for g in attention.mass_groups(m)] if metric == "attn_mass" else [metric]
            series = {name: [abs(b - a) for a, b in zip(m[f"{name}_ref"], m[f"{name}_mlx"])] for name in names}
        else:
            series = {metric: m[metric]}
        for name, values in series.items():
            heads = [h for h, v in enumerate(values) if not (v >= limit if lower else v <= limit)]
            if not heads:
                continue
            worst = (min if lower else max)(heads, key=lambda h: values[h])
            label = what if name == metric else f"{what} on {name.removeprefix('attn_mass_')} keys"
            result.fail("attention", name, values[worst], limit,
                        f"attention {label} {fmt(values[worst])} {'<' if lower else '>'} {limit:g} in head(s) "
                        f"{', '.join(map(str, heads))} (worst: head {worst})", heads)


#: Bits of the float dtypes, to tell a wider one (float16 and bfloat16 are the same width, neither wider).
FLOAT_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


def _check_dtype(result: LayerResult, tol: Tolerance) -> None:
    """Fail ``result`` when ours is a wider float dtype than the reference's, unless ``tol.allow_wider_dtype``."""
    ours, ref = FLOAT_BITS.get(result.dtype_mlx or ""), FLOAT_BITS.get(result.dtype_ref or "")
    if ours is None or ref is None or ours <= ref:
        return
    if tol.allow_wider_dtype:
        result.limits["allow_wider_dtype"] = True
        return
    result.fail("structure", "dtype", result.dtype_mlx, result.dtype_ref,
                f"dtype {result.dtype_mlx} where the reference holds {result.dtype_ref} "
                f"(a rounding the reference makes is skipped)")


def _check_structure(result: LayerResult, adapter: str | None = None) -> None:
    if result.shape_ref is not None and result.shape_mlx is not None and result.shape_ref != result.shape_mlx:
        adapted = f" after adapter {adapter!r}" if adapter else ""
        result.fail("structure", "shape", list(result.shape_mlx), list(result.shape_ref),
                    f"shape mismatch: reference {result.shape_ref} vs MLX {result.shape_mlx}{adapted}")
    elif result.shape_ref is not None and 0 in result.shape_ref:
        result.fail("structure", "numel", 0, 1, "empty tensor: nothing compared")


def apply_rules(result: LayerResult, tol: Tolerance, exact: Tolerance | None = None) -> LayerResult:
    """The verdict of one layer from its shapes and computed metrics: every rule, in one place.

    Structure (shapes, emptiness) first; then the dtype (never wider than the reference's); then NaN/Inf (whose metrics, computed over finite
    elements, become ``None``: not available); then the limits of ``tol`` and, with a float64
    truth, the precision budget. ``exact`` (reduced-precision runs: the layer's float32
    tolerance) excuses the budget when we agree with the reference to float32 limits anyway.
    """
    _check_structure(result, result.adapter)
    if result.verdict == FAIL:
        return result
    m = result.metrics
    result.limits.update({k: v for k, v in tol.applied().items() if k in ("atol", "rtol", "cosine_min", "max_rel")})
    _check_dtype(result, tol)
    if _check_nonfinite(result, m):
        for key in FINITE_ONLY:
            if key in m:
                m[key] = None  # not available: computed over finite elements only
        return result
    if m.get("stats_only"):
        differences = {key: m[f"diff_{key}"] for key in STATS_COMPARED if m.get(f"diff_{key}") is not None}
        _check_limits(result, {k: m[f"sample_{k}"] for k in ("max_abs", "cosine", "max_rel")}, tol,
                      m["ref_max_abs"], "sample_", differences)
        if "sample_budget_ratio" in m:
            _check_budget(result, tol, exact, prefix="sample_")
        return result
    for key in ("max_abs", "rmse", "cosine"):
        value = m.get(key)
        if isinstance(value, float) and math.isnan(value):
            result.fail("absolute", key, value, "finite", f"{key} is NaN")
    _check_limits(result, m, tol, m.get("ref_max_abs") or 0.0)
    if "budget_ratio" in m:
        _check_budget(result, tol, exact)
    if "attn_js_mean" in m:
        _check_attention(result, tol)
    return result


#: Statistics of stats-only layers compared side by side (each difference within the abs limit).
STATS_COMPARED = ("min", "max", "mean", "std", "rms")


def judge_tensors(name: str, mlx_name: str, ref: np.ndarray, ours: np.ndarray, truth: np.ndarray | None,
                  tol: Tolerance, exact: Tolerance | None, dtype_ref: str, dtype_mlx: str,
                  adapter: str | None = None, truth_missing: bool = False,
                  key_groups: attention.KeyGroups | None = None) -> LayerResult:
    """Judge one layer on its full tensors (``ours`` already adapted to the reference's layout).

    An attention map (4-D, finite) also gets its per-head metrics, ``key_groups`` its named key ranges.
    """
    result = LayerResult(name, mlx_name, PASS, [], {}, tuple(ref.shape), tuple(ours.shape), dtype_ref, dtype_mlx,
                         adapter=adapter)
    _check_structure(result, adapter)
    if result.verdict == FAIL:
        return result
    result.metrics = tensor_metrics(ref, ours)
    finite = not any(result.metrics[k] for k in ("nan_ref", "inf_ref", "nan_mlx", "inf_mlx"))
    if attention.is_map(name) and ref.ndim == 4 and finite:
        result.metrics.update(attention.head_metrics(ref, ours, key_groups, name))
    if truth_missing:
        result.fail("structure", "truth", "missing", "present", "missing in the float64 truth run")
    elif truth is not None and finite:
        result.metrics.update(precision_budget(truth, ref, ours, dtype_mlx))
    return apply_rules(result, tol, exact)


def judge_stats(name: str, mlx_name: str, ref_stats: Mapping[str, Any], mlx_stats: Mapping[str, Any],
                truth_stats: Mapping[str, Any] | None, tol: Tolerance, exact: Tolerance | None,
                dtype_ref: str, dtype_mlx: str, truth_missing: bool = False) -> LayerResult:
    """Judge a stats-only layer on what its statistics and sample can tell (see :mod:`parity.streaming`)."""
    result = LayerResult(name, mlx_name, PASS, [], {}, tuple(ref_stats["shape"]), tuple(mlx_stats["shape"]),
                         dtype_ref, dtype_mlx)
    _check_structure(result)
    if result.verdict == FAIL:
        return result
    ref_extent = [abs(v) for v in (ref_stats["min"], ref_stats["max"]) if v is not None]
    m: dict[str, Any] = {
        "stats_only": True, "numel": ref_stats["numel"],
        "ref_max_abs": max(ref_extent, default=0.0),
        "ref_rms": ref_stats["rms"] if ref_stats["rms"] is not None else 0.0,
        "nan_ref": ref_stats["nan"], "inf_ref": ref_stats["inf"], "nan_mlx": mlx_stats["nan"], "inf_mlx": mlx_stats["inf"],
    }
    for side, stats in (("ref", ref_stats), ("mlx", mlx_stats)):
        for key in ("min", "max", "mean", "std", "norm"):
            m[f"{side}_{key}"] = stats[key]
    for key in STATS_COMPARED:
        if ref_stats[key] is not None and mlx_stats[key] is not None:
            m[f"diff_{key}"] = abs(ref_stats[key] - mlx_stats[key])
    result.metrics = m
    methods = {ref_stats.get("sample_method"), mlx_stats.get("sample_method")}
    if len(methods) != 1 or len(ref_stats["sample"]) != len(mlx_stats["sample"]):
        result.fail("structure", "sample", sorted(map(str, methods)), "one method",
                    f"samples not comparable (methods {sorted(map(str, methods))})")
        return result
    ref_sample = np.asarray(ref_stats["sample"], np.float64)
    mlx_sample = np.asarray(mlx_stats["sample"], np.float64)
    sample = tensor_metrics(ref_sample, mlx_sample)
    m["sample_size"] = int(ref_sample.size)
    for key in ("cosine", "max_abs", "max_rel", "rmse"):
        m[f"sample_{key}"] = sample[key]
    if truth_missing:
        result.fail("structure", "truth", "missing", "present", "missing in the float64 truth run")
    elif truth_stats is not None:
        budget = precision_budget(np.asarray(truth_stats["sample"], np.float64), ref_sample, mlx_sample, dtype_mlx)
        m.update({f"sample_{k}": v for k, v in budget.items()})
    return apply_rules(result, tol, exact)


# --- judging a run ------------------------------------------------------------------------------

@dataclass
class Judge:
    """Judges layers of one component run as the tensors become available (in memory or streamed).

    ``lineage``: the component's name and its parents' (thresholds are inherited);
    ``dtype``: the run's dtype (a bf16 run also checks the budget against ``truth``);
    ``key_groups``: layer glob -> named key ranges of attention maps (``Component.attention_groups``).
    """

    lineage: Sequence[str]
    dtype: str
    thresholds: Thresholds
    alignment: Alignment = field(default_factory=Alignment)
    #: Per-layer limits from ``parity calibrate`` for this dtype (layer -> Tolerance fields), see :mod:`parity.calibration`.
    calibrated: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    key_groups: Mapping[str, attention.KeyGroups] = field(default_factory=dict)

    def tolerances(self, name: str) -> tuple[Tolerance, Tolerance | None]:
        """The tolerance of layer ``name`` (calibrated where it was), and in reduced precision its float32 tolerance too."""
        tol = self.thresholds.for_layer(self.lineage, self.dtype, name)
        if name in self.calibrated:
            tol = replace(tol, **self.calibrated[name])
        exact = self.thresholds.for_layer(self.lineage, "float32", name) if self.dtype != "float32" else None
        return tol, exact

    def layer(self, name: str, mlx_name: str, ref: Capture, mlx: Capture, truth: Capture | None,
              adapter: str | None = None) -> LayerResult:
        """Judge reference layer ``name`` against MLX layer ``mlx_name`` (both present)."""
        tol, exact = self.tolerances(name)
        truth_missing = truth is not None and name not in truth
        ref_stats = ref.stats_of(name)
        if ref_stats is not None:
            mlx_stats = mlx.stats_of(mlx_name) or _stats(mlx, mlx_name)
            truth_stats = truth.stats_of(name) if truth is not None and not truth_missing else None
            return judge_stats(name, mlx_name, ref_stats, mlx_stats, truth_stats, tol, exact, ref.dtypes[name],
                               mlx.dtypes[mlx_name], truth_missing)
        ours = mlx[mlx_name]
        if adapter:
            ours = apply_adapter(adapter, np.asarray(ours), tuple(ref.shapes[name]))
        truth_tensor = truth[name] if truth is not None and not truth_missing else None
        return judge_tensors(name, mlx_name, ref[name], ours, truth_tensor, tol, exact, ref.dtypes[name],
                             mlx.dtypes[mlx_name], adapter, truth_missing, attention.groups_for(name, self.key_groups))


def _stats(capture: Capture, name: str) -> dict[str, Any]:
    return tensor_stats(np.asarray(capture[name]), capture.dtypes[name])


#: Why a reference attention map is excluded when the MLX side records none (a port without map taps).
NO_MAPS = "the MLX side records no attention maps (a diagnostic, recomputed from q and k: see README, Attention maps)"


def _maps_not_recorded(ref: Capture, mlx: Capture, alignment: Alignment) -> bool:
    """The reference recorded attention maps and the MLX side none of them: a port that has no way to
    record maps is not judged on them; one that records some is judged on all."""
    maps = [name for name in ref.order if attention.is_map(name)]
    return bool(maps) and not any(alignment.target(name)[0] in mlx for name in maps)


def compare(component: str, dtype: str, ref: Capture, mlx: Capture, thresholds: Thresholds,
            alignment: Alignment | Mapping[str, Any] | None = None, truth: Capture | None = None,
            judged: Mapping[str, LayerResult] | None = None, crash: Crash | None = None,
            lineage: Sequence[str] | None = None, partial: bool = False,
            calibrated: Mapping[str, Mapping[str, float]] | None = None,
            key_groups: Mapping[str, attention.KeyGroups] | None = None) -> Comparison:
    """Compare every reference layer with its aligned MLX layer.

    ``lineage``: the component's name and its parents' (thresholds are inherited; default: just
    ``component``); ``key_groups``: named key ranges of attention maps (see :class:`Judge`).
    ``judged`` holds results already computed for some reference layers (streaming runs judge
    each layer as its MLX tensor arrives); those are used as they are.
    ``crash``: a forward that raised; the layers it never produced fail as missing, naming where
    it stopped. ``partial``: the captures hold a subset of the component's layers (a section's own
    run, e.g. teacher forcing), so a threshold layer glob need not match any of them. ``calibrated``:
    per-layer limits from ``parity calibrate`` (see :class:`Judge`).
    """
    judge = Judge(list(lineage or [component]), dtype, thresholds, Alignment.of(alignment), calibrated or {},
                  dict(key_groups or {}))
    judged = judged or {}
    alignment = judge.alignment
    alignment.check_exclusions(ref.order, mlx.order)
    missing_note = f" ({crash.label})" if crash else ""
    no_maps = _maps_not_recorded(ref, mlx, alignment) if crash is None else False
    layers = []
    matched = set()
    for name in ref.order:
        mlx_name, adapter = alignment.target(name)
        reason = NO_MAPS if no_maps and attention.is_map(name) else alignment.excluded(name, "ref")
        if reason is not None:
            layers.append(LayerResult(name, mlx_name, EXCLUDED, [], {}, ref.shapes[name], None, ref.dtypes[name],
                                      excluded=reason))
            matched.add(mlx_name)
            continue
        if mlx_name not in mlx:
            result = LayerResult(name, mlx_name, PASS, [], {}, ref.shapes[name], None, ref.dtypes[name], None)
            result.fail("structure", "presence", "missing", "present", f"missing on the MLX side{missing_note}")
            layers.append(result)
            continue
        matched.add(mlx_name)
        layers.append(judged.get(name) or judge.layer(name, mlx_name, ref, mlx, truth, adapter))
    for mlx_name in mlx.order:
        if mlx_name in matched:
            continue
        reason = alignment.excluded(mlx_name, "mlx")
        if reason is not None:
            layers.append(LayerResult(mlx_name, mlx_name, EXCLUDED, [], {}, None, mlx.shapes[mlx_name], None,
                                      mlx.dtypes[mlx_name], excluded=reason))
            continue
        result = LayerResult(mlx_name, mlx_name, PASS, [], {}, None, mlx.shapes[mlx_name], None, mlx.dtypes[mlx_name])
        note = f" ({crash.side} crashed after {crash.after or 'no layer'})" if crash and crash.side != "mlx" else ""
        result.fail("structure", "presence", "missing", "present", f"missing on the reference side{note}")
        layers.append(result)
    unmatched = judge.thresholds.unmatched_globs(judge.lineage, judge.dtype, [l.name for l in layers])
    if unmatched and crash is None and not partial:
        raise ThresholdsError(f"layer glob(s) matching no layer of {component} {judge.dtype}: {'; '.join(unmatched)} "
                              f"(layers: {', '.join(l.name for l in layers[:8])}{' ...' if len(layers) > 8 else ''})")
    return Comparison(component, judge.dtype, layers, crash=crash)
