"""Tensor hypotheses on where values go: ours holds the reference's values in another arrangement.

Each test brings ours back into the reference's layout (with the alignment adapters where one
fits: ``transpose``, ``swap_halves``, ``interleave_halves``) and lets the judge compare. Searches
are bounded: permutations only of axes of equal size (or onto the reference's shape when the
shapes differ), factorisations of one axis into at most three factors, each screened on a sample
of :data:`SAMPLE` elements before the whole tensor is compared.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator

import numpy as np

from parity.alignment import apply_adapter
from parity.explain.evidence import Candidate, Evidence

#: Elements a layout is screened on before the whole tensor is compared.
SAMPLE = 512
#: Longest axis whose factorisations are searched, and most factorised layouts screened.
MAX_FACTORED_AXIS = 1 << 14
MAX_LAYOUTS = 4000


def _sample(size: int) -> np.ndarray:
    flat = np.random.default_rng(0).choice(size, SAMPLE, replace=False) if size > SAMPLE else np.arange(size)
    return np.sort(flat)


def _close(evidence: Evidence, view: np.ndarray, flat: np.ndarray) -> bool:
    """Whether ``view`` (ours rearranged; read in C order it is the candidate) agrees with the reference on the
    sampled elements, within 10x the layer's float32 limit (1 % of max|ref| without one)."""
    ref = np.asarray(evidence.ref).reshape(-1)[flat].astype(np.float64)
    top = float(np.max(np.abs(evidence.ref))) if evidence.ref.size else 0.0
    limit = evidence.limits.global_abs_limit(top)
    limit = 10 * limit if limit is not None else 1e-2 * top
    return bool(np.max(np.abs(view[np.unravel_index(flat, view.shape)] - ref), initial=0.0) <= limit)


def _screened(evidence: Evidence, layouts: Iterator[tuple[str, np.ndarray]]) -> Iterator[Candidate]:
    """The layouts (ours as a view whose C-order reading is the candidate) that pass the screen, materialised."""
    flat = _sample(evidence.ref.size)
    for detail, view in itertools.islice(layouts, MAX_LAYOUTS):
        if view.size == evidence.ref.size and _close(evidence, view, flat):
            yield evidence.moved(detail, view.reshape(evidence.ref.shape))


def transpose_last_two(evidence: Evidence) -> Iterator[Candidate]:
    ours, rank = evidence.ours, evidence.ours.ndim
    swapped = ours.shape[:-2] + ours.shape[-2:][::-1]
    if rank >= 2 and swapped == evidence.ref.shape and ours.shape[-1] > 1 < ours.shape[-2]:
        spec = f"transpose{(*range(rank - 2), rank - 1, rank - 2)}"
        yield evidence.moved(f"the last two axes swapped (adapter {spec})", apply_adapter(spec, ours, evidence.ref.shape))


def chunk_order(evidence: Evidence) -> Iterator[Candidate]:
    """The last axis as n equal chunks (fused q/k/v, gate/up, shift/scale, sin/cos) in another order: each
    chunk of ours is matched to the nearest chunk of the reference."""
    ours, ref = evidence.ours, np.asarray(evidence.ref)
    if ours.shape != ref.shape:
        return
    for parts in (2, 3, 4, 6):
        if ours.shape[-1] % parts or ours.shape[-1] == parts:
            continue
        mine, theirs = np.split(ours, parts, axis=-1), np.split(ref, parts, axis=-1)
        order = [int(np.argmin([np.abs(m.astype(np.float64) - t).max() for t in theirs])) for m in mine]
        if sorted(order) != list(range(parts)) or order == list(range(parts)):
            continue
        back = [mine[order.index(i)] for i in range(parts)]
        adapter = " (adapter swap_halves)" if parts == 2 else ""
        yield evidence.moved(f"the {parts} chunks of the last axis in order {tuple(order)}{adapter}",
                             np.concatenate(back, axis=-1))


def rotary_layout(evidence: Evidence) -> Iterator[Candidate]:
    """Rotary pairs stored as two halves where the reference interleaves them, or the reverse."""
    ours = evidence.ours
    if ours.shape != evidence.ref.shape or ours.shape[-1] % 2 or ours.shape[-1] < 4:
        return
    yield evidence.moved("rotary pairs stored as halves (adapter interleave_halves)",
                         apply_adapter("interleave_halves", ours, ours.shape))
    yield evidence.moved("rotary pairs interleaved where the reference stores halves",
                         np.concatenate([ours[..., 0::2], ours[..., 1::2]], axis=-1))


