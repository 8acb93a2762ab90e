"""Error metrics between a reference tensor and a tensor under test, computed in float64.

One implementation serves every component. :func:`tensor_metrics` makes one pass over the two
tensors, in chunks of ``CHUNK`` elements (views where the memory is contiguous, else copies of one
chunk), through one compiled loop (numba, :func:`_accumulate`) on one thread: each element pair is
read once and widened to float64. Its sums run in SIMD lanes (reassociated: the last bits depend
on the CPU's vector width, the float64 accuracy does not); its maxima and non-finite counts come
from an exact element loop, run only over the spans where an element could change them. Non-finite
values are counted per side and left out of the error sums (any NaN/Inf makes the layer fail, see
``parity.compare``).

``max_rel`` divides by ``max(|ref|, REL_FLOOR * rms(ref))``, a floor only known at the end. A cheap
float32 estimate of the floor comes first (one BLAS dot over the reference, on one thread:
:func:`parity.threads.single_threaded_blas`), and a band ``[lo, hi)`` around it: an element with
``|ref| >= hi`` divides by ``|ref|``, one with ``|ref| < lo`` by the floor (its largest ``|d|`` is
kept), and the few in the band that could raise the result are kept to be divided at the end. A
second pass runs only if the estimate was off, too many fell in the band, or the floor could not be
estimated (non-float or non-finite references).

``precision_budget`` and ``rmse_and_rms`` (float64 truth runs, a few layers) are chunked numpy
passes over reused float64 buffers, their sums BLAS dots on one thread.
"""
from __future__ import annotations

import math
from typing import Iterator

import numba
import numpy as np

from parity.threads import single_threaded_blas

#: Elements per chunk: a widened or copied chunk (512 KB in float64) stays in L2; smaller ones pay per-call costs.
CHUNK = 1 << 16
#: max_rel divides by max(|ref|, REL_FLOOR * rms(ref)) so near-zero reference values do not explode.
REL_FLOOR = 1e-3
#: float32 unit roundoff: the smallest error a float32 reference can be expected to have.
FLOAT32_ROUNDOFF = 2.0**-24
#: Relative half-width of the band around the estimated floor whose elements are kept for the end.
_BAND = 0.02
#: At most this many band elements are kept (8 MB per side); beyond that, max_rel takes a second pass.
_BAND_CAP = 1 << 20
#: Elements per dot of the floor estimate (a streaming read: no buffers to keep in cache; fewer calls).
_ESTIMATE_CHUNK = 1 << 20
_TINY = np.finfo(np.float64).tiny


