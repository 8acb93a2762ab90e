"""Boundary-artifact metrics separate synthetic videos with an artifact from the same videos without it."""
import math

import numpy as np
import pytest

from parity import artifacts

BOUNDS = [0, 1, 5, 9]  # Wan's chunks of 13 frames: 1 + 4 + 4 + 4


def smooth_video(frames=13, size=32, channels=3, seed=0):
    """Smooth content drifting slowly in space and time, (1, C, T, H, W)."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(size), np.arange(size), indexing="ij")
    phases = np.random.default_rng(seed).uniform(0, 2 * np.pi, channels)
    return np.stack([np.sin(p + (x + 0.5 * y) / 9.0 + 0.1 * t) for p in phases])[None].astype(np.float32)


def checker(size, period):
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.where(((x // (period // 2)) + (y // (period // 2))) % 2, 1.0, -1.0)


def test_frame_and_chunk_errors_locate_the_error():
    ref = smooth_video()
    test = ref.copy()
    test[:, 1, 6] += 0.5  # one channel of one frame, in chunk 2
    errors = artifacts.frame_errors(ref, test)
    assert np.flatnonzero(errors["rmse"]).tolist() == [6]
    assert np.flatnonzero(errors["rmse_channel"][:, 6]).tolist() == [1]
    assert errors["max_abs"][6] == pytest.approx(0.5)
    chunks = artifacts.chunk_errors(ref, test, BOUNDS)
    assert [r > 0 for r in chunks["rmse"]] == [False, False, True, False]


def test_chunk_error_growth():
    ref = smooth_video()
    test = ref.copy()
    for i, (start, stop) in enumerate(zip(BOUNDS, BOUNDS[1:] + [13])):
        test[:, :, start:stop] += 1e-3 * 2**i  # error doubling chunk after chunk
    assert artifacts.chunk_errors(ref, test, BOUNDS)["growth"] == pytest.approx(8.0, rel=1e-4)  # float32 data
    assert artifacts.chunk_errors(ref, ref, BOUNDS)["growth"] == 1.0  # no error anywhere: no growth


def test_seam_ratios_flag_a_jump_at_a_chunk_seam():
    smooth = smooth_video()
    shifted = smooth.copy()
    shifted[:, :, 5:] += 0.5  # the chunks from frame 5 on are offset
    rescaled = smooth.copy()
    rescaled[:, :, 9:] *= 1.5  # the chunk starting at frame 9 has another contrast
    calm = artifacts.seam_ratios(smooth, BOUNDS)
    assert all(0.5 < v < 2 for v in calm.values()), calm
    assert artifacts.seam_ratios(shifted, BOUNDS)["mean_jump"] > 5 * calm["mean_jump"]
    assert artifacts.seam_ratios(shifted, BOUNDS)["frame_diff"] > 2.5 * calm["frame_diff"]
    assert artifacts.seam_ratios(rescaled, BOUNDS)["std_jump"] > 5 * calm["std_jump"]
    report = artifacts.seam_report(smooth, shifted, BOUNDS)
    assert report["test_vs_ref"]["mean_jump"] > 5
    assert report["ref"] == calm


def test_error_concentrated_at_chunk_starts():
    ref = smooth_video()
    noise = np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32)
    everywhere = ref + 1e-3 * noise
    at_starts = ref + 1e-3 * noise * 0.1
    at_starts[:, :, [1, 5, 9]] = ref[:, :, [1, 5, 9]] + 1e-3 * noise[:, :, [1, 5, 9]]
    assert 0.8 < artifacts.error_seam_ratio(ref, everywhere, BOUNDS) < 1.25
    assert artifacts.error_seam_ratio(ref, at_starts, BOUNDS) > 5


def test_seam_ratio_is_nan_without_inside_transitions():
    video = smooth_video(frames=4)
    assert all(math.isnan(v) for v in artifacts.seam_ratios(video, [0, 1, 2, 3]).values())


@pytest.mark.parametrize("period, size", [(8, 32), (2, 4), (2, 6)])
def test_checkerboard_and_periodic_power_flag_a_patch_pattern(period, size):
    clean = smooth_video(frames=2, size=size)
    dirty = clean + 0.2 * checker(size, period)
    for metric in (artifacts.checkerboard, artifacts.periodic_power):
        assert metric(dirty, period).min() > 20 * metric(clean, period).max(), metric.__name__
    report = artifacts.periodicity_report(clean, dirty, period)
    assert report["checkerboard_ratio"] > 20 and report["periodic_power_ratio"] > 20
    assert artifacts.periodicity_report(clean, clean, period)["checkerboard_ratio"] == 1.0


def test_bad_shapes_and_boundaries_are_errors():
    video = smooth_video()
    with pytest.raises(ValueError, match=r"expected a video-like array \(N, C, T, H, W\), got shape \(3, 13, 32, 32\)"):
        artifacts.frame_stats(video[0])
    with pytest.raises(ValueError, match="reference and test shapes differ"):
        artifacts.frame_errors(video, video[:, :, :5])
    with pytest.raises(ValueError, match=r"boundaries: expected ascending chunk starts from 0 below 13 frames, got \[1, 5\]"):
        artifacts.chunk_errors(video, video, [1, 5])
