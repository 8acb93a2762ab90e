"""Compare a port's output video with the reference's, frame by frame and across chunk seams.

Ports break in ways a tensor comparison can miss and a person sees at once in the video: grey
frames, 8 px checkerboards, colour drift, brightness jumps where chunks meet, a slow blur
("zoom-in") that compounds chunk after chunk. :func:`analyse` measures each of these on OURS
against REF and judges them with stated limits (:data:`LIMITS`); :func:`write_result` stores the
result as strict JSON, :mod:`parity.video_page` draws it as a self-contained HTML page, and
``parity video`` (:mod:`parity.commands.video`) does both from the command line.

Inputs (:func:`load_video`): any container OpenCV reads (``.mp4``, ``.avi``, ``.mkv``, ...;
colour frames come back as RGB) or a ``.npy`` frame stack, loaded with ``allow_pickle=False``:

- ``(T, H, W, C)`` with C = 1 or 3: ``uint8`` (divided by 255) or float. A float stack is
  taken as [0, 1] when its minimum is >= 0, else as [-1, 1] (mapped by (x + 1) / 2);
- ``(N, C, T, H, W)`` with N = 1 and C = 1 or 3, like the VAE decoder's output: a float
  stack is always taken as [-1, 1] (the decoder's clamped range), ``uint8`` as 0..255.

``value_range`` overrides the float rule. Float values may overshoot their range by
:data:`RANGE_SLACK` (then they are clipped); further out, NaN/Inf, any other shape or dtype,
or fewer than :data:`MIN_SIDE` pixels a side is an :class:`~parity.vocab.InputError` naming the file.

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
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from parity import artifacts
from parity.dumps import write_json
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
#: The JSON written by :func:`write_result`.
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
    and how it was read (``layout``, ``dtype``, ``range``). Raises :class:`~parity.vocab.InputError` naming ``name``."""
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

    # FFmpeg's own log lines ("moov atom not found") would precede our one-line error; a user's setting wins.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

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


class Loaded(NamedTuple):
    """A video as :func:`load` read it: ``(T, H, W, C)`` float32 frames on [0, 1] and how they were read
    (``path``, ``source``, ``layout``, ``dtype``, ``range``)."""

    frames: np.ndarray
    info: dict[str, Any]


def load(path: str | Path, value_range: tuple[float, float] | None = None) -> Loaded:
    """A video file or ``.npy`` stack (rules in the module docstring), RGB for colour.

    :class:`~parity.vocab.InputError` names the file and what was expected when it is missing, unreadable or malformed.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; expected a video file or a .npy frame stack")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; expected a video file or a .npy frame stack")
    if path.suffix.lower() == ".npy":
        frames, info = frames_from_array(load_npy(path), str(path), value_range)
        return Loaded(frames, {"path": str(path), "source": ".npy", **info})
    raw = _read_video_file(path)
    frames, info = frames_from_array(raw, str(path), None if raw.dtype == np.uint8 else (0.0, 1.0))
    return Loaded(frames, {"path": str(path), "source": "video", **info})


def load_video(path: str | Path, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """The frames of :func:`load`."""
    return load(path, value_range).frames


def load_input(source: Any, side: str, name: Any = None) -> Loaded:
    """``source`` as :class:`Loaded`: a path (read by :func:`load`), a :class:`Loaded` as is, or an array
    labelled ``name`` (default "<side> array")."""
    if isinstance(source, Loaded):
        return source
    if isinstance(source, np.ndarray):
        frames, info = frames_from_array(source, str(name) if name is not None else f"{side} array")
        return Loaded(frames, {"path": str(name) if name is not None else None, "source": "array", **info})
    return load(source)


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
    if not b or b[0] != 0:
        b = [0] + b
    if any(x >= y for x, y in zip(b, b[1:])) or b[-1] >= frames:
        raise InputError(f"boundaries {list(boundaries)}: expected ascending chunk start frames below the "
                         f"video's {frames} frames")
    return b


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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two frames on [0, 1] (peak 1); infinite when they are equal."""
    mse = float(np.mean((np.asarray(b, np.float64) - np.asarray(a, np.float64)) ** 2))
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
        out["psnr_db"][i] = psnr(a, b)
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

def consecutive_runs(flags: Iterable[bool]) -> list[list[int]]:
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
    for run in consecutive_runs(flags):
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

    ``ref`` / ``ours``: paths or :class:`Loaded` videos (:func:`load`), or frame arrays (read by
    :func:`frames_from_array`; ``(T, H, W, C)`` float32 on [0, 1] from :func:`load_video` as is).
    ``names`` labels array inputs in messages and the page (e.g. the paths they were loaded from).
    Chunks: every ``chunk_frames`` frames, or explicit ``boundaries`` (chunk start frames), or none.
    """
    began = time.perf_counter()
    labels = list(names) if names is not None else [None, None]
    r, r_info = load_input(ref, "reference", labels[0])
    o, o_info = load_input(ours, "ours", labels[1])
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
