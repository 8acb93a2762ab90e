"""Compare a port's output video with the reference's, frame by frame and across chunk seams.

Ports break in ways a tensor comparison can miss and a person sees at once in the video: grey
frames, 8 px checkerboards, colour drift, brightness jumps where chunks meet, a slow blur
("zoom-in") that compounds chunk after chunk. :func:`analyse` measures each of these on OURS
against REF and judges them with stated limits (:data:`LIMITS`); :func:`write_result` and
:func:`write_page` store the result as strict JSON and a self-contained HTML page.

Inputs (:func:`load_video`): any container OpenCV reads (``.mp4``, ``.avi``, ``.mkv``, ...;
colour frames come back as RGB) or a ``.npy`` frame stack, loaded with ``allow_pickle=False``:

- ``(T, H, W, C)`` with C = 1 or 3: ``uint8`` (divided by 255) or float. A float stack is
  taken as [0, 1] when its minimum is >= 0, else as [-1, 1] (mapped by (x + 1) / 2);
- ``(N, C, T, H, W)`` with N = 1 and C = 1 or 3, like the VAE decoder's output: a float
  stack is always taken as [-1, 1] (the decoder's clamped range), ``uint8`` as 0..255.

``value_range`` overrides the float rule. Float values may overshoot their range by
:data:`RANGE_SLACK` (then they are clipped); further out, NaN/Inf, any other shape or dtype,
or fewer than :data:`MIN_SIDE` pixels a side is a ``ValueError`` naming the file.

Every metric is on [0, 1] frames. Spatial measures (sharpness, gradients, centre/periphery)
use Rec. 601 luma; brightness and contrast are per channel, as in
:func:`parity.artifacts.frame_stats`; checkerboard and periodic power are
:func:`parity.artifacts.checkerboard` / :func:`parity.artifacts.periodic_power` at the VAE
stride (:data:`PERIOD`).

Judging (:func:`judge`): every frame and every seam is held against :data:`LIMITS`, each with
the reason for its value (mostly: relative to the reference's own value in the same frame, and
for seams to the variation between frames inside the chunks, with a floor in 8-bit levels below
which nothing can show). A breach is a finding ``{kind, frames, value, limit, message}``: one per
run of consecutive frames (value and limit at the run's worst frame) or one per seam
(``frames = [s - 1, s]``). Any finding makes the verdict FAIL.

Wiring of ``parity video REF OURS [--chunk-frames N] [--out DIR]``::

    ref, ours = video.load_video(REF), video.load_video(OURS)      # ValueError -> exit 2
    result = video.analyse(ref, ours, chunk_frames=N, names=[REF, OURS])
    video.write_result(DIR, result); video.write_page(result, DIR, ref, ours)
    exit 0 if result["verdict"] == "PASS" else 1
"""
from __future__ import annotations

import base64
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from parity import artifacts
from parity.dumps import write_json, write_text
from parity.vocab import InputError, load_npy

#: The VAE's spatial stride: the period of the checkerboard a broken decoder paints.
PERIOD = 8
#: One level of an 8-bit video, on [0, 1] frames.
LEVEL = 1.0 / 255.0
#: Rec. 601 luma weights (R, G, B), as OpenCV's RGB -> grey conversion.
LUMA = (0.299, 0.587, 0.114)
#: How far a float frame stack may leave its range (rounding in a decoder's last ops) before it is an error.
RANGE_SLACK = 1e-3
#: Smallest frame side: SSIM's 11 px window and two periods of the 8 px pattern must fit.
MIN_SIDE = 16
#: Frames per batch for the FFT-based measures (bounds their float64 working memory).
FFT_BATCH = 8
#: The page written by :func:`write_page`, the JSON by :func:`write_result`.
PAGE_NAME = "video.html"
RESULT_NAME = "video.json"

#: SSIM constants of Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, range 1.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03

#: Each limit with the reason for its value. Levels are of an 8-bit video (1/255 on [0, 1]).
LIMITS: dict[str, dict[str, Any]] = {
    "sharpness_ratio": {
        "value": 0.75,
        "reason": "Blur / 'zoom': our variance of the Laplacian over the reference's, per frame. Additive noise "
                  "only raises it (white noise of std s adds 20 s^2), so only a fall is judged; below 0.75 a quarter "
                  "of the finest-detail energy is gone. Measured on the test video: noise, MJPEG and mp4v round "
                  "trips >= 0.98; a Gaussian blur of sigma 0.4 px 0.84, 0.5 px 0.61. Frames whose reference has no detail (variance below "
                  "sharpness_floor) are not judged.",
    },
    "gradient_ratio": {
        "value": 0.8,
        "reason": "Blur / 'zoom': our Sobel gradient energy over the reference's, per frame. Noise only raises it "
                  "(adds 24 s^2); it falls slower than the Laplacian under blur, so its limit is closer to 1 (measured: round trips "
                  ">= 0.98; sigma 0.4 px 0.91, 0.5 px 0.78). "
                  "Frames whose reference has no detail (energy below gradient_floor) are not judged.",
    },
    "sharpness_floor": {
        "value": 16 * 20 / 12 * LEVEL**2,
        "reason": "A reference frame with less Laplacian variance than 16x that of 8-bit rounding noise "
                  "(20/12 level^2) has no detail to lose.",
    },
    "gradient_floor": {
        "value": 16 * 24 / 12 * LEVEL**2,
        "reason": "As sharpness_floor, for the Sobel energy of rounding noise (24/12 level^2).",
    },
    "checkerboard_factor": {
        "value": 16.0,
        "reason": f"An {PERIOD} px checkerboard in our error (ours - reference): the error's share of spatial power at "
                  "the checkerboard frequency over max(the reference's own share there, the share of white noise "
                  "4/(H*W)). A port's honest error looks like the picture or like noise; 16x more concentrated on "
                  "that one frequency is a pattern the port painted. Measured: noise, MJPEG and mp4v round trips "
                  "<= ~4, a 2.5-level checkerboard ~340.",
    },
    "periodic_factor": {
        "value": 8.0,
        "reason": f"Any {PERIOD} px periodic pattern in our error (grids, tile or block seams; a checkerboard counts "
                  f"too): as checkerboard_factor on all multiples of size/{PERIOD} in both axes, against white noise's "
                  f"{PERIOD ** 2 - 1}/(H*W). Measured: round trips <= ~1.5, a 2.5-level checkerboard ~57.",
    },
    "pattern_amplitude": {
        "value": 1 * LEVEL,
        "reason": "and the pattern's RMS amplitude in our error is at least 1 level: below that it cannot show in "
                  "an 8-bit video.",
    },
    "brightness_offset": {
        "value": 6 * LEVEL,
        "reason": "Mean over channels of (our channel mean - the reference's), per frame: 6 levels (2.4 %). A video "
                  "writer's colour conversion alone (RGB -> YUV 4:2:0 -> RGB) moves channel means by a few levels "
                  "(measured: an OpenCV mp4v round trip -2.6 / -1.3 / -2.8 levels on R / G / B, up to -4.5 on flat "
                  "frames), so only a shift beyond that is ours.",
    },
    "colour_offset": {
        "value": 6 * LEVEL,
        "reason": "Largest per-channel offset left after removing the common (brightness) offset: a colour cast, "
                  "judged like brightness_offset (writer conversions measured at up to ~2 levels).",
    },
    "contrast_offset": {
        "value_rule": "max(0.15 * reference contrast, 3 levels)",
        "reason": "Mean over channels of (our channel std - the reference's), per frame: grey / washed-out frames "
                  "fall, a broken normalisation rises. 15 % of the reference's own contrast (an mp4v round trip "
                  "of the test video lowers it by ~6 %), but at least 3 levels, so that noise or a codec on a "
                  "nearly flat frame is not a finding.",
    },
    "centre_periphery_offset": {
        "value": 3 * LEVEL,
        "reason": "Luma of the central half (in each axis) minus the rest, ours minus the reference's: vignetting "
                  "or a shifted framing that the whole-frame mean hides. Writers shift the whole frame, which "
                  "cancels here (measured <= 0.4 levels), so 3 levels.",
    },
    "ssim_min": {
        "value": 0.5,
        "reason": "A port that matches, even one whose sampling diverged a little in bf16, shows the same scene; "
                  "below SSIM 0.5 the frames do not (noise, a uniform colour, wrong content). Measured: mp4v and MJPEG "
                  "round trips of one side only >= 0.84.",
    },
    "seam_step_factor": {
        "value": 3.0,
        "reason": "Brightness / colour / contrast step at a seam: how much the per-channel offset (ours - reference) "
                  "changes across the seam, against the largest change of that offset between any two frames inside "
                  "a chunk; a seam must stand out 3x from every inside transition (the reference's own change at the "
                  "seam cancels in the offset). Measured: round trips reach <= 0.16 of the limit.",
    },
    "seam_step_floor": {
        "value": 2 * LEVEL,
        "reason": "and be at least 2 levels: smaller steps are 8-bit rounding and codec error.",
    },
    "seam_frame_diff_factor": {
        "value": 2.0,
        "reason": "Frame difference at a seam over the mean inside the two adjacent chunks, ours over the "
                  "reference's: 2 means the seam changes our picture twice as much, relative to our own motion, "
                  "as the reference's.",
    },
    "seam_frame_diff_floor": {
        "value": 2 * LEVEL,
        "reason": "and our seam frame difference exceeds the reference's by at least 2 levels RMS (noise of std s "
                  "raises a frame difference of d only by ~s^2/d).",
    },
}