def blocks(x: np.ndarray, n: int | None = None) -> Iterator[np.ndarray]:
    """Contiguous 1-D pieces of ``x`` of at most ``n`` elements, in C order.

    The boundaries depend only on ``x.shape``, never on its strides, so two arrays of one shape
    are cut alike whatever their memory layout; pieces of a non-contiguous array are copied one
    at a time, never the whole array. A piece never spans part of a row: whole rows of the
    leading axis are grouped while they fit in ``n``, and a longer row is cut on its own.
    """
    n = n or CHUNK
    if x.ndim <= 1:
        flat = x.reshape(-1)
        for start in range(0, flat.shape[0], n):
            yield np.ascontiguousarray(flat[start:start + n])
        return
    row = math.prod(x.shape[1:])
    if row > n:
        for i in range(x.shape[0]):
            yield from blocks(x[i], n)
        return
    step = max(1, n // max(row, 1))
    for i in range(0, x.shape[0], step):
        yield np.ascontiguousarray(x[i:i + step]).reshape(-1)


class _Buffers:
    """Reused float64 work buffers of one chunk's size."""

    def __init__(self, count: int, size: int):
        size = max(1, min(size, CHUNK))
        self.arrays = [np.empty(size, np.float64) for _ in range(count)]

    def load(self, *chunks: np.ndarray) -> list[np.ndarray]:
        """Views of the first buffers holding ``chunks`` in float64, then the spare buffers (unset)."""
        m = chunks[0].shape[0]
        views = [buf[:m] for buf in self.arrays]
        for view, chunk in zip(views, chunks):
            np.copyto(view, chunk, casting="unsafe")
        return views


def _floor_estimate(ref: np.ndarray) -> float:
    """REL_FLOOR * rms(ref) from a fast float32/float64 dot; NaN when it cannot be trusted."""
    if ref.size == 0 or ref.dtype not in (np.float32, np.float64):
        return math.nan
    total = 0.0
    for chunk in blocks(ref, _ESTIMATE_CHUNK):
        total += float(np.dot(chunk, chunk))
    estimate = REL_FLOOR * math.sqrt(total / ref.size)
    return estimate if math.isfinite(estimate) and estimate > 0 else math.nan


#: Fast-math flags of the sums' loop: reassociation lets it run in SIMD lanes; no flag assumes finite values.
_SIMD = {"reassoc", "nsz", "contract"}
#: Elements per span of the compiled pass: the SIMD sums' unit, and of the exact loop where a span has a candidate.
_SPAN = 2048


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_SIMD)
def _sums(a, b, lo, maxes):  # pragma: no cover - compiled
    """ref^2, test^2, d^2 and |d| summed over one span (d = test - ref, exact in float64 for float32
    inputs), and how many elements could change ``maxes`` (see :func:`_exact`). A non-finite sum means
    a non-finite element (or float64 values beyond 1e154, whose squares the exact loop sums alike)."""
    max_abs, ref_max, big, below = maxes[0], maxes[1], maxes[2], maxes[3]
    rs = ts = dd = ad_sum = 0.0
    flagged = 0
    for i in range(a.shape[0]):
        x = np.float64(a[i])
        y = np.float64(b[i])
        d = y - x
        ad, ax = abs(d), abs(x)
        rs += x * x
        ts += y * y
        dd += d * d
        ad_sum += ad
        flagged += (ad > max_abs) | (ax > ref_max) | (ad > (big * ax if ax >= lo else below))
    return rs, ts, dd, ad_sum, flagged


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _exact(a, b, lo, hi, with_sums, sums, maxes, counts, band_a, band_d):  # pragma: no cover - compiled
    """One chunk pair element by element: NaN/Inf counts, the maxima and, when ``with_sums``, the sums of finite pairs.

    ``maxes``: max |d|, max |ref|, then for max_rel the largest ``|d| / |ref|`` over ``|ref| >= hi``
    (``big``) and the largest ``|d|`` over ``|ref| < lo`` (``below``). A band element (``lo <= |ref| < hi``)
    is kept only if it could beat ``big`` (``|d| > big * |ref|``: it divides by at least ``|ref|``);
    ``counts[5]`` counts them, those beyond the buffers are lost (the caller then takes a second pass).
    """
    max_abs, ref_max, big, below = maxes[0], maxes[1], maxes[2], maxes[3]
    kept, cap = counts[5], band_a.shape[0]
    for i in range(a.shape[0]):
        x = np.float64(a[i])
        y = np.float64(b[i])
        if not (math.isfinite(x) and math.isfinite(y)):
            counts[0] += math.isnan(x)
            counts[1] += math.isinf(x)
            counts[2] += math.isnan(y)
            counts[3] += math.isinf(y)
            continue
        d = y - x
        ad, ax = abs(d), abs(x)
        if with_sums:
            counts[4] += 1
            sums[0] += x * x
            sums[1] += y * y
            sums[2] += d * d
            sums[3] += ad
        max_abs = max(max_abs, ad)
        ref_max = max(ref_max, ax)
        if ax >= hi:
            if ad > big * ax:
                big = ad / ax
        elif ax < lo:
            below = max(below, ad)
        elif ad > big * ax:
            if kept < cap:
                band_a[kept] = ax
                band_d[kept] = ad
            kept += 1
    maxes[0], maxes[1], maxes[2], maxes[3] = max_abs, ref_max, big, below
    counts[5] = kept


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _accumulate(a, b, lo, hi, sums, maxes, counts, band_a, band_d):  # pragma: no cover - compiled
    """Add one chunk pair to the running state, ``_SPAN`` elements at a time: the SIMD sums, then the
    exact loop only over a span where an element could change a maximum or is not finite (few spans
    once the maxima settle: short spans keep the exact work small).

    ``sums``: ref^2, test^2, d^2, |d|; ``maxes``: see :func:`_exact`; ``counts``: NaN and Inf of
    ref, of test, finite pairs, band elements seen.
    """
    for start in range(0, a.shape[0], _SPAN):
        x, y = a[start:start + _SPAN], b[start:start + _SPAN]
        rs, ts, dd, ad_sum, flagged = _sums(x, y, lo, maxes)
        if math.isfinite(rs + ts + dd + ad_sum):
            sums[0] += rs
            sums[1] += ts
            sums[2] += dd
            sums[3] += ad_sum
            counts[4] += x.shape[0]
            if flagged:
                _exact(x, y, lo, hi, False, sums, maxes, counts, band_a, band_d)
        else:
            _exact(x, y, lo, hi, True, sums, maxes, counts, band_a, band_d)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _max_ratio(a, b, floor, running):  # pragma: no cover - compiled
    """max(running, max |b - a| / max(|a|, floor)) over the pairs finite on both sides."""
    for i in range(a.shape[0]):
        x = np.float64(a[i])
        y = np.float64(b[i])
        if math.isfinite(x) and math.isfinite(y):
            running = max(running, abs(y - x) / max(abs(x), floor))
    return running


