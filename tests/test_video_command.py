"""``parity video REF OURS`` through the real command line (``parity.commands.main``): each synthetic fault is
flagged in the right frames or seam, a clean copy with small noise is not, bad inputs exit 2 with one line naming
the file. Inputs are .npy stacks written here (no codec in the loop: tests/test_video.py covers video files)."""
from __future__ import annotations

import json

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from parity.commands import main  # noqa: E402
from test_video import CHUNK, FRAMES, checker, content, noisy  # noqa: E402


@pytest.fixture(scope="module")
def ref_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "ref.npy"
    np.save(path, content())
    return path


def parity_video(tmp_path, ref_path, ours, *options):
    """Run ``parity video`` on REF and OURS (an array, saved as ours.npy); returns (exit code, video.json, stdout)."""
    our_path = tmp_path / "ours.npy"
    np.save(our_path, ours)
    code = main(["video", str(ref_path), str(our_path), "--out", str(tmp_path / "out"), "--quiet", *options])
    result_file = tmp_path / "out" / "video.json"
    return code, json.loads(result_file.read_text()) if result_file.exists() else None


def flagged(result, kind):
    return sorted(i for f in result["findings"] if f["kind"] == kind for i in f["frames"])


def test_clean_copy_with_small_noise_passes(tmp_path, ref_path, capsys):
    code, result = parity_video(tmp_path, ref_path, noisy(content()), "--chunk-frames", str(CHUNK))
    printed = capsys.readouterr().out
    assert code == 0 and result["verdict"] == "PASS" and result["findings"] == []
    assert printed.startswith("PASS") and "seams (first frame of each chunk): 8, 16" in printed
    assert f"HTML: {tmp_path / 'out' / 'video.html'}" in printed and (tmp_path / "out" / "video.html").exists()


def test_seam_brightness_jump_is_flagged_at_that_seam(tmp_path, ref_path, capsys):
    ours = noisy(content())
    ours[16:] = np.clip(ours[16:] + 0.02, 0, 1)  # the last chunk 5 levels brighter: under the per-frame limit
    code, result = parity_video(tmp_path, ref_path, ours, "--boundaries", "8,16")
    assert code == 1
    assert [(f["kind"], f["frames"]) for f in result["findings"]] == [("seam_brightness", [15, 16])]
    assert "seam_brightness: seam 2 (frame 15 -> 16)" in capsys.readouterr().out


def test_checkerboard_is_flagged_in_exactly_those_frames(tmp_path, ref_path):
    bad = [3, 4, 13, 20]
    ours = noisy(content())
    ours[bad] = np.clip(ours[bad] + 0.02 * checker(), 0, 1)  # +-5 levels, 4 px squares: an 8 px period
    code, result = parity_video(tmp_path, ref_path, ours, "--chunk-frames", str(CHUNK))
    assert code == 1
    assert flagged(result, "checkerboard") == bad
    assert result["summary"]["flagged_seams"] == []


def test_growing_blur_is_flagged_from_its_onset_to_the_end(tmp_path, ref_path):
    ours = noisy(content())
    for t in range(12, FRAMES):
        ours[t] = cv2.GaussianBlur(ours[t], (0, 0), 0.6 + 0.1 * (t - 12))  # 0.6 px at frame 12 ... 1.7 px at 23
    code, result = parity_video(tmp_path, ref_path, ours)
    assert code == 1
    assert flagged(result, "sharpness_loss") == flagged(result, "gradient_loss") == list(range(12, FRAMES))
    ratios = result["per_frame"]["sharpness_ratio"]
    assert all(ratios[t] > 0.95 for t in range(12)) and ratios[23] < ratios[18] < ratios[12]  # it grows


def test_bad_inputs_exit_2_naming_the_file(tmp_path, ref_path, capsys):
    def error(*args):
        try:
            code = main(["video", *map(str, args), "--quiet"])
        except SystemExit as usage:  # argparse's own checks
            code = usage.code
        assert code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(lines) and lines[-1].startswith(("parity: error: ", "parity video: error: "))
        if lines[-1].startswith("parity: error: "):
            assert len(lines) == 1, lines  # one line, nothing before it
        return lines[-1]

    missing = tmp_path / "missing.mp4"
    assert str(missing) in error(ref_path, missing) and "no such file" in error(ref_path, missing)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    assert str(text) in error(ref_path, text, "--out", tmp_path / "o")
    short = tmp_path / "short.npy"
    np.save(short, content()[:20])
    assert f"{short} has 20 frames" in error(ref_path, short, "--out", tmp_path / "o")
    rgba = tmp_path / "rgba.npy"
    np.save(rgba, np.zeros((4, 32, 32, 4), np.float32))
    assert str(rgba) in error(rgba, ref_path, "--out", tmp_path / "o")
    assert "boundaries [8, 99]" in error(ref_path, ref_path, "--boundaries", "8,99", "--out", tmp_path / "o")
    assert "--boundaries" in error(ref_path, ref_path, "--boundaries", "eight")
    assert "not allowed with" in error(ref_path, ref_path, "--boundaries", "8", "--chunk-frames", "8")
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert f"--out {a_file}: is a file" in error(ref_path, ref_path, "--out", a_file)
    assert not (tmp_path / "o").exists()  # nothing written for bad input
