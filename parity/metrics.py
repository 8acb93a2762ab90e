"""Error metrics between a reference tensor and a tensor under test, computed in float64.

One implementation serves every component. Large tensors are processed in chunks so no
float64 copy of a whole tensor is made; non-finite values are counted per side and left out
of the error sums (any NaN/Inf makes the layer fail, see ``parity.compare``).
"""
from __future__ import annotations

import math

import numpy as np

CHUNK = 1 << 20
#: max_rel divides by max(|ref|, REL_FLOOR * rms(ref)) so near-zero reference values do not explode.
REL_FLOOR = 1e-3
#: float32 unit roundoff: the smallest error a float32 reference can be expected to have.
FLOAT32_ROUNDOFF = 2.0**-24


def _chunks(a: np.ndarray, b: np.ndarray):
    a, b = a.reshape(-1), b.reshape(-1)
    for start in range(0, a.size, CHUNK):
        yield a[start:start + CHUNK].astype(np.float64), b[start:start + CHUNK].astype(np.float64)


def tensor_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float | int | None]:
    """Cosine, max abs/rel, mean abs, RMSE, SNR (dB) and NaN/Inf counts of ``test`` against ``ref``.

    Shapes must match; the caller checks that first (see :func:`shape_mismatch`).
    """
    n = ref.size
    dot = ref_sq = test_sq = diff_sq = abs_sum = 0.0
    max_abs = ref_max = 0.0
    nan_ref = inf_ref = nan_test = inf_test = finite = 0
    for a, b in _chunks(ref, test):
        fa, fb = np.isfinite(a), np.isfinite(b)
        nan_ref += int(np.isnan(a).sum())
        inf_ref += int(np.isinf(a).sum())
        nan_test += int(np.isnan(b).sum())
        inf_test += int(np.isinf(b).sum())
        both = fa & fb
        if not both.all():
            a, b = a[both], b[both]
        finite += a.size
        if a.size == 0:
            continue
        d = b - a
        dot += float(a @ b)
        ref_sq += float(a @ a)
        test_sq += float(b @ b)
        diff_sq += float(d @ d)
        ad = np.abs(d)
        abs_sum += float(ad.sum())
        max_abs = max(max_abs, float(ad.max()))
        ref_max = max(ref_max, float(np.abs(a).max()))
    ref_rms = math.sqrt(ref_sq / finite) if finite else 0.0
    floor = max(REL_FLOOR * ref_rms, np.finfo(np.float64).tiny)
    max_rel = 0.0
    for a, b in _chunks(ref, test):
        both = np.isfinite(a) & np.isfinite(b)
        if both.any():
            max_rel = max(max_rel, float((np.abs(b[both] - a[both]) / np.maximum(np.abs(a[both]), floor)).max()))
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


def rmse_and_rms(truth: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """RMSE of ``test`` against ``truth`` and the RMS of ``truth`` (finite elements only)."""
    diff_sq = truth_sq = 0.0
    count = 0
    for a, b in _chunks(truth, test):
        both = np.isfinite(a) & np.isfinite(b)
        a, b = a[both], b[both]
        d = b - a
        diff_sq += float(d @ d)
        truth_sq += float(a @ a)
        count += a.size
    if count == 0:
        return math.nan, math.nan
    return math.sqrt(diff_sq / count), math.sqrt(truth_sq / count)


def precision_budget(truth: np.ndarray, ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Our error against a float64 truth relative to the reference's own error against it.

    ``budget_ratio = rmse(test, truth) / max(rmse(ref, truth), floor)`` where the floor is
    float32 unit roundoff times rms(truth): when the reference is exact to float32 precision,
    so must we be. A ratio near 1 means we lose no more precision than the reference does.
    """
    err_test, truth_rms = rmse_and_rms(truth, test)
    err_ref, _ = rmse_and_rms(truth, ref)
    floor = max(FLOAT32_ROUNDOFF * truth_rms, np.finfo(np.float64).tiny)
    return {
        "err_vs_truth": err_test,
        "ref_err_vs_truth": err_ref,
        "budget_ratio": err_test / max(err_ref, floor),
    }
