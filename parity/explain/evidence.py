"""What a hypothesis is tested on (:class:`Evidence`) and what it answers with (:class:`Candidate`).

The evidence of one layer: its report row (metrics, the limits that were applied, dtypes), the
reference's tensor, ours brought into the reference's layout (the row's adapter applied), the
float64 truth in reduced-precision runs, for a layer of the second call (``call2/...``) the
reference's tensor of the same layer at the first call, and -- lazily, when a hypothesis asks -- the reference
sublayer that produced the layer, ready to run again on the port's own inputs
(:mod:`parity.explain.sublayer`), or a re-run of the component's reference with a patch
(schedules). Nothing here changes an array it is given: hypotheses build new ones.

Large tensors are cut to a window along one axis (:data:`MAX_ELEMENTS`) before tensor hypotheses
see them; the explanation says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ContextManager, Mapping

import numpy as np

from parity.compare import ATTENTION_RULES
from parity.thresholds import Tolerance

#: Tensors above this many elements are tested on a window of it (whole slices along one axis).
MAX_ELEMENTS = 1 << 22


@dataclass
class Candidate:
    """What the port would hold if it made the mistake, to be judged against what it does hold.

    ``ref`` (and ``truth``, the float64 prediction, in reduced-precision runs) is the reference as
    the mistake makes it; ``ours``, when given, replaces the port's tensor (a layout brought back,
    an overlap cut out). ``precision``: the mistake is a computation in that dtype, judged by the
    precision rules of :func:`parity.explain.judge.judge` (``once``: exactly one rounding of the
    reference). ``floor``: the candidate is computed from rounded values (a fit), so its abs limit
    is at least ``floor * max|ref|``.
    """

    detail: str
    ref: np.ndarray
    truth: np.ndarray | None = None
    ours: np.ndarray | None = None
    precision: str | None = None
    once: bool = False
    floor: float = 0.0
    comparable: bool = True


def tolerance_of(row: Mapping[str, Any]) -> Tolerance:
    """The limits a report row records as applied to its layer, as a :class:`Tolerance` (calibrated ones and an
    attention map's per-head ones included)."""
    limits = row.get("limits") or {}
    calibrated = limits.get("calibrated") or []
    keys = ("atol", "rtol", "cosine_min", "max_rel", "budget_ratio", "rounding_excess", *(r[0] for r in ATTENTION_RULES))
    kept = {k: limits[k] for k in keys if isinstance(limits.get(k), (int, float))}
    extra: dict[str, Any] = {}
    if "budget_ratio" in calibrated and "budget_ratio" in kept:
        extra["calibrated_budget"] = kept["budget_ratio"]
    if limits.get("allow_wider_dtype") is True:
        extra["allow_wider_dtype"] = True
    ref_max = row.get("ref_max_abs")
    if "abs_limit" in calibrated and isinstance(limits.get("abs_limit"), (int, float)) and ref_max:
        extra["calibrated_rel"] = limits["abs_limit"] / ref_max
    return Tolerance(**kept, **extra)


def window(shape: tuple[int, ...], limit: int = MAX_ELEMENTS) -> tuple[int, int] | None:
    """``(axis, length)``: keep the first ``length`` slices of ``axis`` so a tensor of ``shape`` has at most
    ``limit`` elements; the axis is the longest one whose size no other axis shares (so permutations of
    equal-size axes survive). None when the tensor is small enough."""
    size = math.prod(shape)
    if size <= limit or not shape:
        return None
    counts = {n: list(shape).count(n) for n in shape}
    axes = sorted(range(len(shape)), key=lambda a: (counts[shape[a]] > 1, -shape[a]))
    axis = axes[0]
    return axis, max(1, limit // max(1, size // shape[axis]))


@dataclass
class Evidence:
    """One layer's tensors, row and limits, and the ways to re-run its reference (see the module docstring)."""

    layer: str
    row: Mapping[str, Any]
    ref: np.ndarray
    ours: np.ndarray
    truth: np.ndarray | None
    limits: Tolerance
    exact: Tolerance | None
    rounding: Tolerance
    dtype: str
    first_call: np.ndarray | None = None
    find_sublayer: Callable[[], Any] | None = None
    rerun: Callable[[Callable[[], ContextManager]], tuple[np.ndarray, np.ndarray | None]] | None = None
    cut: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, layer: str, row: Mapping[str, Any], ref: np.ndarray, ours: np.ndarray, truth: np.ndarray | None,
           **kwargs: Any) -> "Evidence":
        """Evidence on the tensors as given, cut to a window when large (:func:`window`)."""
        evidence = cls(layer, row, ref, ours, truth, **kwargs)
        evidence.cut = window(tuple(ref.shape)) if ref.shape == ours.shape else None
        if evidence.cut is not None:
            axis, length = evidence.cut
            evidence.ref, evidence.ours = evidence.window(ref), evidence.window(ours)
            evidence.truth = evidence.window(truth) if truth is not None else None
            if evidence.first_call is not None and evidence.first_call.shape == ref.shape:
                evidence.first_call = evidence.window(evidence.first_call)
            evidence.notes.append(f"tensor hypotheses tested on slices 0..{length - 1} of axis {axis} "
                                  f"({evidence.ref.size} of {ref.size} elements)")
        return evidence

    def window(self, array: np.ndarray) -> np.ndarray:
        """``array`` cut as the evidence's tensors are (a reference sublayer's output, say)."""
        if self.cut is None:
            return array
        axis, length = self.cut
        return np.take(array, np.arange(min(length, array.shape[axis])), axis=axis)

    @property
    def dtype_ref(self) -> str:
        return str(self.row.get("dtype_ref") or self.dtype)

    @property
    def dtype_mlx(self) -> str:
        return str(self.row.get("dtype_mlx") or self.dtype)

    @property
    def key_groups(self) -> dict[str, tuple[int, int]]:
        """An attention map's named key ranges, as its row records them (judged per head with the map)."""
        return {group: (int(span[0]), int(span[1])) for group, span in (self.row.get("attn_groups") or {}).items()}

    @property
    def reduced(self) -> bool:
        """A reduced-precision run: layers are judged against the float64 truth (the precision budget)."""
        return self.dtype != "float32"

    @cached_property
    def sublayer(self) -> Any:
        """The reference sublayer that produced this layer, on the port's inputs (None: not available)."""
        return self.find_sublayer() if self.find_sublayer is not None else None

    def mapped(self, detail: str, transform: Callable[[np.ndarray], np.ndarray], **kwargs: Any) -> Candidate:
        """A candidate that applies ``transform`` to the reference (and the truth): a mistake on values."""
        truth = transform(np.asarray(self.truth, np.float64)) if self.truth is not None else None
        return Candidate(detail, transform(np.asarray(self.ref, np.float64)), truth, **kwargs)

    def moved(self, detail: str, ours: np.ndarray, **kwargs: Any) -> Candidate:
        """A candidate that brings ours back into the reference's layout: a mistake on where values go."""
        return Candidate(detail, self.ref, self.truth, ours=ours, **kwargs)
