"""Error metrics between a reference tensor and a tensor under test, computed in float64.

One implementation serves every component. Tensors are processed in one pass, in chunks of
``CHUNK`` elements (small enough to stay in cache) converted into reused float64 buffers, so no
float64 copy of a whole tensor is made and memory use does not grow with tensor size. The sums
are BLAS dots on one thread (:func:`parity.threads.single_threaded_blas`: the pass is
memory-bound, and a second BLAS thread loses badly to a busy neighbour core). Non-finite values
are counted per side and left out of the error sums (any NaN/Inf makes the layer fail, see
``parity.compare``).

``max_rel`` divides by ``max(|ref|, REL_FLOOR * rms(ref))``, a floor only known at the end (a
tensor of one chunk is divided then, from the buffers). Otherwise a cheap float32 estimate of the floor comes first (one BLAS dot over the reference). The main pass
divides only where it can matter: an element with ``|d| <= R * max(|ref|, lo)`` (``lo`` just
under the estimate) contributes at most ``R``, the largest ratio found so far (seeded from a
strided sample), whatever the floor turns out to be; the few others are divided exactly, and those whose ``|ref|`` lies near
the floor are kept so the exact value is settled at the end without a second pass (a second
pass runs only if the estimate was off, or the tensor holds non-finite values).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from parity.threads import single_threaded_blas

#: Elements per chunk: 32K float64 buffers (256 KB each) stay in L2; bigger chunks spill, smaller ones pay per-call costs.
CHUNK = 1 << 15
#: max_rel divides by max(|ref|, REL_FLOOR * rms(ref)) so near-zero reference values do not explode.
REL_FLOOR = 1e-3
#: float32 unit roundoff: the smallest error a float32 reference can be expected to have.
FLOAT32_ROUNDOFF = 2.0**-24
#: Relative half-width of the band around the estimated floor whose elements are kept for the end.
_BAND = 0.02
#: At most this many band elements are kept; beyond that, max_rel takes a second pass.
_BAND_CAP = 1 << 20
#: Elements per dot of the floor estimate (a streaming read: no buffers to keep in cache; fewer calls).
_ESTIMATE_CHUNK = 1 << 20
#: Every this many elements of the first chunk seed the running max_rel the chunks are filtered against.
_SAMPLE_STEP = 64
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
    """Reused float64 work buffers of one chunk's size, a ones vector (sums as BLAS dots) and a mask."""

    def __init__(self, count: int, size: int):
        size = max(1, min(size, CHUNK))
        self.arrays = [np.empty(size, np.float64) for _ in range(count)]
        self.ones = np.ones(size, np.float64)
        self.mask = np.empty(size, bool)

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