def _limit(name: str) -> float:
    return float(LIMITS[name]["value"])


# --- loading -----------------------------------------------------------------------------------

def frames_from_array(array: np.ndarray, name: str = "array",
                      value_range: tuple[float, float] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """``(frames, info)``: ``array`` as ``(T, H, W, C)`` float32 on [0, 1] (rules in the module docstring),
    and how it was read (``layout``, ``dtype``, ``range``). Raises ``ValueError`` naming ``name``."""
    x = np.asarray(array)
    shape = tuple(x.shape)
    expected = ("expected (T, H, W, C) or (1, C, T, H, W) with C = 1 or 3, "
                "uint8 or float in [0, 1] / [-1, 1]")
    if x.ndim == 5:
        if shape[0] != 1 or shape[1] not in (1, 3):
            raise InputError(f"{name}: shape {list(shape)} is not one video (1, C, T, H, W) with C = 1 or 3; {expected}")
        x = x[0].transpose(1, 2, 3, 0)
        layout = "(N, C, T, H, W)"
    elif x.ndim == 4:
        if shape[-1] not in (1, 3):
            raise InputError(f"{name}: shape {list(shape)} has {shape[-1]} channels last; {expected}")
        layout = "(T, H, W, C)"
    else:
        raise InputError(f"{name}: {x.ndim}-D array of shape {list(shape)}; {expected}")
    t, h, w, _c = x.shape
    if t < 1 or min(h, w) < MIN_SIDE:
        raise InputError(f"{name}: {t} frames of {h}x{w} px; expected at least 1 frame of {MIN_SIDE}x{MIN_SIDE} px")
    if x.dtype == np.uint8:
        frames = x.astype(np.float32) / np.float32(255.0)
        return frames, {"layout": layout, "dtype": "uint8", "range": "0..255"}
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{name}: dtype {x.dtype}; {expected}")
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise InputError(f"{name}: {bad} NaN/Inf values; expected finite frames")
    lo, hi = float(x.min()), float(x.max())
    if value_range is None:
        value_range = (-1.0, 1.0) if layout == "(N, C, T, H, W)" or lo < 0 else (0.0, 1.0)
    a, b = (float(v) for v in value_range)
    if not b > a:
        raise InputError(f"{name}: value_range {value_range} is empty")
    slack = RANGE_SLACK * (b - a)
    if lo < a - slack or hi > b + slack:
        raise InputError(f"{name}: float values span [{lo:.4g}, {hi:.4g}]; expected [{a:g}, {b:g}] "
                         f"({'decoder outputs are taken as [-1, 1]' if layout == '(N, C, T, H, W)' else 'float frames are [0, 1], or [-1, 1] when negative'})")
    frames = np.clip((x.astype(np.float32) - np.float32(a)) / np.float32(b - a), 0.0, 1.0)
    return frames, {"layout": layout, "dtype": str(x.dtype), "range": f"[{a:g}, {b:g}]"}


def _read_video_file(path: Path) -> np.ndarray:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise InputError(f"{path}: OpenCV cannot open it as a video (not a video, or an unsupported "
                             f"container/codec); expected a video file or a .npy frame stack")
        frames: list[np.ndarray] = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if frame.ndim == 2:
                frame = frame[..., None]
            elif frame.shape[-1] == 3:
                frame = frame[..., ::-1]  # OpenCV decodes BGR
            elif frame.shape[-1] == 4:
                frame = frame[..., 2::-1]
            if frames and frame.shape != frames[0].shape:
                raise InputError(f"{path}: frame {len(frames)} is {frame.shape[1]}x{frame.shape[0]}, frame 0 is "
                                 f"{frames[0].shape[1]}x{frames[0].shape[0]}; expected one frame size")
            frames.append(frame)
    finally:
        capture.release()
    if not frames:
        raise InputError(f"{path}: no frame could be decoded; expected a readable video")
    stack = np.stack(frames)
    if stack.dtype != np.uint8:  # a 16-bit decode: to [0, 1]
        stack = stack.astype(np.float32) / np.float32(np.iinfo(stack.dtype).max)
    return stack


def _load(path: str | Path, value_range: tuple[float, float] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; expected a video file or a .npy frame stack")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; expected a video file or a .npy frame stack")
    if path.suffix.lower() == ".npy":
        frames, info = frames_from_array(load_npy(path), str(path), value_range)
        return frames, {"path": str(path), "source": ".npy", **info}
    raw = _read_video_file(path)
    frames, info = frames_from_array(raw, str(path), None if raw.dtype == np.uint8 else (0.0, 1.0))
    return frames, {"path": str(path), "source": "video", **info}


def load_video(path: str | Path, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Frames of a video file or ``.npy`` stack as ``(T, H, W, C)`` float32 on [0, 1] (RGB for colour).

    ``ValueError`` names the file and what was expected when it is missing, unreadable or malformed.
    """
    return _load(path, value_range)[0]


def _input(source: Any, side: str, name: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Frames and input description of a path, or of an array labelled ``name`` (default "<side> array")."""
    if isinstance(source, np.ndarray):
        frames, info = frames_from_array(source, str(name) if name is not None else f"{side} array")
        return frames, {"path": str(name) if name is not None else None, "source": "array", **info}
    return _load(source)


def chunk_boundaries(frames: int, chunk_frames: int | None = None,
                     boundaries: Sequence[int] | None = None) -> list[int]:
    """Chunk start frames (from 0): every ``chunk_frames`` frames, or the given ``boundaries`` (0 is
    added when missing); ``[0]`` (one chunk, no seam) with neither."""
    if chunk_frames is not None and boundaries is not None:
        raise InputError("give chunk_frames or boundaries, not both")
    if chunk_frames is not None:
        if isinstance(chunk_frames, bool) or int(chunk_frames) != chunk_frames or chunk_frames < 1:
            raise InputError(f"chunk_frames: expected a positive whole number of frames, got {chunk_frames!r}")
        return list(range(0, frames, int(chunk_frames)))
    if boundaries is None:
        return [0]
    b = [int(i) for i in boundaries]
    if b and b[0] != 0:
        b = [0] + b
    return artifacts._check_boundaries(b, frames)


# --- per-frame measures --------------------------------------------------------------------------

def _five(frames: np.ndarray) -> np.ndarray:
    """``(T, H, W, C)`` -> the ``(1, C, T, H, W)`` view :mod:`parity.artifacts` works on."""
    return frames.transpose(3, 0, 1, 2)[None]


def _luma(frame: np.ndarray) -> np.ndarray:
    """One (H, W, C) frame as float64 luma (H, W)."""
    frame = np.asarray(frame, dtype=np.float64)
    if frame.shape[-1] == 1:
        return frame[..., 0]
    return frame @ np.asarray(LUMA)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two (H, W, C) frames on [0, 1] (Wang et al. 2004; Gaussian window, per channel,
    averaged; the window's half-width is cropped from each border, as scikit-image does)."""
    import cv2

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2

    def blur(z: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(z, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    pad = SSIM_WINDOW // 2
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def sharpness(luma: np.ndarray) -> float:
    """Variance of the Laplacian (4-neighbour kernel) of a luma frame."""
    import cv2

    return float(cv2.Laplacian(luma, cv2.CV_64F, ksize=1).var())


def gradient_energy(luma: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude (3x3) of a luma frame."""
    import cv2

    gx = cv2.Sobel(luma, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(luma, cv2.CV_64F, 0, 1, ksize=3)
    return float(np.mean(gx * gx + gy * gy))


def centre_periphery(luma: np.ndarray) -> tuple[float, float]:
    """Mean luma of the central half in each axis (a quarter of the area) and of the rest."""
    h, w = luma.shape
    inner = np.zeros((h, w), dtype=bool)
    inner[h // 4:h - h // 4, w // 4:w - w // 4] = True
    return float(luma[inner].mean()), float(luma[~inner].mean())


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _periodicity(ref: np.ndarray, ours: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame, over frame batches (:func:`parity.artifacts.pattern_power`, one spectrum per array): each
    side's share of spatial power on the checkerboard and on all periodic frequencies, the same shares of
    our error (ours - reference), and the RMS amplitude of the error's checkerboard / periodic component."""
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(ref), FFT_BATCH):
        r, o = ref[s:s + FFT_BATCH], ours[s:s + FFT_BATCH]
        for side, v in (("ref", r), ("ours", o), ("error", o.astype(np.float64) - r)):
            shares = artifacts.pattern_power(_five(v), PERIOD)
            parts.setdefault(f"checkerboard_{side}", []).append(shares["checkerboard"])
            parts.setdefault(f"periodic_{side}", []).append(shares["periodic_power"])
            if side == "error":
                parts.setdefault("error_power", []).append(shares["spatial"])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    power = out.pop("error_power")
    for kind in ("checkerboard", "periodic"):
        out[f"{kind}_amplitude"] = np.sqrt(out[f"{kind}_error"] * power)
    return out


def _stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    parts = [artifacts.frame_stats(_five(frames[s:s + FFT_BATCH])) for s in range(0, len(frames), FFT_BATCH)]
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in ("mean", "std")}


def _transitions(frames: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`parity.artifacts.transition_jumps` over overlapping frame batches: T-1 values each."""
    keys = ("mean_jump", "std_jump", "frame_diff")
    if len(frames) < 2:
        return {k: np.zeros(0) for k in keys}
    parts = [artifacts.transition_jumps(_five(frames[s:s + FFT_BATCH + 1]))
             for s in range(0, len(frames) - 1, FFT_BATCH)]
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _ratio_array(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([artifacts._ratio(float(x), float(y)) for x, y in zip(a, b)])


def frame_metrics(ref: np.ndarray, ours: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame measures of two same-shape ``(T, H, W, C)`` [0, 1] videos (arrays of length T, or (C, T))."""
    t = len(ref)
    out: dict[str, Any] = {k: np.zeros(t) for k in (
        "psnr_db", "ssim", "sharpness_ref", "sharpness_ours", "gradient_ref", "gradient_ours",
        "centre_ref", "periphery_ref", "centre_ours", "periphery_ours")}
    for i in range(t):
        a, b = np.asarray(ref[i], np.float64), np.asarray(ours[i], np.float64)
        out["psnr_db"][i] = _psnr(float(np.mean((b - a) ** 2)))
        out["ssim"][i] = ssim(a, b)
        for side, frame in (("ref", a), ("ours", b)):
            luma = _luma(frame)
            out[f"sharpness_{side}"][i] = sharpness(luma)
            out[f"gradient_{side}"][i] = gradient_energy(luma)
            out[f"centre_{side}"][i], out[f"periphery_{side}"][i] = centre_periphery(luma)
    out["sharpness_ratio"] = _ratio_array(out["sharpness_ours"], out["sharpness_ref"])
    out["gradient_ratio"] = _ratio_array(out["gradient_ours"], out["gradient_ref"])
    for side, frames in (("ref", ref), ("ours", ours)):
        stats = _stats(frames)
        out[f"mean_{side}"], out[f"std_{side}"] = stats["mean"], stats["std"]
        out[f"brightness_{side}"] = stats["mean"].mean(axis=0)
        out[f"contrast_{side}"] = stats["std"].mean(axis=0)
        out[f"centre_minus_periphery_{side}"] = out[f"centre_{side}"] - out[f"periphery_{side}"]
    offset = out["mean_ours"] - out["mean_ref"]  # (C, T)
    out["brightness_offset"] = offset.mean(axis=0)
    out["colour_offset"] = np.abs(offset - offset.mean(axis=0)).max(axis=0)
    out["contrast_offset"] = out["contrast_ours"] - out["contrast_ref"]
    out["centre_periphery_offset"] = out["centre_minus_periphery_ours"] - out["centre_minus_periphery_ref"]
    out.update(_periodicity(ref, ours))
    h, w = ref.shape[1:3]
    for kind, bins in (("checkerboard", 4), ("periodic", PERIOD**2 - 1)):
        out[f"{kind}_white"] = bins / (h * w)
        out[f"{kind}_concentration"] = out[f"{kind}_error"] / np.maximum(out[f"{kind}_ref"], out[f"{kind}_white"])
    return out


# --- seams -------------------------------------------------------------------------------------

def colour_jumps(means: np.ndarray) -> np.ndarray:
    """Per transition (T-1): the largest per-channel change of (channel mean - mean over channels), from
    :func:`parity.artifacts.frame_stats` means (C, T): a change of tint that a brightness change is not."""
    tint = means - means.mean(axis=0)
    return np.abs(np.diff(tint, axis=1)).max(axis=0) if tint.shape[1] > 1 else np.zeros(0)


#: Per-side jump kinds at a seam: :func:`parity.artifacts.transition_jumps` keys, and the colour jump.
SEAM_JUMPS = {"brightness": "mean_jump", "contrast": "std_jump", "colour": None, "frame_diff": "frame_diff"}


def seam_rows(m: dict[str, Any], jumps: dict[str, dict[str, np.ndarray]], boundaries: Sequence[int],
              frames: int) -> list[dict[str, Any]]:
    """One row per seam (transition ``s-1 -> s``).

    Judged: ``{brightness,colour,contrast}_step``, how much the per-channel offset ours - reference
    changes across the seam (the reference's own change cancels), with the largest such change
    between two frames inside any chunk (``_step_inside_max``) and the resulting ``_limit``; and
    the frame-difference ratios. Shown, per side (``_ref`` / ``_ours``) and per jump kind of
    :data:`SEAM_JUMPS`: the jump at the seam (``_seam_``), the mean jump inside the two chunks that
    meet there (``_inside_``; the whole video's inside transitions if they have none), their
    ``_ratio_``, and ``_ours_vs_ref`` (our ratio over the reference's).
    """
    seams = list(boundaries[1:])
    if not seams:
        return []
    starts = list(boundaries) + [frames]
    inside = np.ones(frames - 1, dtype=bool)
    inside[[s - 1 for s in seams]] = False
    offset_mean = m["mean_ours"] - m["mean_ref"]  # (C, T)
    offset_std = m["std_ours"] - m["std_ref"]
    steps = {"brightness": np.abs(np.diff(offset_mean.mean(axis=0))), "colour": colour_jumps(offset_mean),
             "contrast": np.abs(np.diff(offset_std.mean(axis=0)))}
    side_jumps = {side: {kind: (jumps[side][key] if key else colour_jumps(m[f"mean_{side}"]))
                         for kind, key in SEAM_JUMPS.items()} for side in ("ref", "ours")}
    rows = []
    for k, s in enumerate(seams):
        row: dict[str, Any] = {"seam": k + 1, "frames": [s - 1, s]}
        for kind, step in steps.items():
            inside_max = float(step[inside].max()) if inside.any() else math.nan
            row[f"{kind}_step"] = float(step[s - 1])
            row[f"{kind}_step_inside_max"] = inside_max
            row[f"{kind}_limit"] = _limit("seam_step_floor") if math.isnan(inside_max) else \
                max(_limit("seam_step_floor"), _limit("seam_step_factor") * inside_max)
        near = np.zeros(frames - 1, dtype=bool)
        near[starts[k]:starts[k + 2] - 1] = True
        near &= inside
        pick = near if near.any() else inside
        for kind in SEAM_JUMPS:
            for side in ("ref", "ours"):
                values = side_jumps[side][kind]
                at, within = float(values[s - 1]), float(values[pick].mean()) if pick.any() else math.nan
                row[f"{kind}_seam_{side}"], row[f"{kind}_inside_{side}"] = at, within
                row[f"{kind}_ratio_{side}"] = math.nan if math.isnan(within) else artifacts._ratio(at, within)
            r, o = row[f"{kind}_ratio_ref"], row[f"{kind}_ratio_ours"]
            row[f"{kind}_ours_vs_ref"] = math.nan if math.isnan(r + o) or math.isinf(r + o) else artifacts._ratio(o, r)
        row["frame_diff_excess"] = row["frame_diff_seam_ours"] - row["frame_diff_seam_ref"]
        rows.append(row)
    return rows


# --- judging -----------------------------------------------------------------------------------

def _runs(flags: Iterable[bool]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, bad in enumerate(flags):
        if bad:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return runs


def _frame_findings(kind: str, flags: np.ndarray, values: np.ndarray, limits: np.ndarray, severity: np.ndarray,
                    text: str) -> list[dict[str, Any]]:
    """One finding per run of consecutive flagged frames, reporting the run's most ``severe`` frame."""
    found = []
    for run in _runs(flags):
        pick = max(run, key=lambda i: severity[i])
        span = f"frame {run[0]}" if len(run) == 1 else f"frames {run[0]}-{run[-1]}"
        found.append({"kind": kind, "frames": run, "value": float(values[pick]), "limit": float(limits[pick]),
                      "message": f"{span}: " + text.format(v=values[pick], l=limits[pick], f=pick,
                                                           levels=values[pick] / LEVEL, a=severity[pick] / LEVEL)})
    return found


def judge(m: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The findings: every per-frame measure and seam row against :data:`LIMITS`."""
    t = len(m["psnr_db"])
    full = lambda name: np.full(t, _limit(name))  # noqa: E731
    findings: list[dict[str, Any]] = []

    for kind, key, what in (("sharpness_loss", "sharpness", "Laplacian variance"),
                            ("gradient_loss", "gradient", "Sobel gradient energy")):
        ratio, limit = m[f"{key}_ratio"], full(f"{key}_ratio")
        judged = m[f"{key}_ref"] >= _limit(f"{key}_floor")
        findings += _frame_findings(kind, judged & (ratio < limit), ratio, limit, -ratio,
                                    "blur: " + what + " ours/reference {v:.3g} < {l:.3g} (worst frame {f})")

    for kind, name in (("checkerboard", f"{PERIOD} px checkerboard"), ("periodic", f"{PERIOD} px periodic pattern")):
        factor, amplitude = full(f"{kind}_factor"), m[f"{kind}_amplitude"]
        concentration = m[f"{kind}_concentration"]
        flags = (concentration > factor) & (amplitude >= _limit("pattern_amplitude"))
        note = "" if kind == "checkerboard" else " (a checkerboard counts here too)"
        findings += _frame_findings(kind, flags, concentration, factor, amplitude,
                                    name + " in our error" + note + ": {v:.3g}x more concentrated on its frequencies "
                                    "than the reference or noise (limit {l:g}x), {a:.2g} levels RMS (worst frame {f})")

    for kind, name in (("brightness", "brightness"), ("colour", "colour cast"),
                       ("centre_periphery", "centre-minus-periphery brightness")):
        values, limit = m[f"{kind}_offset"], full(f"{kind}_offset")
        findings += _frame_findings(kind, np.abs(values) > limit, values, limit, np.abs(values),
                                    name + " offset ours - reference {v:+.4f} ({levels:+.1f} levels), "
                                    "limit {l:.4f} (worst frame {f})")
    values = m["contrast_offset"]
    limit = np.maximum(0.15 * m["contrast_ref"], 3 * LEVEL)
    findings += _frame_findings("contrast", np.abs(values) > limit, values, limit, np.abs(values) / limit,
                                "contrast (std) ours - reference {v:+.4f} ({levels:+.1f} levels), limit ±{l:.4f} "
                                "(worst frame {f})")
    values, limit = m["ssim"], full("ssim_min")
    findings += _frame_findings("ssim", values < limit, values, limit, -values,
                                "SSIM {v:.3f} < {l:.3g}: not the same picture (worst frame {f})")

    for row in rows:
        s = row["frames"][1]
        where = f"seam {row['seam']} (frame {s - 1} -> {s})"
        for kind in ("brightness", "colour", "contrast"):
            step, lim = row[f"{kind}_step"], row[f"{kind}_limit"]
            if step > lim:
                findings.append({
                    "kind": f"seam_{kind}", "frames": row["frames"], "value": step, "limit": lim,
                    "message": f"{where}: our {kind} offset to the reference steps by {step:.4f} "
                               f"({step / LEVEL:.1f} levels), limit {lim:.4f} (largest step inside a chunk "
                               f"{row[f'{kind}_step_inside_max']:.4f})"})
        ratio, excess = row["frame_diff_ours_vs_ref"], row["frame_diff_excess"]
        factor = _limit("seam_frame_diff_factor")
        if not math.isnan(ratio) and ratio > factor and excess > _limit("seam_frame_diff_floor"):
            findings.append({
                "kind": "seam_frame_diff", "frames": row["frames"], "value": ratio, "limit": factor,
                "message": f"{where}: frame difference / inside mean is {row['frame_diff_ratio_ours']:.3g} for ours "
                           f"vs {row['frame_diff_ratio_ref']:.3g} for the reference ({ratio:.3g}x, limit {factor:g}x; "
                           f"{excess / LEVEL:.1f} levels RMS more)"})
    findings.sort(key=lambda f: (f["frames"][0], f["kind"]))
    return findings


#: The per-frame series behind each per-frame finding kind (the value a finding reports).
FINDING_SERIES = {
    "sharpness_loss": "sharpness_ratio", "gradient_loss": "gradient_ratio",
    "checkerboard": "checkerboard_concentration", "periodic": "periodic_concentration", "brightness": "brightness_offset", "colour": "colour_offset",
    "centre_periphery": "centre_periphery_offset", "contrast": "contrast_offset", "ssim": "ssim",
}


# --- the result --------------------------------------------------------------------------------

#: Why a value is null in the JSON (strict JSON has no NaN/Inf), by series or field name.
NULL_REASONS = {
    "psnr_db": "the frames are identical (MSE 0): PSNR is infinite",
    "sharpness_ratio": "the reference frame is flat (Laplacian variance 0)",
    "gradient_ratio": "the reference frame is flat (gradient energy 0)",
}
#: ... and by the end of the name, for the seam rows.
NULL_SUFFIXES = {
    "_ratio_ref": "seam / inside: nothing changes inside the adjacent chunks (0), or no inside transition",
    "_ratio_ours": "seam / inside: nothing changes inside the adjacent chunks (0), or no inside transition",
    "_ours_vs_ref": "a side's seam / inside ratio is undefined or infinite",
    "_inside_ref": "no transition inside a chunk",
    "_inside_ours": "no transition inside a chunk",
    "_step_inside_max": "no transition inside a chunk: the step limit is its floor",
}


def _null_reason(path: str, number: float) -> str:
    if path.startswith("seam_ratios."):
        return ("parity.artifacts.seam_report: no inside-chunk transition or frame to compare the seams with"
                if math.isnan(number) else "parity.artifacts.seam_report: nothing changes inside the chunks (0)")
    key = path.rsplit(".", 1)[-1]
    for suffix, reason in NULL_SUFFIXES.items():
        if key.endswith(suffix):
            return reason
    return NULL_REASONS.get(key) or ("undefined: nothing to compare (0/0)" if math.isnan(number)
                                     else "infinite: divided by zero")


def _strict(value: Any, path: str, nulls: dict[str, dict[str, Any]]) -> Any:
    """``value`` as strict-JSON data: arrays to lists, NaN/Inf to None with a reason in ``nulls[path]``."""
    if isinstance(value, dict):
        return {str(k): _strict(v, f"{path}.{k}" if path else str(k), nulls) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else list(value)
        return [_strict(v, path, nulls) for v in items]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isfinite(number):
            return number
        entry = nulls.setdefault(path, {"count": 0, "reason": _null_reason(path, number)})
        entry["count"] += 1
        return None
    return value


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _stat(values: np.ndarray, fn) -> float:
    finite = _finite(values)
    return float(fn(finite)) if finite.size else math.nan


def _check_pair(ref: np.ndarray, ours: np.ndarray, names: Sequence[str]) -> None:
    (tr, hr, wr, cr), (to, ho, wo, co) = ref.shape, ours.shape
    if tr != to:
        raise InputError(f"{names[1]} has {to} frames, {names[0]} has {tr}; expected the same frame count")
    if (hr, wr) != (ho, wo):
        raise InputError(f"{names[1]} frames are {wo}x{ho} px, {names[0]} frames are {wr}x{hr}; expected the same size")
    if cr != co:
        raise InputError(f"{names[1]} has {co} channels, {names[0]} has {cr}; expected the same channel count")


def analyse(ref: Any, ours: Any, chunk_frames: int | None = None, boundaries: Sequence[int] | None = None,
            names: Sequence[str] | None = None) -> dict[str, Any]:
    """Compare OURS with REF; returns the strict-JSON result (``verdict``, ``findings``, per-frame series, seams).

    ``ref`` / ``ours``: paths (loaded with :func:`load_video`) or frame arrays (read by
    :func:`frames_from_array`; ``(T, H, W, C)`` float32 on [0, 1] from :func:`load_video` as is).
    ``names`` labels array inputs in messages and the page (e.g. the paths they were loaded from).
    Chunks: every ``chunk_frames`` frames, or explicit ``boundaries`` (chunk start frames), or none.
    """
    began = time.perf_counter()
    labels = list(names) if names is not None else [None, None]
    r, r_info = _input(ref, "reference", labels[0])
    o, o_info = _input(ours, "ours", labels[1])
    _check_pair(r, o, [r_info["path"] or "the reference", o_info["path"] or "ours"])
    t, h, w, c = r.shape
    b = chunk_boundaries(t, chunk_frames, boundaries)

    m = frame_metrics(r, o)
    jumps = {"ref": _transitions(r), "ours": _transitions(o)}
    rows = seam_rows(m, jumps, b, t)
    findings = judge(m, rows)
    ratios = artifacts.seam_report(_five(r), _five(o), b) if len(b) > 1 else None

    flagged_frames = sorted({i for f in findings if not f["kind"].startswith("seam_") for i in f["frames"]})
    flagged_seams = sorted({f["frames"][1] for f in findings if f["kind"].startswith("seam_")})
    for row in rows:
        row["flagged"] = sorted({f["kind"] for f in findings if f["kind"].startswith("seam_") and f["frames"] == row["frames"]})
    summary = {
        "psnr_db_mean": _stat(m["psnr_db"], np.mean), "psnr_db_min": _stat(m["psnr_db"], np.min),
        "ssim_mean": _stat(m["ssim"], np.mean), "ssim_min": _stat(m["ssim"], np.min),
        "sharpness_ratio_min": _stat(m["sharpness_ratio"], np.min),
        "gradient_ratio_min": _stat(m["gradient_ratio"], np.min),
        "brightness_offset_max_abs": _stat(np.abs(m["brightness_offset"]), np.max),
        "colour_offset_max": _stat(m["colour_offset"], np.max),
        "contrast_offset_max_abs": _stat(np.abs(m["contrast_offset"]), np.max),
        "centre_periphery_offset_max_abs": _stat(np.abs(m["centre_periphery_offset"]), np.max),
        "checkerboard_concentration_max": _stat(m["checkerboard_concentration"], np.max),
        "checkerboard_amplitude_max": _stat(m["checkerboard_amplitude"], np.max),
        "periodic_concentration_max": _stat(m["periodic_concentration"], np.max),
        "periodic_amplitude_max": _stat(m["periodic_amplitude"], np.max),
        "findings": len(findings), "flagged_frames": flagged_frames, "flagged_seams": flagged_seams,
    }
    limits = {k: dict(v) for k, v in LIMITS.items()}
    per_frame = {k: v for k, v in m.items()}
    per_frame["chunk"] = np.searchsorted(np.asarray(b), np.arange(t), side="right") - 1
    nulls: dict[str, dict[str, Any]] = {}
    result = _strict({
        "kind": "video",
        "verdict": "FAIL" if findings else "PASS",
        "inputs": {"ref": r_info, "ours": o_info},
        "frames": t, "height": h, "width": w, "channels": c,
        "chunk_frames": chunk_frames, "boundaries": b, "seams": b[1:],
        "summary": summary,
        "findings": findings,
        "limits": limits,
        "per_frame": per_frame,
        "seam_rows": rows,
        "seam_ratios": ratios,
    }, "", nulls)
    result["nulls"] = nulls
    result["seconds"] = round(time.perf_counter() - began, 3)
    return result


def write_result(out_dir: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` as ``out_dir/video.json`` (atomic, strict JSON); returns its path."""
    import json

    json.dumps(result, allow_nan=False)  # strict: raises on NaN/Inf before anything is written
    path = Path(out_dir) / RESULT_NAME
    write_json(path, result)
    return path


# --- the page ----------------------------------------------------------------------------------

#: Thumbnails are scaled to about this many pixels on their longer side.
THUMB_SIDE = 192
#: At most this many seams and this many worst frames in the filmstrip.
MAX_STRIP_SEAMS, MAX_STRIP_WORST = 8, 8
#: Frames larger than a thumbnail also get a crop of the difference at full resolution, this many px a side.
CROP_SIDE = 64


def _png(image: np.ndarray) -> dict[str, Any]:
    """An (H, W, C) [0, 1] image as a PNG ``data:`` URI (``src``) and its display size (``width``, ``height``):
    larger frames are downscaled to :data:`THUMB_SIDE`; smaller ones are stored as they are and shown
    enlarged by a whole factor with pixelated rendering, so an 8 px pattern stays visible and the page small."""
    import cv2

    h, w = image.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    if scale < 1:
        pixels = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    bgr = pixels[..., ::-1] if pixels.shape[-1] == 3 else pixels
    ok, data = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise InputError("could not encode a thumbnail as PNG")
    factor = max(int(scale), 1)
    return {"src": "data:image/png;base64," + base64.b64encode(data.tobytes()).decode("ascii"),
            "width": pixels.shape[1] * factor, "height": pixels.shape[0] * factor}


def _frame_list(frames: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    parts, wanted = [], set(frames)
    for run in _runs(i in wanted for i in range(max(wanted, default=-1) + 1)):
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}–{run[-1]}")
    return ", ".join(parts)


def _worst_frames(result: dict[str, Any]) -> list[tuple[int, str]]:
    """(frame, why) for the strip: each per-frame finding's worst frame, then the lowest PSNR and SSIM."""
    pf = result.get("per_frame") or {}
    picks: list[tuple[int, str]] = []
    for f in result.get("findings") or []:
        series = pf.get(FINDING_SERIES.get(f.get("kind"), ""))
        frames = [i for i in f.get("frames") or [] if series is not None and 0 <= i < len(series)]
        if not frames or f.get("value") is None:
            continue
        best = min(frames, key=lambda i: abs((series[i] if series[i] is not None else math.inf) - f["value"]))
        picks.append((best, f"worst {f['kind']}"))
    for key, label in (("psnr_db", "lowest PSNR"), ("ssim", "lowest SSIM")):
        values = [(v, i) for i, v in enumerate(pf.get(key) or []) if v is not None]
        if values:
            picks.append((min(values)[1], label))
    return picks


def _gain(diff: np.ndarray) -> int:
    """A power of two (1..64) that maps the 99.9th percentile of ``|diff|`` to at least a quarter of the range."""
    top = float(np.percentile(np.abs(diff), 99.9)) if diff.size else 0.0
    gain = 1
    while gain < 64 and top * gain * 2 <= 0.5:
        gain *= 2
    return gain


def _crop(diff: np.ndarray, gain: int) -> dict[str, Any]:
    """For a frame larger than a thumbnail (whose downscaling would wash out an 8 px pattern): the
    :data:`CROP_SIDE` px window of the difference with the most error, at full resolution."""
    import cv2

    h, w = diff.shape[:2]
    if max(h, w) <= THUMB_SIDE:
        return {}
    side_y, side_x = min(CROP_SIDE, h), min(CROP_SIDE, w)
    energy = cv2.GaussianBlur(np.square(diff, dtype=np.float32).sum(axis=-1), (0, 0), CROP_SIDE / 4)  # peaks mid-error
    cy, cx = np.unravel_index(int(np.argmax(energy)), energy.shape)
    y0, x0 = int(min(max(cy - side_y // 2, 0), h - side_y)), int(min(max(cx - side_x // 2, 0), w - side_x))
    return {"crop": _png(0.5 + diff[y0:y0 + side_y, x0:x0 + side_x] * gain),
            "crop_at": f"x {x0}–{x0 + side_x - 1}, y {y0}–{y0 + side_y - 1}"}


def _strip(result: dict[str, Any], ref: np.ndarray, ours: np.ndarray) -> list[dict[str, Any]]:
    """Filmstrip rows at the seams and the worst frames: reference, ours, and ours - reference x its own gain
    around mid-grey (signed: |difference| would turn a +-a checkerboard into a flat image)."""
    reasons: dict[int, list[str]] = {}
    all_seams = list(result.get("seams") or [])
    flagged = set((result.get("summary") or {}).get("flagged_seams") or [])
    shown = sorted(sorted(all_seams, key=lambda s: (s not in flagged, s))[:MAX_STRIP_SEAMS])
    for s in shown:
        number = all_seams.index(s) + 1
        reasons.setdefault(s - 1, []).append(f"last frame before seam {number}")
        reasons.setdefault(s, []).append(f"first frame after seam {number}" + (" (flagged)" if s in flagged else ""))
    extra = 0
    for frame, why in _worst_frames(result):
        if frame not in reasons:
            if extra >= MAX_STRIP_WORST:
                continue
            extra += 1
        if why not in reasons.setdefault(frame, []):
            reasons[frame].append(why)
    rows = []
    for i in sorted(f for f in reasons if 0 <= f < len(ref)):
        diff = ours[i].astype(np.float32) - ref[i]
        gain = _gain(diff)
        rows.append({"frame": i, "why": "; ".join(reasons[i]), "gain": gain, "ref": _png(ref[i]),
                     "ours": _png(ours[i]), "diff": _png(0.5 + diff * gain), **_crop(diff, gain)})
    return rows


def _panels(result: dict[str, Any]) -> list[dict[str, Any]]:
    pf = result.get("per_frame") or {}
    limits = result.get("limits") or {}
    flagged: dict[str, list[int]] = {}
    for f in result.get("findings") or []:
        if not str(f.get("kind")).startswith("seam_"):
            flagged.setdefault(str(f.get("kind")), []).extend(f.get("frames") or [])
    lim = lambda name: (limits.get(name) or {}).get("value")  # noqa: E731
    channels = int(result.get("channels") or 0)
    names = ["R", "G", "B"] if channels == 3 else ["luma"]
    colors = ["#c62828", "#2e7d32", "#1565c0"] if channels == 3 else ["#444"]

    def per_channel(key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        series, styles = {}, {}
        for side, ls in (("ref", "-"), ("ours", "--")):
            for c, values in enumerate(pf.get(f"{key}_{side}") or []):
                label = f"{names[c] if c < len(names) else c} {'reference' if side == 'ref' else 'ours'}"
                series[label] = values
                styles[label] = {"color": colors[c % len(colors)], "ls": ls, "ms": 2 if side == "ref" else 0}
        return series, styles

    def sides(key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        return ({"reference": pf.get(f"{key}_ref") or [], "ours": pf.get(f"{key}_ours") or []},
                {"reference": {"color": "#444"}, "ours": {"color": "#ef6c00", "ls": "--"}})

    mean_series, mean_styles = per_channel("mean")
    std_series, std_styles = per_channel("std")
    cp_series, cp_styles = sides("centre_minus_periphery")
    return [
        {"ylabel": "PSNR (dB)", "series": {"PSNR": pf.get("psnr_db") or []}},
        {"ylabel": "SSIM", "series": {"SSIM": pf.get("ssim") or []}, "limits": [(lim("ssim_min"), "limit")],
         "flagged": flagged.get("ssim")},
        {"ylabel": "ours / reference", "series": {"sharpness (Laplacian variance)": pf.get("sharpness_ratio") or [],
                                                  "gradient energy (Sobel)": pf.get("gradient_ratio") or []},
         "limits": [(lim("sharpness_ratio"), "sharpness limit"), (lim("gradient_ratio"), "gradient limit")],
         "flagged": (flagged.get("sharpness_loss") or []) + (flagged.get("gradient_loss") or [])},
        {"ylabel": "brightness\n(channel mean)", "series": mean_series, "styles": mean_styles,
         "flagged": (flagged.get("brightness") or []) + (flagged.get("colour") or [])},
        {"ylabel": "contrast\n(channel std)", "series": std_series, "styles": std_styles, "flagged": flagged.get("contrast")},
        {"ylabel": "centre − periphery\n(luma)", "series": cp_series, "styles": cp_styles,
         "flagged": flagged.get("centre_periphery")},
        {"ylabel": f"{PERIOD} px pattern in\nour error (× ref/noise)", "log": True,
         "series": {"checkerboard": pf.get("checkerboard_concentration") or [],
                    "periodic": pf.get("periodic_concentration") or []},
         "limits": [(lim("checkerboard_factor"), "checkerboard limit"), (lim("periodic_factor"), "periodic limit")],
         "flagged": (flagged.get("checkerboard") or []) + (flagged.get("periodic") or [])},
    ]


def _seam_table(result: dict[str, Any]) -> dict[str, Any]:
    from parity.html_report import cell, column, num_cell

    columns = [column("seam", True), column("frames"),
               column("brightness step", True, "|change of the mean over channels of (ours - reference) channel means| across the seam"),
               column("limit", True), column("colour step", True, "largest per-channel change of the offset left after the brightness step"),
               column("limit", True), column("contrast step", True, "|change of (ours - reference) channel std| across the seam"),
               column("limit", True),
               column("frame diff ratio ref", True, "reference: frame difference at the seam / mean inside the adjacent chunks"),
               column("frame diff ratio ours", True, "ours: the same"),
               column("ours / ref", True), column("flagged")]
    rows = []
    for row in result.get("seam_rows") or []:
        flagged = row.get("flagged") or []
        cells = [num_cell(row.get("seam")), cell(f"{row['frames'][0]} → {row['frames'][1]}")]
        for kind in ("brightness", "colour", "contrast"):
            cells += [num_cell(row.get(f"{kind}_step"), bad=f"seam_{kind}" in flagged), num_cell(row.get(f"{kind}_limit"))]
        cells += [num_cell(row.get("frame_diff_ratio_ref")), num_cell(row.get("frame_diff_ratio_ours")),
                  num_cell(row.get("frame_diff_ours_vs_ref"), bad="seam_frame_diff" in flagged),
                  cell(", ".join(flagged) or "–", cls="bad" if flagged else "")]
        rows.append({"cls": "fail" if flagged else "", "id": f"seam-{row.get('seam')}", "cells": cells})
    return {"id": "seams", "columns": columns, "rows": rows}


def _findings_table(result: dict[str, Any]) -> dict[str, Any]:
    from parity.html_report import cell, column, num_cell

    columns = [column("kind"), column("frames"), column("value", True), column("limit", True), column("message")]
    rows = [{"cls": "fail", "id": "", "cells": [cell(f.get("kind")), cell(_frame_list(f.get("frames") or [])),
                                                 num_cell(f.get("value")), num_cell(f.get("limit")), cell(f.get("message"))]}
            for f in result.get("findings") or []]
    return {"id": "findings", "columns": columns, "rows": rows}


def _frame_table(result: dict[str, Any]) -> dict[str, Any]:
    from parity.html_report import cell, column, num_cell

    pf = result.get("per_frame") or {}
    keys = [("psnr_db", "PSNR dB"), ("ssim", "SSIM"), ("sharpness_ratio", "sharpness ratio"),
            ("gradient_ratio", "gradient ratio"), ("brightness_offset", "brightness offset"),
            ("colour_offset", "colour offset"), ("contrast_offset", "contrast offset"),
            ("centre_periphery_offset", "centre−periphery offset"),
            ("checkerboard_concentration", "checkerboard ×"), ("periodic_concentration", "periodic ×")]
    by_frame: dict[int, list[str]] = {}
    for f in result.get("findings") or []:
        for i in f.get("frames") or []:
            if not str(f.get("kind")).startswith("seam_"):
                by_frame.setdefault(i, []).append(str(f.get("kind")))
    columns = [column("frame", True), column("chunk", True)] + [column(label, True) for _k, label in keys] + [column("flagged")]
    rows = []
    for i in range(int(result.get("frames") or 0)):
        chunk = (pf.get("chunk") or [None] * (i + 1))[i]
        cells = [num_cell(i), num_cell(chunk)]
        cells += [num_cell((pf.get(k) or [None] * (i + 1))[i]) for k, _label in keys]
        cells.append(cell(", ".join(by_frame.get(i, [])) or "–", cls="bad" if i in by_frame else ""))
        rows.append({"cls": "fail" if i in by_frame else "", "id": f"frame-{i}", "cells": cells})
    return {"id": "frames", "columns": columns, "rows": rows}


def render_page(result: dict[str, Any], ref_frames: Any, our_frames: Any) -> str:
    """The HTML text of :func:`write_page`."""
    from datetime import datetime, timezone

    from parity import plots
    from parity.html_report import _env, _json, fmt

    ref, ours = _input(ref_frames, "reference frames")[0], _input(our_frames, "our frames")[0]
    if ref.shape != ours.shape or len(ref) != result.get("frames"):
        raise InputError(f"frames for the page: reference {list(ref.shape)}, ours {list(ours.shape)}; expected both "
                         f"{[result.get(k) for k in ('frames', 'height', 'width', 'channels')]}, as analysed")
    s = result.get("summary") or {}
    inputs = result.get("inputs") or {}
    name = lambda side: (inputs.get(side) or {}).get("path") or f"{side} array"  # noqa: E731
    levels = lambda v: "–" if v is None else f"{fmt(v / LEVEL)} levels"  # noqa: E731
    findings = result.get("findings") or []
    cards = [
        {"label": "PSNR mean / min (dB)", "value": f"{fmt(s.get('psnr_db_mean'), 'db')} / {fmt(s.get('psnr_db_min'), 'db')}", "bad": False},
        {"label": "SSIM min", "value": fmt(s.get("ssim_min")), "bad": any(f["kind"] == "ssim" for f in findings)},
        {"label": "sharpness ratio min", "value": fmt(s.get("sharpness_ratio_min")),
         "bad": any(f["kind"] == "sharpness_loss" for f in findings)},
        {"label": "gradient ratio min", "value": fmt(s.get("gradient_ratio_min")),
         "bad": any(f["kind"] == "gradient_loss" for f in findings)},
        {"label": "brightness offset max", "value": levels(s.get("brightness_offset_max_abs")),
         "bad": any(f["kind"] == "brightness" for f in findings)},
        {"label": f"{PERIOD} px checkerboard max", "value": f"{fmt(s.get('checkerboard_concentration_max'))}×",
         "bad": any(f["kind"] == "checkerboard" for f in findings)},
        {"label": "flagged frames / seams",
         "value": f"{len(s.get('flagged_frames') or [])} / {len(s.get('flagged_seams') or [])}",
         "bad": bool(s.get("flagged_frames") or s.get("flagged_seams"))},
    ]
    describe = lambda info: ", ".join(f"{k} {info.get(k)}" for k in ("source", "layout", "dtype", "range") if info.get(k))  # noqa: E731
    meta = [("reference", name("ref")), ("reference input", describe(inputs.get("ref") or {})),
            ("ours", name("ours")), ("ours input", describe(inputs.get("ours") or {})),
            ("video", f"{result.get('frames')} frames of {result.get('width')}×{result.get('height')} px, "
                      f"{result.get('channels')} channel(s)"),
            ("chunks", (f"every {result.get('chunk_frames')} frames; " if result.get("chunk_frames") else "") +
                       f"starts {result.get('boundaries')}"),
            ("analysis time", f"{result.get('seconds')} s")]
    strip = _strip(result, ref, ours)
    limits = [{"name": k, "value": fmt(v.get("value")) if v.get("value") is not None else v.get("value_rule", "–"),
               "rule": v.get("value_rule", ""), "reason": v.get("reason", "")} for k, v in (result.get("limits") or {}).items()]
    nulls = [(k, v.get("count"), v.get("reason")) for k, v in (result.get("nulls") or {}).items()]
    return _env().get_template("video.html.j2").render(
        verdict=result.get("verdict", "UNKNOWN"), ref_name=name("ref"), our_name=name("ours"),
        findings=[{"kind": f.get("kind"), "frames": _frame_list(f.get("frames") or []), "message": f.get("message")}
                  for f in findings],
        findings_table=_findings_table(result), cards=cards, meta=meta,
        curves=plots.frame_panels(_panels(result), result.get("seams") or [],
                                  "Per frame (dotted: chunk seams; shaded: flagged frames; dashed red: limits)"),
        strip=strip, seams=result.get("seams") or [], seam_table=_seam_table(result),
        seam_rows=result.get("seam_rows") or [], seam_ratios=result.get("seam_ratios"), limits=limits, nulls=nulls, frame_table=_frame_table(result),
        raw=_json({k: v for k, v in result.items() if k != "per_frame"}),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))


def write_page(result: dict[str, Any], out_dir: str | Path, ref_frames: Any, our_frames: Any) -> Path:
    """Write ``out_dir/video.html`` (self-contained: inline CSS, embedded PNGs, no network) from an
    :func:`analyse` result and the frames it analysed (arrays or paths); returns its path."""
    path = Path(out_dir) / PAGE_NAME
    write_text(path, render_page(result, ref_frames, our_frames))
    return path
