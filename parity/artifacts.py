"""Boundary-artifact metrics for chunked video models: pure numpy on video-like arrays ``(N, C, T, H, W)``.

Chunked encoders/decoders and frame-windowed transformers fail in recognisable ways: error that
grows chunk after chunk, jumps in statistics at chunk seams, and spatial patterns at the patch
period (checkerboards). Each function takes a reference and/or a test array; ``boundaries`` are
the first frame index of every chunk (ascending, starting at 0), e.g. ``[0, 1, 2]`` for three
one-frame latent chunks or ``[0, 1, 5, 9]`` for Wan's 1 + 4 + 4 + 4 input frames.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _check_video(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 5:
        raise ValueError(f"{name}: expected a video-like array (N, C, T, H, W), got shape {x.shape}")
    return x


def _check_pair(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, test = _check_video("reference", ref), _check_video("test", test)
    if ref.shape != test.shape:
        raise ValueError(f"reference and test shapes differ: {ref.shape} vs {test.shape}")
    return ref, test


def _check_boundaries(boundaries: Sequence[int], frames: int) -> list[int]:
    b = [int(i) for i in boundaries]
    if not b or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])) or b[-1] >= frames:
        raise ValueError(f"boundaries: expected ascending chunk starts from 0 below {frames} frames, got {list(boundaries)}")
    return b


def _ratio(a: float, b: float) -> float:
    """a / b, with 0/0 = 1 (both sides equal) and x/0 = inf."""
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


# --- error per frame and per chunk ------------------------------------------------------------

def frame_errors(ref: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame: ``rmse`` (T,), ``max_abs`` (T,), and ``rmse_channel`` (C, T)."""
    ref, test = _check_pair(ref, test)
    d = test - ref
    return {
        "rmse": np.sqrt(np.mean(d**2, axis=(0, 1, 3, 4))),
        "max_abs": np.max(np.abs(d), axis=(0, 1, 3, 4)),
        "rmse_channel": np.sqrt(np.mean(d**2, axis=(0, 3, 4))),
    }


def chunk_errors(ref: np.ndarray, test: np.ndarray, boundaries: Sequence[int]) -> dict[str, object]:
    """Per chunk ``rmse`` and ``max_abs`` (lists), and ``growth`` = last chunk's rmse / first chunk's."""
    ref, test = _check_pair(ref, test)
    b = _check_boundaries(boundaries, ref.shape[2]) + [ref.shape[2]]
    d = test - ref
    rmse = [float(np.sqrt(np.mean(d[:, :, s:e] ** 2))) for s, e in zip(b, b[1:])]
    max_abs = [float(np.max(np.abs(d[:, :, s:e]))) for s, e in zip(b, b[1:])]
    return {"rmse": rmse, "max_abs": max_abs, "growth": _ratio(rmse[-1], rmse[0])}


# --- seams ------------------------------------------------------------------------------------