@single_threaded_blas
def tensor_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float | int | None]:
    """Cosine, max abs/rel, mean abs, RMSE, SNR (dB) and NaN/Inf counts of ``test`` against ``ref``.

    Shapes must match; the caller checks that first (``parity.compare``: a shape mismatch fails the layer).
    """
    n = ref.size
    dot = ref_sq = test_sq = diff_sq = abs_sum = 0.0
    max_abs = ref_max = 0.0
    nan_ref = inf_ref = nan_test = inf_test = finite = 0
    single = n <= CHUNK  # one chunk: max_rel straight from it at the end, once the floor is known
    estimate = math.nan if single else _floor_estimate(ref)
    rel = None if math.isnan(estimate) else _RelMax(estimate)
    buffers = _Buffers(3, n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for ca, cb in zip(blocks(ref), blocks(test)):
            a, b, d = buffers.load(ca, cb)
            rs, ts = float(a @ a), float(b @ b)
            if not (math.isfinite(rs) and math.isfinite(ts)):
                fa, fb = np.isfinite(a), np.isfinite(b)
                nan_ref += int(np.isnan(a).sum())
                inf_ref += int(np.isinf(a).sum())
                nan_test += int(np.isnan(b).sum())
                inf_test += int(np.isinf(b).sum())
                both = fa & fb
                if not both.all():
                    a, b = a[both], b[both]
                    d = d[:a.size]
                    rs, ts = float(a @ a), float(b @ b)
            finite += a.size
            if a.size == 0:
                continue
            ref_sq += rs
            test_sq += ts
            np.subtract(b, a, out=d)
            dd = float(d @ d)
            diff_sq += dd
            dot += (rs + ts - dd) / 2  # a.b without a fourth dot, as accurate: b - a of float32s is exact in float64
            np.abs(d, out=d)
            abs_sum += float(d @ buffers.ones[:d.size])
            max_abs = max(max_abs, float(d.max()))
            np.abs(a, out=a)
            ref_max = max(ref_max, float(a.max()))
            if rel is not None:
                rel.add(a, d, b, buffers.mask[:a.size])  # b is free: scratch
    ref_rms = math.sqrt(ref_sq / finite) if finite else 0.0
    floor = max(REL_FLOOR * ref_rms, _TINY)
    if single:  # a = |ref| and d = |test - ref| of the only chunk
        max_rel = float(np.divide(d, np.maximum(a, floor, out=a), out=d).max()) if finite else 0.0
    else:
        max_rel = rel.result(floor) if rel is not None else None
        if max_rel is None:
            max_rel = _max_rel(ref, test, floor)
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


class _RelMax:
    """max |d| / max(|a|, floor) over the chunks of one pass, the floor known only at the end.

    ``estimate`` is the floor's estimate; the band ``[lo, hi)`` around it holds the elements
    whose ratio depends on the exact floor. ``big``: the max ratio over ``|a| >= hi`` (exact
    once the floor is <= hi); ``below``: the max ``|d|`` over ``|a| < lo`` (divided by the floor
    at the end); band elements are kept, up to ``_BAND_CAP``.
    """

    def __init__(self, estimate: float):
        self.lo, self.hi = estimate * (1 - _BAND), estimate * (1 + _BAND)
        self.big = self.below = 0.0
        self.band_a: list[np.ndarray] = []
        self.band_d: list[np.ndarray] = []
        self.band_size = 0

    def add(self, a: np.ndarray, d: np.ndarray, scratch: np.ndarray, mask: np.ndarray) -> None:
        """One chunk: ``a`` = |ref|, ``d`` = |test - ref| (float64, finite), ``scratch`` and ``mask`` its size.

        An element contributes at most ``|d| / max(|a|, lo)`` whatever the floor (>= lo) turns out
        to be, so those with ``|d| <= big * max(|a|, lo)`` cannot raise the result: only the rest are divided.
        """
        if not self.big:  # a first lower bound, from a strided sample
            self._divide(a[::_SAMPLE_STEP], d[::_SAMPLE_STEP])
        np.maximum(a, self.lo, out=scratch)
        scratch *= self.big
        if np.greater(d, scratch, out=mask).any():
            beyond = np.flatnonzero(mask)
            self._divide(a[beyond], d[beyond], keep_small=True)

    def _divide(self, a: np.ndarray, d: np.ndarray, keep_small: bool = False) -> None:
        big = a >= self.hi
        if big.any():
            self.big = max(self.big, float((d[big] / a[big]).max()))
        if not keep_small or big.all():
            return
        small_a, small_d = a[~big], d[~big]
        low = small_a < self.lo
        if low.any():
            self.below = max(self.below, float(small_d[low].max()))
            small_a, small_d = small_a[~low], small_d[~low]
        if small_a.size and self.band_size <= _BAND_CAP:
            self.band_a.append(small_a)
            self.band_d.append(small_d)
            self.band_size += small_a.size

    def result(self, floor: float) -> float | None:
        """The exact max_rel for ``floor``, or None when it needs a second pass (floor outside the band, band too big)."""
        if not (self.lo <= floor <= self.hi and self.band_size <= _BAND_CAP):
            return None
        # |a| >= hi >= floor: |d|/|a| exactly; |a| < lo <= floor: |d|/floor; the band in between, element-wise.
        max_rel = max(self.big, self.below / floor)
        if self.band_a:
            band = np.concatenate(self.band_d) / np.maximum(np.concatenate(self.band_a), floor)
            max_rel = max(max_rel, float(band.max()))
        return max_rel


def _max_rel(ref: np.ndarray, test: np.ndarray, floor: float) -> float:
    """max |test - ref| / max(|ref|, floor) over elements finite on both sides (a second pass)."""
    max_rel = 0.0
    buffers = _Buffers(2, ref.size)
    for ca, cb in zip(blocks(ref), blocks(test)):
        a, b = buffers.load(ca, cb)
        both = np.isfinite(a) & np.isfinite(b)
        if not both.all():
            a, b = a[both], b[both]
        if a.size:
            np.subtract(b, a, out=b)
            np.abs(b, out=b)
            np.abs(a, out=a)
            np.maximum(a, floor, out=a)
            max_rel = max(max_rel, float((b / a).max()))
    return max_rel


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
