"""Tensor hypotheses on values: ours is the reference zeroed somewhere, negated, clamped, scaled, offset or
shifted again in time -- each a transform of the reference (and the truth) the judge compares with ours --
or, in the second call, the first call's value kept.

Fitted parameters (a scale, an offset, clamp bounds, a time shift) are computed from the tensors,
so those candidates carry a floor of a few roundings of the reference's dtype (:data:`ROUNDINGS`),
and need a few values to be fitted on (:data:`MIN_FIT`).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from parity.explain.evidence import Candidate, Evidence
from parity.vocab import fmt

#: A fitted candidate's abs limit is at least this many unit roundoffs of the reference's dtype times max|ref|.
ROUNDINGS = 16
#: Fewest values a constant is fitted on: on fewer (a scalar, say) a fitted constant matches anything.
MIN_FIT = 4
_EPS = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-9, "float16": 2.0**-11}


def _floor(evidence: Evidence) -> float:
    return ROUNDINGS * _EPS.get(evidence.dtype_ref, 2.0**-24)


def zeroed_region(evidence: Evidence) -> Iterator[Candidate]:
    """Slices of an axis that are all zero in ours and not in the reference (a missing cache, dropped
    history, zeros taken for a value): the reference with those slices zeroed."""
    ours, ref = evidence.ours, np.asarray(evidence.ref)
    if ours.shape != ref.shape or not ours.size:
        return
    if not ours.any():
        yield evidence.mapped("all values zero", np.zeros_like)
        return
    for axis in range(ours.ndim):
        other = tuple(a for a in range(ours.ndim) if a != axis)
        zero = ~ours.any(axis=other) & ref.any(axis=other)
        if zero.any() and not zero.all():
            where = np.flatnonzero(zero)
            span = f"{where[0]}..{where[-1]}" if len(where) == where[-1] - where[0] + 1 else f"{len(where)} slices"

            def zeroed(x: np.ndarray, axis: int = axis, zero: np.ndarray = zero) -> np.ndarray:
                return np.where(np.expand_dims(zero, other), 0.0, x)
            yield evidence.mapped(f"slices {span} of axis {axis} zeroed", zeroed)


def sign_flip(evidence: Evidence) -> Iterator[Candidate]:
    yield evidence.mapped("the sign flipped", np.negative)


def first_call_value(evidence: Evidence) -> Iterator[Candidate]:
    """A second call's layer holding the first call's value: state kept between calls (a result memoised on the
    module, a cache on the model). The second call is made in float32 runs only: no float64 truth is needed."""
    first = evidence.first_call
    if first is not None and first.shape == evidence.ours.shape:
        yield Candidate("the first call's value of this layer", np.asarray(first, np.float64))


def _fits(evidence: Evidence) -> bool:
    return evidence.ours.shape == evidence.ref.shape and evidence.ref.size >= MIN_FIT


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)))


def scale(evidence: Evidence) -> Iterator[Candidate]:
    """The least-squares factor ``ours ~ a * reference``."""
    norm = _dot(evidence.ref, evidence.ref)
    if norm > 0 and _fits(evidence):
        a = _dot(evidence.ours, evidence.ref) / norm
        if a != 1.0:
            yield evidence.mapped(f"a factor {a:.7g}", lambda x: a * x, floor=_floor(evidence))


def offset(evidence: Evidence) -> Iterator[Candidate]:
    """The constant ``ours ~ reference + b`` (the mean difference)."""
    if _fits(evidence):
        b = float(np.mean(np.asarray(evidence.ours, np.float64) - evidence.ref))
        if b:
            yield evidence.mapped(f"an offset {fmt(b)}", lambda x: x + b, floor=_floor(evidence))


def _clamped(x: np.ndarray, other: np.ndarray) -> tuple[float, float] | None:
    """The bounds ``x`` is clamped to where ``other`` goes beyond: a side counts when ``x`` saturates there (two
    values or more at its extreme; one is any tensor's maximum); the other side is open (inf)."""
    lo, hi = float(x.min()), float(x.max())
    low = lo > float(other.min()) and np.count_nonzero(x == lo) >= 2
    high = hi < float(other.max()) and np.count_nonzero(x == hi) >= 2
    return (lo if low else -np.inf, hi if high else np.inf) if (low or high) and lo < hi else None


def clamp(evidence: Evidence) -> Iterator[Candidate]:
    """Ours clamped to a range the reference exceeds, or the reference clamped where ours is not."""
    ours, ref = evidence.ours, np.asarray(evidence.ref)
    if not _fits(evidence):
        return
    bounds = _clamped(ours, ref)
    if bounds is not None:
        lo, hi = bounds
        yield evidence.mapped(f"a clamp to [{fmt(lo)}, {fmt(hi)}]", lambda x: np.clip(x, lo, hi), floor=_floor(evidence))
    bounds = _clamped(ref, ours)
    if bounds is not None:
        yield evidence.moved(f"no clamp where the reference clamps to [{fmt(bounds[0])}, {fmt(bounds[1])}]",
                             np.clip(ours, *bounds), floor=_floor(evidence))


def shift_again(evidence: Evidence) -> Iterator[Candidate]:
    """A schedule in [0, 1] time-shifted once more: ``ours = c r / (1 + (c - 1) r)`` for a fitted c (the shift
    applied twice: c = shift)."""
    ours, ref = np.asarray(evidence.ours, np.float64).reshape(-1), np.asarray(evidence.ref, np.float64).reshape(-1)
    if not _fits(evidence) or ref.min() < 0 or ref.max() > 1:
        return
    inner = (ref > 1e-6) & (ref < 1 - 1e-6) & (ours > 1e-6) & (ours < 1 - 1e-6)
    if not inner.any():
        return
    c = float(np.median(ours[inner] * (1 - ref[inner]) / (ref[inner] * (1 - ours[inner]))))
    if abs(c - 1) > 1e-6:
        yield evidence.mapped(f"the schedule time-shifted again by {c:.6g}", lambda x: c * x / (1 + (c - 1) * x), floor=_floor(evidence))