def frame_stats(video: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel, per-frame ``mean`` and ``std`` over batch and pixels, each (C, T)."""
    x = _check_video("video", video)
    return {"mean": x.mean(axis=(0, 3, 4)), "std": x.std(axis=(0, 3, 4))}


def transition_jumps(video: np.ndarray) -> dict[str, np.ndarray]:
    """For each frame transition t -> t+1 (T-1 values): ``mean_jump`` and ``std_jump`` (channel-averaged
    |change| of the per-channel mean / std) and ``frame_diff`` (rms of the frame-to-frame difference)."""
    x = _check_video("video", video)
    stats = frame_stats(x)
    return {
        "mean_jump": np.abs(np.diff(stats["mean"], axis=1)).mean(axis=0),
        "std_jump": np.abs(np.diff(stats["std"], axis=1)).mean(axis=0),
        "frame_diff": np.sqrt(np.mean(np.diff(x, axis=2) ** 2, axis=(0, 1, 3, 4))),
    }


def seam_ratios(video: np.ndarray, boundaries: Sequence[int]) -> dict[str, float]:
    """Mean jump across chunk seams / mean jump between frames inside a chunk, per jump kind.

    ~1 when seams look like any other transition; >> 1 when chunks are stitched visibly.
    NaN when the video has no seam or no inside transition to compare.
    """
    x = _check_video("video", video)
    b = _check_boundaries(boundaries, x.shape[2])
    seam = np.zeros(max(x.shape[2] - 1, 0), dtype=bool)
    seam[[i - 1 for i in b[1:]]] = True  # transition i-1 -> i enters a new chunk
    out = {}
    for kind, jumps in transition_jumps(x).items():
        if not seam.any() or seam.all():
            out[kind] = math.nan
        else:
            out[kind] = _ratio(float(jumps[seam].mean()), float(jumps[~seam].mean()))
    return out


def error_seam_ratio(ref: np.ndarray, test: np.ndarray, boundaries: Sequence[int]) -> float:
    """Mean per-frame rmse of ``test`` vs ``ref`` on frames that start a chunk (after the first chunk)
    / the same on frames inside a chunk. ~1 when error does not care where chunks start; >> 1 when
    it concentrates at chunk starts (lost or wrong causal context). NaN without both kinds of frame."""
    ref, test = _check_pair(ref, test)
    b = _check_boundaries(boundaries, ref.shape[2])
    rmse = frame_errors(ref, test)["rmse"]
    starts = np.zeros(ref.shape[2], dtype=bool)
    starts[b] = True
    seam, inside = rmse[b[1:]], rmse[~starts]
    if not seam.size or not inside.size:
        return math.nan
    return _ratio(float(seam.mean()), float(inside.mean()))


def seam_report(ref: np.ndarray, test: np.ndarray, boundaries: Sequence[int]) -> dict[str, object]:
    """``seam_ratios`` of each side (``ref``, ``test``), ``test_vs_ref`` (the test's ratio over the
    reference's, per jump kind) and ``error_seam_ratio``."""
    ref, test = _check_pair(ref, test)
    r, t = seam_ratios(ref, boundaries), seam_ratios(test, boundaries)
    return {"ref": r, "test": t,
            "test_vs_ref": {k: _ratio(t[k], r[k]) if not math.isnan(r[k] + t[k]) else math.nan for k in r},
            "error_seam_ratio": error_seam_ratio(ref, test, boundaries)}


# --- spatial periodicity ----------------------------------------------------------------------

def _spectrum(x: np.ndarray) -> np.ndarray:
    """Spatial power per (N, C, T) frame, shape (N, C, T, H, W), after removing each frame's best-fit
    plane: a ramp is not periodic across the frame's edges, and would otherwise leak power onto the
    period's frequencies (a smooth gradient projects onto a ``period``-px sawtooth)."""
    h, w = x.shape[3:]
    y, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    x = x - x.mean(axis=(3, 4), keepdims=True)
    for axis in (y, xx):  # the two ramps are orthogonal (centred), so they are fitted one at a time
        norm = float((axis * axis).sum())
        if norm:
            x = x - (x * axis).sum(axis=(3, 4), keepdims=True) / norm * axis
    return np.abs(np.fft.fft2(x, axes=(3, 4))) ** 2


def _fraction(power: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per frame (T,): power on ``mask`` / total power, summed over batch and channels."""
    total = power.sum(axis=(0, 1, 3, 4))
    on = (power * mask).sum(axis=(0, 1, 3, 4))
    return np.divide(on, total, out=np.zeros_like(on), where=total > 0)


def _periodic_mask(h: int, w: int, period: int) -> np.ndarray:
    """Frequencies of a ``period``-px periodic pattern: multiples of size/period in each axis, without DC."""
    fy = {round(a * h / period) % h for a in range(period)}
    fx = {round(a * w / period) % w for a in range(period)}
    mask = np.zeros((h, w))
    mask[np.ix_(sorted(fy), sorted(fx))] = 1.0
    mask[0, 0] = 0.0
    return mask


def _checkerboard_mask(h: int, w: int, period: int) -> np.ndarray:
    """The fundamental of a ``period``-px checkerboard: (±size/period) in both axes (none if it rounds to DC)."""
    mask = np.zeros((h, w))
    fy, fx = round(h / period) % h, round(w / period) % w
    if fy and fx:
        mask[np.ix_([fy, -fy % h], [fx, -fx % w])] = 1.0
    return mask


def periodic_power(video: np.ndarray, period: int) -> np.ndarray:
    """Per frame: fraction of the spatial (non-DC) power on the frequencies of a ``period``-px periodic
    pattern (multiples of size/period in each axis), i.e. how much of the frame repeats every ``period``
    px. Sizes not divisible by ``period`` use the nearest frequency bins."""
    x = _check_video("video", video)
    return _fraction(_spectrum(x), _periodic_mask(*x.shape[3:], period))


def checkerboard(video: np.ndarray, period: int) -> np.ndarray:
    """Per frame: fraction of the spatial power at the fundamental of a ``period``-px checkerboard,
    frequency (±size/period) in both axes (period 2: the Nyquist corner, the classic stride-2 artifact)."""
    x = _check_video("video", video)
    return _fraction(_spectrum(x), _checkerboard_mask(*x.shape[3:], period))


def pattern_power(video: np.ndarray, period: int) -> dict[str, np.ndarray]:
    """``checkerboard`` and ``periodic_power`` (per frame) from one spectrum, and ``spatial``: the total
    they are fractions of, as a mean square per pixel (each frame after removing its mean and best-fit
    plane, averaged over batch and channels). ``sqrt(fraction * spatial)`` is the pattern's RMS amplitude."""
    x = _check_video("video", video)
    n, c, _t, h, w = x.shape
    power = _spectrum(x)
    return {"checkerboard": _fraction(power, _checkerboard_mask(h, w, period)),
            "periodic_power": _fraction(power, _periodic_mask(h, w, period)),
            "spatial": power.sum(axis=(0, 1, 3, 4)) / float(h * w) ** 2 / (n * c)}


def periodicity_report(ref: np.ndarray, test: np.ndarray, period: int) -> dict[str, float]:
    """Frame-averaged ``checkerboard`` and ``periodic_power`` of both sides and their test/ref ratios."""
    ref, test = _check_pair(ref, test)
    out = {}
    for name, fn in (("checkerboard", checkerboard), ("periodic_power", periodic_power)):
        r, t = float(fn(ref, period).mean()), float(fn(test, period).mean())
        out.update({f"{name}_ref": r, f"{name}_test": t, f"{name}_ratio": _ratio(t, r)})
    return out

