"""Tensor hypotheses on precision: ours was computed or stored in a narrower dtype than the reference keeps.

The fingerprint is in the values: every element of ours is exactly representable in the narrower
dtype (bfloat16, float16; float32 against a float64 reference) while the reference's are not. Then
the judge (:func:`parity.explain.judge.judge`) says whether the error is one rounding of the
reference (``rounded_once``: the rounding rule, against the reference itself) or what arithmetic in
that dtype costs (a residual add, any add or product in bf16: ours is as far from the truth as the
reference rounded to that dtype is); a float64 schedule computed in float32 is the reference
rounded to float32, within :data:`SCHEDULE_ROUNDOFFS` float32 roundoffs.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from parity.explain.evidence import Candidate, Evidence
from parity.metrics import round_to

NARROW = ("bfloat16", "float16")
WIDER = {"bfloat16": ("float32", "float64"), "float16": ("float32", "float64"), "float32": ("float64",)}
#: A float64 schedule computed in float32 is within this many float32 roundoffs (times max|ref|) of the reference.
SCHEDULE_ROUNDOFFS = 64


def _exact(x: np.ndarray, dtype: str) -> bool:
    x = np.asarray(x)
    if dtype == "float32":
        return bool(np.array_equal(x.astype(np.float32).astype(x.dtype), x, equal_nan=True))
    return bool(np.array_equal(round_to(x, dtype), x.astype(np.float32), equal_nan=True))


def narrowed(evidence: Evidence, dtypes: tuple[str, ...] = NARROW) -> list[str]:
    """The dtypes narrower than the reference's in which ours is exact and the reference is not."""
    return [d for d in dtypes if evidence.dtype_ref in WIDER[d] and evidence.ours.shape == evidence.ref.shape
            and _exact(evidence.ours, d) and not _exact(evidence.ref, d)]


def _computed_in(evidence: Evidence, once: bool) -> Iterator[Candidate]:
    """``once``: ours is one rounding of the reference (judged against the reference itself: the rounding rule);
    else ours is as far from the truth (the float64 run; the reference in float32 runs) as the reference rounded
    to that dtype is."""
    for dtype in narrowed(evidence):
        if once:
            yield Candidate(f"the reference rounded once to {dtype}", evidence.ref, precision=dtype, once=True)
            continue
        truth = evidence.truth if evidence.truth is not None else evidence.ref
        yield Candidate(f"a value computed in {dtype} (the reference keeps {evidence.dtype_ref})",
                        round_to(evidence.ref, dtype), np.asarray(truth, np.float64), precision=dtype)


def cast_back_missing(evidence: Evidence) -> Iterator[Candidate]:
    """Ours held in a wider float dtype than the reference's (the dtype rule failed it): ours rounded to the
    reference's dtype, as the missing cast back would, judged by the rules of that dtype."""
    if evidence.dtype_ref not in WIDER or evidence.dtype_mlx not in WIDER[evidence.dtype_ref] \
            or evidence.ours.shape != evidence.ref.shape:
        return
    truth = evidence.truth if evidence.truth is not None else evidence.ref
    yield Candidate(f"the cast back to {evidence.dtype_ref} left out (ours kept in {evidence.dtype_mlx})", evidence.ref,
                    np.asarray(truth, np.float64), ours=round_to(evidence.ours, evidence.dtype_ref),
                    precision=evidence.dtype_ref)


def rounded_once(evidence: Evidence) -> Iterator[Candidate]:
    yield from _computed_in(evidence, once=True)


def computed_narrow(evidence: Evidence) -> Iterator[Candidate]:
    yield from _computed_in(evidence, once=False)


def float32_schedule(evidence: Evidence) -> Iterator[Candidate]:
    if narrowed(evidence, ("float32",)):
        yield evidence.mapped("the values computed in float32 (the reference: float64)",
                              lambda x: x.astype(np.float32).astype(np.float64), floor=SCHEDULE_ROUNDOFFS * 2.0**-24)