def _permutations(evidence: Evidence) -> Iterator[tuple[str, np.ndarray]]:
    """Axes permuted (an adapter ``transpose``); with the reference's number of elements, also a tensor laid
    out with its axes in another order and then reshaped (a reshape where a transpose belongs)."""
    ours, target = evidence.ours, tuple(evidence.ref.shape)
    rank = ours.ndim
    for perm in itertools.permutations(range(rank)):
        if perm != tuple(range(rank)) and tuple(ours.shape[p] for p in perm) == target:
            yield f"axes permuted (adapter transpose{perm})", np.transpose(ours, perm)
    if ours.size != math.prod(target) or rank != len(target):
        return
    for perm in itertools.permutations(range(rank)):
        laid = tuple(target[p] for p in perm)
        if perm != tuple(range(rank)) and laid != target:
            yield (f"the reference's axes laid out as {perm}, then reshaped (a reshape where a transpose belongs)",
                   ours.reshape(laid).transpose(np.argsort(perm)))


def _factorisations(n: int) -> Iterator[tuple[int, ...]]:
    for a in range(2, n // 2 + 1):
        if n % a:
            continue
        yield a, n // a
        for b in range(2, n // a // 2 + 1):
            if (n // a) % b == 0:
                yield a, b, n // a // b


def _factored(evidence: Evidence) -> Iterator[tuple[str, np.ndarray]]:
    """One axis read as (a, b[, c]) in another order (a flatten-order mix-up: tokens (w, h) for (h, w))."""
    ours = evidence.ours
    if ours.shape != evidence.ref.shape:
        return
    for axis, n in enumerate(ours.shape):
        if not 4 <= n <= MAX_FACTORED_AXIS:
            continue
        for factors in _factorisations(n):
            for order in itertools.permutations(range(len(factors))):
                if order == tuple(range(len(factors))):
                    continue
                written = tuple(factors[i] for i in order)  # the port flattened the factors in this order
                split = ours.reshape(*ours.shape[:axis], *written, *ours.shape[axis + 1:])
                back = [axis + order.index(i) for i in range(len(order))]
                axes = [*range(axis), *back, *range(axis + len(order), split.ndim)]
                yield f"axis {axis} ({n}) flattened as {written} where the reference has {factors}", split.transpose(axes)


def axis_order(evidence: Evidence) -> Iterator[Candidate]:
    """Axes permuted, a reshape where a transpose belongs, or one axis flattened in another order; else, when
    ours holds the reference's values in any other order (sorted, they agree), that."""
    found = False
    for candidate in _screened(evidence, itertools.chain(_permutations(evidence), _factored(evidence))):
        found = True
        yield candidate
    if not found and evidence.ours.size == evidence.ref.size and evidence.ours.size > 1:
        order = np.argsort(np.asarray(evidence.ref), axis=None, kind="stable")
        truth = np.asarray(evidence.truth).reshape(-1)[order] if evidence.truth is not None else None
        yield Candidate("the same values in another order", np.asarray(evidence.ref).reshape(-1)[order],
                        truth, ours=np.sort(evidence.ours, axis=None), comparable=False)


def one_step_shift(evidence: Evidence) -> Iterator[Candidate]:
    """Ours shifted by one or two steps along an axis (time, frame or token off by one), compared where they overlap."""
    ours, ref, truth = evidence.ours, np.asarray(evidence.ref), evidence.truth
    if ours.shape != ref.shape:
        return
    for axis, n in enumerate(ref.shape):
        for step in (1, -1, 2, -2):
            if n < 2 * abs(step) + 1:
                continue
            keep, take = (slice(step, None), slice(None, -step)) if step > 0 else (slice(None, step), slice(-step, None))
            cut = lambda x, s: x[(slice(None),) * axis + (s,)]  # noqa: E731
            yield Candidate(f"axis {axis} shifted by {step:+d} (ours[i] = reference[i {'-' if step > 0 else '+'} {abs(step)}])",
                            cut(ref, take), cut(truth, take) if truth is not None else None, ours=cut(ours, keep))
