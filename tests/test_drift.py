"""Drift and high-frequency metrics on synthetic signals with known answers."""
import math

import numpy as np
import pytest

from parity import drift


def _blur(grid, passes=1):
    """3x3 box filter over height and width (periodic), ``passes`` times."""
    for _ in range(passes):
        grid = sum(np.roll(np.roll(grid, dy, axis=-3), dx, axis=-2) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    return grid


def _grid(seed=0):
    return drift.structured_grid(seed, "test", (1, 2, 8, 8, 16))


def test_cutoff_zero_is_the_spatial_variance():
    grid = _grid().astype(np.float64)
    centred = grid - grid.mean(axis=(-3, -2), keepdims=True)
    assert drift.high_frequency_energy(grid, 0.0) == pytest.approx(np.mean(centred**2), rel=1e-12)


def test_checkerboard_is_all_high_frequency_and_a_plane_wave_none():
    y, x = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    checker = ((-1.0) ** (y + x))[None, :, :, None]
    smooth = np.cos(2 * np.pi * x / 8)[None, :, :, None]
    assert drift.high_frequency_energy(checker, 0.9) == pytest.approx(1.0)
    assert drift.high_frequency_energy(smooth, 0.5) == pytest.approx(0.0, abs=1e-20)
    assert drift.high_frequency_energy(smooth, 0.0) == pytest.approx(0.5)


def test_blur_removes_high_frequencies_and_gradient():
    sharp = _grid()
    blurred = _blur(sharp)
    assert drift.high_frequency_energy(blurred, 0.5) < 0.2 * drift.high_frequency_energy(sharp, 0.5)
    assert drift.mean_gradient(blurred) < 0.5 * drift.mean_gradient(sharp)
    # the smooth part survives: total energy falls far less than the high-frequency energy
    assert drift.high_frequency_energy(blurred, 0.0) > 0.4 * drift.high_frequency_energy(sharp, 0.0)


def test_structured_grid_has_both_bands_and_is_deterministic():
    grid = _grid()
    assert grid.dtype == np.float32 and grid.shape == (1, 2, 8, 8, 16)
    np.testing.assert_array_equal(grid, _grid())
    assert not np.array_equal(grid, _grid(seed=1))
    hf, total = drift.high_frequency_energy(grid, 0.5), drift.high_frequency_energy(grid, 0.0)
    assert 0.05 < hf / total < 0.5


def test_cutoff_out_of_range_is_named():
    with pytest.raises(ValueError, match="fraction of Nyquist"):
        drift.high_frequency_energy(_grid(), 1.5)


def test_error_growth_and_first_exceeding():
    assert drift.error_growth([2.0, 4.0, 8.0]) == [1.0, 2.0, 4.0]
    assert drift.error_growth([0.5, 1.0, 2.0], floor=1.0) == [0.5, 1.0, 2.0]
    assert drift.first_exceeding([1.0, 1.5, 2.5, 3.0], 2.0) == 2
    assert drift.first_exceeding([1.0, math.nan], 2.0) == 1
    assert drift.first_exceeding([1.0, 2.0], 2.0) is None


def _recurrence(blur_from=None, steps=8, noise=1e-3):
    """Truth, a reference with small random error, and a test that from ``blur_from`` on also blurs a little."""
    rng = np.random.default_rng(0)
    truth, ref, test = [], [], []
    state = _grid().astype(np.float64)
    ours = state.copy()
    for step in range(steps):
        state = 0.9 * state + 0.1 * np.roll(state, 1, axis=-1)
        ours = 0.9 * ours + 0.1 * np.roll(ours, 1, axis=-1)
        if blur_from is not None and step >= blur_from:
            ours = 0.8 * ours + 0.2 * _blur(ours)  # the zoom: fine detail lost a little each step
        truth.append(state)
        ref.append(state + noise * rng.standard_normal(state.shape))
        test.append(ours + noise * rng.standard_normal(state.shape))
    return truth, ref, test


def test_drift_series_flat_for_matching_error():
    series = drift.drift_series(*_recurrence(), to_grid=lambda x: x, cutoff=0.5)
    assert max(series["error_ratio"]) < 1.2 and min(series["error_ratio"]) > 0.8
    assert max(series["error_growth"]) < 1.2
    assert all(abs(r - 1) < 0.01 for r in series["hf_ratio"])
    assert drift.first_failing_step(series, 2.0) is None


def test_drift_series_zoom_signature():
    series = drift.drift_series(*_recurrence(blur_from=2), to_grid=lambda x: x, cutoff=0.5)
    hf = series["hf_ratio"]
    assert all(abs(r - 1) < 0.01 for r in hf[:2])
    assert all(b < a for a, b in zip(hf[2:], hf[3:]))  # falling, step after step
    assert series["error_growth"][-1] > 10  # growing error ratio
    step = drift.first_failing_step(series, 2.0)
    assert step == 2  # the first blurred step already exceeds the error budget


def test_first_failing_step_on_high_frequency_loss_alone():
    """The zoom signature without error growth: only the HF check can fail it (at the step it leaves [1/2, 2])."""
    series = {"error_growth": [1.0, 1.0, 1.1, 1.2], "error_ratio": [1.0, 1.0, 1.1, 1.2], "hf_ratio": [1.0, 0.8, 0.45, 0.3]}
    assert drift.first_failing_step(series, 2.0, level_bound=2.0) == 2
    assert drift.first_failing_step({**series, "hf_ratio": [1.0, 1.2, 2.5, 3.0]}, 2.0) == 2  # sharpened just as much


def test_first_failing_step_level_bound_catches_a_constant_excess():
    """A test 4x noisier than the reference on every step: flat, so only the level check fails it."""
    truth, ref, _ = _recurrence()
    rng = np.random.default_rng(1)
    test = [t + 4e-3 * rng.standard_normal(t.shape) for t in truth]
    series = drift.drift_series(truth, ref, test, to_grid=lambda x: x, cutoff=0.5)
    assert all(3 < r < 5 for r in series["error_ratio"]) and max(series["error_growth"]) < 1.2
    assert drift.first_failing_step(series, 2.0) is None
    assert drift.first_failing_step(series, 2.0, level_bound=2.0) == 0
    flat = drift.drift_series(*_recurrence(), to_grid=lambda x: x, cutoff=0.5)
    assert drift.first_failing_step(flat, 2.0, level_bound=2.0) is None


def test_drift_series_rejects_mismatched_runs():
    truth, ref, test = _recurrence()
    with pytest.raises(ValueError, match="step counts differ"):
        drift.drift_series(truth, ref, test[:-1], to_grid=lambda x: x, cutoff=0.5)
