"""The page of a video comparison: ``video.html``, self-contained (inline CSS, embedded PNGs, no network).

Drawn from an :func:`parity.video.analyse` result and the frames it analysed: the verdict and
findings, summary cards, per-frame curves with seams and limits, a filmstrip of the seams and the
worst frames (reference, ours, amplified difference), the seam and per-frame tables, and every
limit with its reason.
"""
from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from parity.dumps import write_text
from parity.video import FINDING_SERIES, LEVEL, PERIOD, consecutive_runs, load_input
from parity.vocab import InputError, fmt

#: The page written by :func:`write_page`.
PAGE_NAME = "video.html"
#: Thumbnails are scaled to about this many pixels on their longer side.
THUMB_SIDE = 192
#: At most this many seams and this many worst frames in the filmstrip.
MAX_STRIP_SEAMS, MAX_STRIP_WORST = 8, 8
#: Frames larger than a thumbnail also get a crop of the difference at full resolution, this many px a side.
CROP_SIDE = 64


def short_names(ref: str, ours: str) -> tuple[str, str]:
    """The two paths without the folders they share (``ref/frames.npy``, ``mlx/frames.npy`` of one run)."""
    a, b = Path(ref).parts, Path(ours).parts
    common = 0
    while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
        common += 1
    return str(Path(*a[common:])), str(Path(*b[common:]))


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
    for run in consecutive_runs(i in wanted for i in range(max(wanted, default=-1) + 1)):
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
        rms = float(np.sqrt(np.mean(np.square(diff, dtype=np.float64))))
        size = f"error RMS {fmt(rms / LEVEL)}, max {fmt(float(np.abs(diff).max()) / LEVEL)} levels"
        rows.append({"frame": i, "why": "; ".join(reasons[i]), "gain": gain, "size": size, "ref": _png(ref[i]),
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
               column("diff ratio ref", True, "reference: frame difference at the seam / mean inside the adjacent chunks"),
               column("diff ratio ours", True, "ours: frame difference at the seam / mean inside the adjacent chunks"),
               column("ours / ref", True, "our frame difference ratio over the reference's"), column("flagged")]
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
    from parity.html_report import _env, _json

    ref, ours = load_input(ref_frames, "reference frames")[0], load_input(our_frames, "our frames")[0]
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
        verdict=result.get("verdict", "UNKNOWN"), names=short_names(name("ref"), name("ours")),
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
