"""Statistics of a tensor kept instead of the tensor (stats-only layers of streaming runs, bundles).

Shape, dtype, finite min/max/mean/std, norm, NaN/Inf counts and a small deterministic sample:
the same element indices on every side and machine, so two sides' samples compare element-wise.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from parity.metrics import blocks

#: Elements kept per stats-only tensor.
SAMPLE_SIZE = 1024
#: How the sample's element indices are chosen; both sides of a comparison must agree on it.
SAMPLE_METHOD = "golden-ratio-v1"
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0

def sample_indices(numel: int, size: int = SAMPLE_SIZE) -> np.ndarray:
    """Sorted flat indices of the sample of a tensor with ``numel`` elements.

    All of them when ``numel <= size``; otherwise ``floor(frac(j * golden) * numel)`` for
    ``j < size``: spread over the whole tensor without aliasing on channel strides, and plain
    IEEE arithmetic, so every machine and numpy version picks the same elements.
    """
    if numel <= size:
        return np.arange(numel, dtype=np.int64)
    j = np.arange(size, dtype=np.float64)
    return np.unique((np.mod(j * _GOLDEN, 1.0) * numel).astype(np.int64).clip(0, numel - 1))


def take_sample(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``array.flat[indices]`` as float64 without copying a non-contiguous array."""
    if array.ndim == 0:
        return np.asarray(array, np.float64).reshape(-1)[indices]
    if array.flags.c_contiguous:
        return array.reshape(-1)[indices].astype(np.float64)
    return np.asarray(array[np.unravel_index(indices, array.shape)], np.float64)


def tensor_stats(array: np.ndarray, dtype: str | None = None, sample_size: int = SAMPLE_SIZE) -> dict[str, Any]:
    """Shape, dtype, finite min/max/mean/std (population), norm, NaN/Inf counts and a sample.

    One chunked pass in float64 (mean and variance merged per chunk, Chan et al.), no copy of
    the whole tensor.
    """
    count = 0
    mean = m2 = sum_sq = 0.0
    low, high = math.inf, -math.inf
    nan = inf = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for chunk in blocks(array):
            x = chunk.astype(np.float64)
            s = float(x.sum())
            if not math.isfinite(s):
                finite = np.isfinite(x)
                nan += int(np.isnan(x).sum())
                inf += int(np.isinf(x).sum())
                x = x[finite]
                s = float(x.sum())
            if x.size == 0:
                continue
            m = x.size
            chunk_mean = s / m
            centred = x - chunk_mean
            chunk_m2 = float(centred @ centred)
            delta = chunk_mean - mean
            total = count + m
            mean += delta * m / total
            m2 += chunk_m2 + delta * delta * count * m / total
            count = total
            sum_sq += float(x @ x)
            low, high = min(low, float(x.min())), max(high, float(x.max()))
    indices = sample_indices(array.size, sample_size)
    return {
        "shape": list(array.shape),
        "dtype": dtype or str(array.dtype),
        "numel": int(array.size),
        "finite": count,
        "min": low if count else None,
        "max": high if count else None,
        "mean": mean if count else None,
        "std": math.sqrt(m2 / count) if count else None,
        "norm": math.sqrt(sum_sq),
        "rms": math.sqrt(sum_sq / count) if count else None,
        "nan": nan,
        "inf": inf,
        "sample_method": SAMPLE_METHOD,
        "sample": [float(v) for v in take_sample(array, indices)],
    }