def _chunk_pairs(ref: np.ndarray, test: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Matching chunks of both tensors, both float32 or both float64 (anything else widened to float64)."""
    native = ref.dtype == test.dtype and ref.dtype in (np.float32, np.float64)
    for a, b in zip(blocks(ref), blocks(test)):
        yield (a, b) if native else (a.astype(np.float64), b.astype(np.float64))


@single_threaded_blas
def tensor_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float | int | None]:
    """Cosine, max abs/rel, mean abs, RMSE, SNR (dB) and NaN/Inf counts of ``test`` against ``ref``.

    Shapes must match; the caller checks that first (``parity.compare``: a shape mismatch fails the layer).
    """
    n = ref.size
    estimate = _floor_estimate(ref)
    lo, hi = (math.inf, math.inf) if math.isnan(estimate) else (estimate * (1 - _BAND), estimate * (1 + _BAND))
    sums, maxes, counts = np.zeros(4), np.zeros(4), np.zeros(6, np.int64)
    band_a, band_d = (np.empty(min(n, _BAND_CAP)) for _ in range(2))
    for a, b in _chunk_pairs(ref, test):
        _accumulate(a, b, lo, hi, sums, maxes, counts, band_a, band_d)
    ref_sq, test_sq, diff_sq, abs_sum = (float(v) for v in sums)
    max_abs, ref_max, big, below = (float(v) for v in maxes)
    nan_ref, inf_ref, nan_test, inf_test, finite, kept = (int(v) for v in counts)
    ref_rms = math.sqrt(ref_sq / finite) if finite else 0.0
    floor = max(REL_FLOOR * ref_rms, _TINY)
    if lo <= floor <= hi and kept <= band_a.size:
        # |ref| >= hi >= floor: |d| / |ref| exactly; |ref| < lo <= floor: |d| / floor; the band element by element.
        band = band_d[:kept] / np.maximum(band_a[:kept], floor)
        max_rel = max(big, below / floor, float(band.max(initial=0.0)))
    else:
        max_rel = 0.0
        for a, b in _chunk_pairs(ref, test):
            max_rel = _max_ratio(a, b, floor, max_rel)
    dot = (ref_sq + test_sq - diff_sq) / 2  # a.b without a fourth sum, as accurate: d of float32s is exact
    if ref_sq > 0 and test_sq > 0:
        cosine = dot / math.sqrt(ref_sq * test_sq)
    else:
        cosine = 1.0 if ref_sq == test_sq else 0.0  # both all-zero agree; one all-zero does not
    if diff_sq == 0:
        snr_db = math.inf
    elif ref_sq == 0:
        snr_db = -math.inf
    else:
        snr_db = 10.0 * math.log10(ref_sq / diff_sq)
    return {
        "numel": int(n),
        "cosine": float(cosine),
        "max_abs": max_abs,
        "max_rel": max_rel,
        "mean_abs": abs_sum / finite if finite else math.nan,
        "rmse": math.sqrt(diff_sq / finite) if finite else math.nan,
        "snr_db": snr_db,
        "ref_max_abs": ref_max,
        "ref_rms": ref_rms,
        "nan_ref": nan_ref,
        "inf_ref": inf_ref,
        "nan_mlx": nan_test,
        "inf_mlx": inf_test,
    }


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (``bfloat16``: nearest-even on the float32 bits; ``float16``), as float32.

    Plain integer arithmetic on the bits, so every machine rounds alike.
    """
    x32 = np.asarray(x, np.float32)
    if dtype == "bfloat16":
        bits = x32.view(np.uint32)
        bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return ((bits + bias) & np.uint32(0xFFFF0000)).view(np.float32)
    if dtype == "float16":
        return x32.astype(np.float16).astype(np.float32)
    return x32


#: Dtypes coarser than float32, whose one rounding can floor the reference's own error.
ROUNDED = ("bfloat16", "float16")
#: A reference error at most this many float32 unit roundoffs (times rms(truth)) is "exact to float32":
#: 3.8e-6 relative, two orders below one bf16 rounding (2^-9 / sqrt(12) = 5.6e-4 relative).
EXACT_ROUNDOFFS = 64


@single_threaded_blas
def precision_budget(truth: np.ndarray, ref: np.ndarray, test: np.ndarray, test_dtype: str | None = None
                     ) -> dict[str, float]:
    """Our error against a float64 truth relative to the reference's own error against it.

    ``budget_ratio = rmse(test, truth) / max(rmse(ref, truth), floor)``, floored at float32 unit
    roundoff times rms(truth): when the reference is exact, so must we be. A ratio near 1 means we
    lose no more precision than the reference does. One chunked pass.

    At a tap the reference computes exactly (to float32: ``EXACT_ROUNDOFFS``) while our side holds
    it in a coarser ``test_dtype`` (bf16: diffusers keeps ``norm1(x.float())`` in float32, a port
    rounds it once), the floor is what storing the reference's tensor once in that dtype costs
    (``rounding_err``): one rounding is legitimate and must not be divided by the ~0 error the
    reference has there. Then ``rounding_excess`` = rmse(test - round(ref)) / ``rounding_err``
    says whether we did more than round it once: ~0 (a few float32 differences flip a rounding)
    when we did not, ~0.5-1.5 when the tap was computed in the coarse dtype or rounded twice.
    """
    rounding = test_dtype if test_dtype in ROUNDED else None
    sums = np.zeros(5)  # test error^2, ref error^2, rounded-ref error^2, truth^2, (test - rounded ref)^2
    count = 0
    buffers = _Buffers(4, truth.size)
    with np.errstate(invalid="ignore", over="ignore"):
        for t_chunk, r_chunk, m_chunk in zip(blocks(truth), blocks(ref), blocks(test)):
            t, r, m, d = buffers.load(t_chunk, r_chunk, m_chunk)
            finite = np.isfinite(t) & np.isfinite(r) & np.isfinite(m)
            if not finite.all():
                t, r, m, d = t[finite], r[finite], m[finite], d[:int(finite.sum())]
                r_chunk = np.asarray(r_chunk).reshape(-1)[finite]
            count += t.size
            sums[3] += float(t @ t)
            for i, other in enumerate((m, r)):
                np.subtract(other, t, out=d)
                sums[i] += float(d @ d)
            if rounding:
                rounded = round_to(r_chunk, rounding).astype(np.float64)
                np.subtract(rounded, t, out=d)
                sums[2] += float(d @ d)
                np.subtract(m, rounded, out=d)
                sums[4] += float(d @ d)
    if not count:
        return {"err_vs_truth": math.nan, "ref_err_vs_truth": math.nan, "budget_ratio": math.nan}
    err_test, err_ref, err_round, truth_rms, excess = (math.sqrt(v / count) for v in sums)
    exact = err_ref <= EXACT_ROUNDOFFS * FLOAT32_ROUNDOFF * truth_rms
    floor = max(FLOAT32_ROUNDOFF * truth_rms, err_round if rounding and exact else 0.0, _TINY)
    out = {"err_vs_truth": err_test, "ref_err_vs_truth": err_ref, "budget_ratio": err_test / max(err_ref, floor)}
    if rounding and err_ref <= EXACT_ROUNDOFFS * FLOAT32_ROUNDOFF * truth_rms < err_round:
        out["rounding_err"] = err_round
        out["rounding_excess"] = excess / err_round
    return out


@single_threaded_blas
def rmse_and_rms(truth: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """RMSE of ``test`` against ``truth`` and the RMS of ``truth`` (finite elements only)."""
    diff_sq = truth_sq = 0.0
    count = 0
    buffers = _Buffers(3, truth.size)
    with np.errstate(invalid="ignore", over="ignore"):
        for t_chunk, m_chunk in zip(blocks(truth), blocks(test)):
            t, m, d = buffers.load(t_chunk, m_chunk)
            finite = np.isfinite(t) & np.isfinite(m)
            if not finite.all():
                t, m, d = t[finite], m[finite], d[:int(finite.sum())]
            count += t.size
            truth_sq += float(t @ t)
            np.subtract(m, t, out=d)
            diff_sq += float(d @ d)
    if count == 0:
        return math.nan, math.nan
    return math.sqrt(diff_sq / count), math.sqrt(truth_sq / count)
