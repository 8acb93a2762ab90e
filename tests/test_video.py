"""Video comparison (parity.video): each fault is flagged where it is, a clean copy is not, inputs are checked,
the result is strict JSON and the page is self-contained and escaped. Test videos are written here, never downloaded."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from parity import artifacts, video, video_page  # noqa: E402

FRAMES, SIZE, CHUNK = 24, 64, 8


def content(frames: int = FRAMES, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) float32 on [0, 1]: coloured waves drifting over time under a textured field moving 1 px a
    frame (detail at every scale, motion inside chunks, no 8 px periodicity of its own)."""
    rng = np.random.default_rng(seed)
    field = cv2.GaussianBlur(rng.random((size + frames + 8, size + frames + 8, 3)), (0, 0), 1.0)
    field = (field - field.mean()) / field.std()
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    out = []
    for t in range(frames):
        waves = np.stack([0.5 + 0.2 * np.sin(2 * np.pi * (x + 0.5 * y + 2 * t + 20 * k) / size * (1 + 0.5 * k))
                          for k in range(3)], -1)
        out.append(np.clip(waves + 0.12 * field[t:t + size, t // 2:t // 2 + size], 0.02, 0.98))
    return np.array(out, dtype=np.float32)


def noisy(frames: np.ndarray, std: float = 1 / 255, seed: int = 1) -> np.ndarray:
    return np.clip(frames + np.random.default_rng(seed).normal(0, std, frames.shape), 0, 1).astype(np.float32)


def checker(size: int = SIZE, period: int = 8) -> np.ndarray:
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.where(((x // (period // 2)) + (y // (period // 2))) % 2, 1.0, -1.0)[..., None]


def write_avi(path, frames: np.ndarray):
    """Motion-JPEG at quality 100 through OpenCV's own writer (built into every OpenCV, no FFmpeg needed)."""
    writer = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), 8,
                             (frames.shape[2], frames.shape[1]), [cv2.VIDEOWRITER_PROP_QUALITY, 100])
    assert writer.isOpened()
    for frame in frames:
        writer.write(np.round(frame * 255).astype(np.uint8)[..., ::-1])
    writer.release()
    return path


@pytest.fixture(scope="module")
def ref() -> np.ndarray:
    return content()


def kinds(result, prefix=""):
    return {f["kind"] for f in result["findings"] if f["kind"].startswith(prefix)}


def frames_of(result, kind):
    return sorted(i for f in result["findings"] if f["kind"] == kind for i in f["frames"])


# --- the four required behaviours ----------------------------------------------------------------

def test_clean_copy_with_noise_passes_through_video_files(tmp_path, ref):
    result = video.analyse(write_avi(tmp_path / "ref.avi", ref), write_avi(tmp_path / "ours.avi", noisy(ref)),
                           chunk_frames=CHUNK)
    assert result["verdict"] == "PASS", result["findings"]
    assert result["findings"] == []
    s = result["summary"]
    assert s["ssim_min"] > 0.95 and s["psnr_db_min"] > 30
    assert s["sharpness_ratio_min"] > 0.9 and s["gradient_ratio_min"] > 0.9
    assert result["inputs"]["ours"]["source"] == "video" and result["boundaries"] == [0, 8, 16]


def test_clean_copy_with_noise_passes_as_arrays(ref):
    result = video.analyse(ref, noisy(ref), chunk_frames=CHUNK)
    assert result["verdict"] == "PASS", result["findings"]
    assert 47 < result["summary"]["psnr_db_mean"] < 49  # std 1/255 noise: 48.1 dB less a little clipping


def test_clean_copy_through_mp4_passes(tmp_path, ref):
    path = tmp_path / "ours.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8, (SIZE, SIZE))
    if not writer.isOpened():
        pytest.skip("this OpenCV build writes no mp4v")
    for frame in noisy(ref):
        writer.write(np.round(frame * 255).astype(np.uint8)[..., ::-1])
    writer.release()
    np.save(tmp_path / "ref.npy", ref)
    result = video.analyse(tmp_path / "ref.npy", path, chunk_frames=CHUNK)
    assert result["verdict"] == "PASS", result["findings"]


def test_brightness_jump_at_a_seam_is_flagged_at_that_seam(ref):
    ours = noisy(ref)
    ours[8:] = np.clip(ours[8:] + 0.03, 0, 1)  # chunks 2 and 3 come out brighter: one step, at seam 7 -> 8
    result = video.analyse(ref, ours, chunk_frames=CHUNK)
    assert result["verdict"] == "FAIL"
    seam = [f for f in result["findings"] if f["kind"] == "seam_brightness"]
    assert [f["frames"] for f in seam] == [[7, 8]]
    assert seam[0]["value"] > seam[0]["limit"] and seam[0]["value"] == pytest.approx(0.03, abs=0.002)
    assert all(f["frames"] != [15, 16] for f in result["findings"])
    assert result["summary"]["flagged_seams"] == [8]
    assert [r["flagged"] for r in result["seam_rows"]] == [["seam_brightness"], []]


def test_small_brightness_jump_is_flagged_at_the_seam_only(ref):
    """5 levels: under the per-frame brightness limit (6), but a step no inside transition comes near."""
    ours = noisy(ref)
    ours[16:] = np.clip(ours[16:] + 0.02, 0, 1)
    result = video.analyse(ref, ours, chunk_frames=CHUNK)
    assert [(f["kind"], f["frames"]) for f in result["findings"]] == [("seam_brightness", [15, 16])]


def test_checkerboard_is_flagged_in_exactly_those_frames(tmp_path, ref):
    bad = [3, 4, 13, 20]
    ours = noisy(ref)
    ours[bad] = np.clip(ours[bad] + 0.02 * checker(), 0, 1)  # +-5 levels, 4 px squares
    result = video.analyse(write_avi(tmp_path / "ref.avi", ref), write_avi(tmp_path / "ours.avi", ours),
                           chunk_frames=CHUNK)
    assert result["verdict"] == "FAIL"
    assert frames_of(result, "checkerboard") == bad
    pf = result["per_frame"]
    clean = [i for i in range(FRAMES) if i not in bad]
    limit = result["limits"]["checkerboard_factor"]["value"]
    assert min(pf["checkerboard_concentration"][i] for i in bad) > 4 * limit
    assert max(pf["checkerboard_concentration"][i] for i in clean) < limit / 2
    assert not kinds(result, "seam_")


def test_growing_blur_is_flagged_from_where_it_becomes_significant(ref):
    ours = noisy(ref)
    sigma = {t: 0.1 * (t - 9) for t in range(10, FRAMES)}  # 0.1 px at frame 10 ... 1.4 px at frame 23
    for t, s in sigma.items():
        ours[t] = cv2.GaussianBlur(ours[t], (0, 0), s)
    result = video.analyse(ref, ours, chunk_frames=CHUNK)
    assert result["verdict"] == "FAIL"
    pf = result["per_frame"]
    for kind, series, limit in (("sharpness_loss", "sharpness_ratio", "sharpness_ratio"),
                                ("gradient_loss", "gradient_ratio", "gradient_ratio")):
        flagged = frames_of(result, kind)
        first = flagged[0]
        assert flagged == list(range(first, FRAMES))  # from onset to the end, nothing before
        below = [i for i, v in enumerate(pf[series]) if v < result["limits"][limit]["value"]]
        assert below[0] == first
        assert 0.3 <= sigma[first] <= 0.6, (kind, first)  # a blur you can see, not before
        assert all(pf[series][i] > 0.95 for i in range(10))  # untouched frames stay at ~1


def test_frame_metrics_respond_to_what_they_measure(ref):
    darker = ref * 0.8  # less bright and less contrast, same structure
    m = video.frame_metrics(ref, darker)
    assert np.all(m["brightness_offset"] < -0.05) and np.all(m["contrast_offset"] < 0)
    assert np.all(m["ssim"] > 0.9)
    assert np.allclose(m["sharpness_ratio"], 0.64, rtol=1e-6) and np.allclose(m["gradient_ratio"], 0.64, rtol=1e-6)
    tinted = ref.copy()
    tinted[..., 2] = np.clip(tinted[..., 2] + 0.05, 0, 1)
    m = video.frame_metrics(ref, tinted)
    assert np.all(m["colour_offset"] > 0.02)
    assert video.ssim(ref[0], ref[0]) == pytest.approx(1.0)


def test_pattern_power_is_the_artifacts_shares_from_one_spectrum():
    e = 0.01 * checker()[None, None, None, ..., 0] * np.ones((1, 3, 2, 1, 1))
    rng = np.random.default_rng(0)
    for v in (e, rng.standard_normal((1, 3, 2, 40, 56)), e + 0.001 * rng.standard_normal(e.shape)):
        shares = artifacts.pattern_power(v, 8)
        assert np.array_equal(shares["checkerboard"], artifacts.checkerboard(v, 8))
        assert np.array_equal(shares["periodic_power"], artifacts.periodic_power(v, 8))
    shares = artifacts.pattern_power(e, 8)
    amplitude = np.sqrt(shares["checkerboard"] * shares["spatial"])
    assert np.allclose(shares["spatial"], 1e-4)
    assert np.all((amplitude > 0.8 * 0.01) & (amplitude < 0.01))  # the fundamental of a +-0.01 square wave


# --- inputs --------------------------------------------------------------------------------------

def test_npy_layouts_and_ranges(tmp_path, ref):
    as_uint8 = np.round(ref * 255).astype(np.uint8)
    cases = {
        "thwc_uint8.npy": as_uint8,
        "thwc_unit.npy": ref,
        "thwc_signed.npy": ref * 2 - 1,
        "ncthw_signed.npy": (ref * 2 - 1).transpose(3, 0, 1, 2)[None],
        "grey.npy": ref[..., :1],
    }
    for name, array in cases.items():
        np.save(tmp_path / name, array)
        frames = video.load_video(tmp_path / name)
        assert frames.dtype == np.float32 and frames.shape == (FRAMES, SIZE, SIZE, array.shape[-1] if name == "grey.npy" else 3)
        expected = ref[..., :1] if name == "grey.npy" else ref
        assert np.abs(frames - expected).max() <= 0.5 / 255 + 1e-6, name
    result = video.analyse(tmp_path / "thwc_uint8.npy", tmp_path / "ncthw_signed.npy", boundaries=[8, 16])
    assert result["verdict"] == "PASS" and result["boundaries"] == [0, 8, 16]
    assert result["inputs"]["ours"]["layout"] == "(N, C, T, H, W)" and result["inputs"]["ours"]["range"] == "[-1, 1]"


def test_video_files_load_as_rgb(tmp_path):
    frames = np.zeros((4, 32, 32, 3), np.float32)
    frames[..., 0] = 0.9  # red
    loaded = video.load_video(write_avi(tmp_path / "red.avi", frames))
    assert loaded.shape == (4, 32, 32, 3)
    assert loaded[..., 0].mean() > 0.8 and loaded[..., 2].mean() < 0.1


def _raises_naming(path_text, fn, *args, match=None, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert path_text in str(info.value)
    if match:
        assert re.search(match, str(info.value)), str(info.value)


def test_bad_inputs_raise_naming_the_file(tmp_path, ref):
    _raises_naming("missing.mp4", video.load_video, tmp_path / "missing.mp4", match="no such file")
    (tmp_path / "notes.mp4").write_text("not a video")
    _raises_naming("notes.mp4", video.load_video, tmp_path / "notes.mp4", match="cannot open|no frame")
    _raises_naming(str(tmp_path), video.load_video, tmp_path, match="directory")
    bad = {
        "flat.npy": (np.zeros((64, 64)), "2-D"),
        "rgba.npy": (np.zeros((4, 32, 32, 4), np.float32), "4 channels"),
        "batch.npy": (np.zeros((2, 3, 4, 32, 32), np.float32), "one video"),
        "range.npy": (np.full((4, 32, 32, 3), 3.0, np.float32), r"span \[3, 3\]"),
        "nan.npy": (np.full((4, 32, 32, 3), np.nan, np.float32), "NaN"),
        "ints.npy": (np.zeros((4, 32, 32, 3), np.int64), "dtype int64"),
        "tiny.npy": (np.zeros((4, 8, 8, 3), np.float32), "at least"),
    }
    for name, (array, match) in bad.items():
        np.save(tmp_path / name, array)
        _raises_naming(name, video.load_video, tmp_path / name, match=match)
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _raises_naming("pickled.npy", video.load_video, tmp_path / "pickled.npy")

    np.save(tmp_path / "short.npy", ref[:20])
    np.save(tmp_path / "ref.npy", ref)
    _raises_naming("short.npy", video.analyse, tmp_path / "ref.npy", tmp_path / "short.npy", match="20 frames")
    np.save(tmp_path / "small.npy", ref[:, :32, :48])
    _raises_naming("small.npy", video.analyse, tmp_path / "ref.npy", tmp_path / "small.npy", match="48x32")
    _raises_naming("a.mp4", video.analyse, ref, ref[:5], names=["r.mp4", "a.mp4"], match="5 frames")


def test_chunk_boundaries():
    assert video.chunk_boundaries(24, chunk_frames=8) == [0, 8, 16]
    assert video.chunk_boundaries(13, boundaries=[1, 5, 9]) == [0, 1, 5, 9]  # Wan's 1 + 4k, 0 added
    assert video.chunk_boundaries(24) == [0]
    assert video.chunk_boundaries(5, chunk_frames=8) == [0]
    for kwargs in ({"chunk_frames": 0}, {"chunk_frames": 8, "boundaries": [0, 8]}, {"boundaries": [0, 30]},
                   {"boundaries": [8, 4]}):
        with pytest.raises(ValueError):
            video.chunk_boundaries(24, **kwargs)


# --- result and page -----------------------------------------------------------------------------

def test_result_is_strict_json_with_reasons_for_nulls(tmp_path, ref):
    result = video.analyse(ref, ref, chunk_frames=CHUNK)  # identical: PSNR is infinite
    assert result["verdict"] == "PASS"
    assert result["per_frame"]["psnr_db"] == [None] * FRAMES
    assert result["nulls"]["per_frame.psnr_db"] == {"count": FRAMES, "reason": video.NULL_REASONS["psnr_db"]}
    text = json.dumps(result, allow_nan=False)
    path = video.write_result(tmp_path, result)
    assert json.loads(path.read_text()) == json.loads(text)
    single = video.analyse(ref[:1], ref[:1])  # no transition at all: still strict
    json.dumps(single, allow_nan=False)
    assert single["seam_rows"] == [] and single["seam_ratios"] is None


def test_page_is_self_contained_and_escapes_names(tmp_path, ref):
    evil = '"><img src=x onerror=alert(1)>'
    ours = noisy(ref)
    ours[[5]] = np.clip(ours[[5]] + 0.02 * checker(), 0, 1)
    ours[16:] = np.clip(ours[16:] + 0.03, 0, 1)
    ref_path, our_path = write_avi(tmp_path / "ref.avi", ref), write_avi(tmp_path / f"{evil}.avi", ours)
    result = video.analyse(ref_path, our_path, chunk_frames=CHUNK)
    assert result["verdict"] == "FAIL" and result["inputs"]["ours"]["path"].endswith(f"{evil}.avi")
    page = video_page.write_page(result, tmp_path / "out", ref_path, our_path)
    html = page.read_text()
    assert page.name == "video.html" and html.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert not re.search(r"https?://", html)
    sources = re.findall(r'\bsrc="([^"]*)"', html)
    assert len(sources) > 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in html and "@import" not in html
    assert evil not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<script>") == 1  # the base template's table sorter only
    assert "seam_brightness" in html and "checkerboard" in html and 'class="banner FAIL"' in html
    # the page also renders from the stored JSON (nulls instead of numbers)
    video_page.write_page(json.loads(video.write_result(tmp_path / "out", result).read_text()), tmp_path / "again",
                          video.load_video(ref_path), video.load_video(our_path))
    with pytest.raises(ValueError, match="as analysed"):
        video_page.write_page(result, tmp_path / "out", ref[:4], ours[:4])


def test_page_names_the_videos_by_what_tells_them_apart():
    assert video_page.short_names("/r/run/ref/frames.npy", "/r/run/mlx/frames.npy") == ("ref/frames.npy", "mlx/frames.npy")
    assert video_page.short_names("/x/a.mp4", "/x/a.mp4") == ("a.mp4", "a.mp4")
    assert video_page.short_names("a.mp4", "/y/b.mp4") == ("a.mp4", "/y/b.mp4")


def test_large_frames_get_a_full_resolution_crop_where_the_error_is():
    diff = np.zeros((240, 320, 3), np.float32)
    diff[150:170, 40:60] = 0.1 * checker(20)  # a patch of checkerboard far from the centre: the crop centres on it
    assert video_page._crop(diff[:64, :64], 4) == {}  # small frames are shown whole
    crop = video_page._crop(diff, 4)
    assert crop["crop_at"] == "x 17–80, y 127–190" and crop["crop"]["src"].startswith("data:image/png;base64,")
