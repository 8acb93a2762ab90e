"""Drift of a recurrently applied layer, and its "zoom signature" (loss of fine spatial detail).

A block applied many times (as the layers of a deep model, or a denoising loop) can turn a
per-step error that no single-layer check notices into a visible artifact. These pure numpy
functions measure, per step, our error and the reference's own error against a float64 truth
(:func:`parity.metrics.precision_budget`), and the high-frequency spatial energy of our output
relative to the reference's over a ``(..., frames, height, width, channels)`` token grid: a
port that loses precision in the residual stream smooths the picture, so that ratio falls.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from fixtures.inputs import rng
from parity.metrics import precision_budget

#: Spatial axes of a ``(..., frames, height, width, channels)`` grid.
SPATIAL_AXES = (-3, -2)


def structured_grid(seed: int, stream: str, shape: Sequence[int], high: float = 0.5, noise: float = 0.1) -> np.ndarray:
    """A float32 test signal on a ``(..., frames, height, width, channels)`` grid.

    Each channel is a smooth plane wave (at most one cycle over the grid) plus a wave of
    amplitude ``high`` near the spatial Nyquist frequency plus white noise of std ``noise``.
    """
    *lead, frames, height, width, channels = shape
    r = rng(seed, stream)
    t, y, x = np.meshgrid(np.arange(frames) / frames, np.arange(height) / height, np.arange(width) / width, indexing="ij")
    grid = np.stack([t, y, x], axis=-1)[..., None, :]  # (frames, height, width, 1, 3)

    def waves(k_low: Sequence[int], k_high: Sequence[int]) -> np.ndarray:
        cycles = np.stack([r.integers(0, 2, channels)] + [r.integers(lo, hi + 1, channels) for lo, hi in zip(k_low, k_high)], -1)
        return np.cos(2 * np.pi * (grid * cycles).sum(-1) + r.uniform(0, 2 * np.pi, channels))

    smooth = waves((0, 0), (1, 1))
    sharp = waves((height // 2 - 1, width // 2 - 1), (height // 2, width // 2))
    signal = smooth + high * sharp + noise * r.standard_normal((*lead, frames, height, width, channels))
    return signal.astype(np.float32)


def high_frequency_energy(grid: np.ndarray, cutoff: float, axes: Sequence[int] = SPATIAL_AXES) -> float:
    """Mean energy per element of the spatial frequencies above ``cutoff`` (a fraction of Nyquist).

    By Parseval, ``cutoff = 0`` with the DC term excluded is the variance over ``axes``; a
    pure checkerboard has all its energy at the Nyquist frequency (radius 1 along an axis).
    """
    if not 0.0 <= cutoff < math.sqrt(len(axes)):
        raise ValueError(f"cutoff is a fraction of Nyquist in [0, {math.sqrt(len(axes)):.3g}), got {cutoff}")
    spectrum = np.fft.fftn(np.asarray(grid, dtype=np.float64), axes=axes)
    sizes = [grid.shape[a] for a in axes]
    radius = np.sqrt(sum(np.meshgrid(*[(np.fft.fftfreq(n) / 0.5) ** 2 for n in sizes], indexing="ij")))
    mask = radius > cutoff
    shape = [1] * grid.ndim
    for axis, n in zip(axes, sizes):
        shape[axis] = n
    energy = (np.abs(spectrum) ** 2 * mask.reshape(shape)).sum() / math.prod(sizes)
    return float(energy / (grid.size or 1))


def mean_gradient(grid: np.ndarray, axes: Sequence[int] = SPATIAL_AXES) -> float:
    """Mean absolute finite difference along ``axes``: a sharpness measure that needs no FFT."""
    grid = np.asarray(grid, dtype=np.float64)
    return float(np.mean([np.abs(np.diff(grid, axis=a)).mean() for a in axes]))


def error_growth(errors: Sequence[float], floor: float = 0.0) -> list[float]:
    """Each step's value relative to the first step's (floored at ``floor``; NaN if that is 0)."""
    first = max(float(errors[0]), floor) if len(errors) else math.nan
    return [float(e) / first if first else math.nan for e in errors]


def first_exceeding(values: Sequence[float], bound: float) -> int | None:
    """Index of the first value above ``bound`` or not finite; None if all are within."""
    for i, value in enumerate(values):
        if not value <= bound:
            return i
    return None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, in float64."""
    a, b = (np.asarray(x, dtype=np.float64).ravel() for x in (a, b))
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms else float(np.array_equal(a, b))


def first_failing_step(series: dict[str, list[float]], bound: float, level_bound: float | None = None) -> int | None:
    """Index of the first failing step, or None.

    A step fails when its error growth exceeds ``bound``, its HF ratio leaves
    ``[1/bound, bound]``, or (with ``level_bound``) its error ratio itself exceeds
    ``level_bound`` -- the precision budget applied to each step's output, which catches an
    error that is too large from the first step on and so never grows relative to it.
    """
    hf_deviation = [max(r, 1.0 / r) if r > 0 else math.inf for r in series["hf_ratio"]]
    checks = [first_exceeding(series["error_growth"], bound), first_exceeding(hf_deviation, bound)]
    if level_bound is not None:
        checks.append(first_exceeding(series["error_ratio"], level_bound))
    failing = [i for i in checks if i is not None]
    return min(failing) if failing else None


def drift_series(truth: Sequence[np.ndarray], ref: Sequence[np.ndarray], test: Sequence[np.ndarray],
                 to_grid: Callable[[np.ndarray], np.ndarray], cutoff: float) -> dict[str, list[float]]:
    """Per-step curves of a recurrence run three ways (float64 truth, reference and test in the run dtype).

    ``err_mlx`` / ``err_ref``: RMSE against the truth relative to its RMS; ``error_ratio``: the
    precision-budget ratio of the two (floored at float32 roundoff); ``error_growth``: the error
    ratio relative to the first step's (itself floored at 1), i.e. how much faster our error
    compounds than the reference's; ``cosine``: of the test against the reference (what a
    cosine gate would see); ``hf_ratio``: high-frequency energy (above ``cutoff``) of the
    test grid over the reference's; ``hf_ratio_ref``: the reference's over the truth's, for scale.
    """
    if not (len(truth) == len(ref) == len(test)):
        raise ValueError(f"step counts differ: truth {len(truth)}, reference {len(ref)}, test {len(test)}")
    series: dict[str, list[float]] = {k: [] for k in ("err_mlx", "err_ref", "error_ratio", "cosine", "hf_ratio", "hf_ratio_ref")}
    for t, r, m in zip(truth, ref, test):
        budget = precision_budget(t, r, m)
        rms = math.sqrt(float(np.mean(np.square(t, dtype=np.float64)))) or 1.0
        series["err_mlx"].append(budget["err_vs_truth"] / rms)
        series["err_ref"].append(budget["ref_err_vs_truth"] / rms)
        series["error_ratio"].append(budget["budget_ratio"])
        series["cosine"].append(cosine(r, m))
        hf_truth, hf_ref = (high_frequency_energy(to_grid(x), cutoff) for x in (t, r))
        series["hf_ratio"].append(high_frequency_energy(to_grid(m), cutoff) / hf_ref)
        series["hf_ratio_ref"].append(hf_ref / hf_truth)
    series["error_growth"] = error_growth(series["error_ratio"], floor=1.0)
    return series
