"""Boundary-artifact sections the Wan VAE components (encoder, decoder, round trip) share.

Where (block x chunk) and when (frame) the MLX error sits, error per chunk, jumps at chunk seams,
patch-period patterns and per-frame statistics, all from the captures alone. Layer names are the
components' ``[<prefix>]chunk<c>/<block>`` per-chunk taps and whole-video tensors (``latents``,
``frames``). Information only: the layer verdicts localise faults; a section returns None when
the tensors it reads are missing on a side or differ in shape.
"""
from __future__ import annotations

import numpy as np

from parity import artifacts, video
from parity.capture import Capture
from parity.component import RunContext, Section

#: Spatial period of the VAE's patches: 8 px in pixel space (the video analysis' ``PERIOD``), 1 latent px
#: (Nyquist: checkerboard period 2) in latent space.
PIXEL_PERIOD, LATENT_PERIOD = video.PERIOD, 2
RGB = ("R", "G", "B")


def tensor(capture: Capture, name: str) -> np.ndarray | None:
    return capture[name] if name in capture.tensors else None


def pair(run: RunContext, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Reference and MLX tensors of layer ``name``, or None if either is missing or their shapes differ."""
    ref, mlx = tensor(run.ref, name), tensor(run.mlx, name)
    if ref is None or mlx is None or ref.shape != mlx.shape:
        return None
    return ref, mlx


def chunked_blocks(capture: Capture, prefix: str = "") -> tuple[list[str], int]:
    """The blocks recorded per chunk under ``prefix`` (in chunk 0's order) and the number of chunks."""
    blocks = [n.removeprefix(f"{prefix}chunk0/") for n in capture.order if n.startswith(f"{prefix}chunk0/")]
    chunks = len({n[len(prefix):].split("/", 1)[0] for n in capture.order
                  if n.startswith(f"{prefix}chunk") and "/" in n[len(prefix):]})
    return blocks, chunks


def chunk_starts(chunks: int) -> list[int]:
    """First video frame of each chunk of ``AutoencoderKLWan``'s rule (the encoder's input, the decoder's
    output): 0, then 4 frames per chunk."""
    return [0] + [1 + 4 * (i - 1) for i in range(1, chunks)]


def across_chunks(run: RunContext, block: str, chunks: int,
                  prefix: str = "") -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """A block's per-chunk outputs joined along time on both sides, with each chunk's first frame index."""
    pairs = [pair(run, f"{prefix}chunk{i}/{block}") for i in range(chunks)]
    if not pairs or any(p is None for p in pairs):
        return None
    starts = np.cumsum([0] + [p[0].shape[2] for p in pairs[:-1]]).tolist()
    return np.concatenate([p[0] for p in pairs], axis=2), np.concatenate([p[1] for p in pairs], axis=2), starts


def block_chunk_heatmap(run: RunContext, prefix: str = "", what: str = "") -> Section | None:
    """Relative RMSE of every block in every chunk: a lost cache lights up from chunk 1, a first-chunk fault in chunk 0."""
    blocks, chunks = chunked_blocks(run.ref, prefix)
    if not blocks:
        return None
    values = []
    for block in blocks:
        row = []
        for i in range(chunks):
            found = pair(run, f"{prefix}chunk{i}/{block}")
            if found is None:
                row.append(float("nan"))
                continue
            ref, mlx = (p.astype(np.float64) for p in found)
            rms = float(np.sqrt(np.mean(ref**2)))
            row.append(float(np.sqrt(np.mean((mlx - ref) ** 2))) / rms if rms else float("nan"))
        values.append(row)
    name = f"{prefix.strip('/')}_block_chunk_error" if prefix else "block_chunk_error"
    return Section(name, f"{what}Error per block and chunk (MLX vs reference)".strip(), "heatmap",
                   {"rows": blocks, "cols": [f"chunk{i}" for i in range(chunks)], "values": values,
                    "label": "rmse / rms(reference)"},
                   note="NaN (magenta): the block is missing on one side or its shapes differ.")


def frame_error_heatmap(run: RunContext, layer: str, name: str, title: str, channels: list[str]) -> Section | None:
    """RMSE of ``layer`` per frame, over all channels and per channel; in bf16 also each side against float64."""
    found = pair(run, layer)
    if found is None:
        return None
    ref, mlx = found
    errors = artifacts.frame_errors(ref, mlx)
    rows = ["all channels", *channels]
    values = [errors["rmse"].tolist(), *errors["rmse_channel"].tolist()]
    truth = tensor(run.truth, layer) if run.truth is not None else None
    if truth is not None:
        rows += ["MLX vs float64", "reference vs float64"]
        values += [artifacts.frame_errors(truth, mlx)["rmse"].tolist(), artifacts.frame_errors(truth, ref)["rmse"].tolist()]
    return Section(name, title, "heatmap",
                   {"rows": rows, "cols": [f"f{t}" for t in range(ref.shape[2])], "values": values, "label": "rmse"})


def chunk_table(run: RunContext, layer: str, starts: list[int], frames_label: str, block: str,
                prefix: str = "") -> Section | None:
    """RMSE and max abs of ``layer`` per chunk (chunks starting at frames ``starts`` of it), the growth from
    the first chunk to the last, and the same RMSE of ``block`` joined across chunks."""
    found = pair(run, layer)
    if found is None or not starts or found[0].shape[2] <= starts[-1]:
        return None
    chunks = len(starts)
    errors = artifacts.chunk_errors(*found, boundaries=starts)
    joined = across_chunks(run, block, chunks, prefix)
    extra = artifacts.chunk_errors(*joined) if joined else None
    video_starts = chunk_starts(chunks)
    rows = [[f"chunk{i}", "0" if i == 0 else f"{video_starts[i]}-{video_starts[i] + 3}", errors["rmse"][i],
             errors["max_abs"][i], extra["rmse"][i] if extra else None] for i in range(chunks)]
    rows.append(["growth (last / first)", "", errors["growth"], None, extra["growth"] if extra else None])
    short = layer.removeprefix(prefix)
    return Section(f"{prefix.strip('/')}_chunk_error" if prefix else "chunk_error", "Error per chunk", "table",
                   {"columns": ["chunk", frames_label, f"{short} rmse", f"{short} max abs", f"{block} rmse"],
                    "rows": rows})


def _seam_row(label: str, ref: np.ndarray, mlx: np.ndarray, starts: list[int]) -> list:
    report = artifacts.seam_report(ref, mlx, starts)
    return [label, *(report[side][kind] for kind in ("mean_jump", "std_jump", "frame_diff") for side in ("ref", "test")),
            report["error_seam_ratio"]]


def seam_table(run: RunContext, prefix: str = "", frames: tuple[str, str, list[int]] | None = None) -> Section | None:
    """Seam / inside-chunk ratios of the blocks that keep several frames per chunk, and of ``frames``
    (label, layer, chunk starts): a whole-video tensor such as the decoded video, in pixel space."""
    blocks, chunks = chunked_blocks(run.ref, prefix)
    rows = []
    for block in blocks:
        joined = across_chunks(run, block, chunks, prefix)
        if joined is None or joined[0].shape[2] <= chunks:
            continue  # one frame per chunk: every transition is a seam, nothing to compare with
        rows.append(_seam_row(block, *joined))
    if frames is not None:
        label, layer, starts = frames
        found = pair(run, layer)
        if found is not None and found[0].shape[2] > len(starts):
            rows.append(_seam_row(label, *found, starts))
    if not rows:
        return None
    return Section(f"{prefix.strip('/')}_seams" if prefix else "seams",
                   "Chunk seams: jump across a seam / jump inside a chunk", "table",
                   {"columns": ["block", "mean jump ref", "mean jump MLX", "std jump ref", "std jump MLX",
                                "frame diff ref", "frame diff MLX", "MLX error: chunk starts / inside"],
                    "rows": rows},
                   note="Jump ratios ~1: seams look like any other frame transition; MLX should read like the "
                        "reference. Error ratio >> 1: the MLX error sits on the first frames of chunks (causal context).")


def periodicity_table(run: RunContext, entries: list[tuple[str, tuple[np.ndarray, np.ndarray] | None, int]],
                      name: str = "periodicity") -> Section | None:
    """Checkerboard and periodic shares of spatial power of each (label, (ref, mlx), period) entry."""
    rows = []
    for label, found, period in entries:
        if found is not None:
            r = artifacts.periodicity_report(*found, period=period)
            rows.append([label, period, r["checkerboard_ref"], r["checkerboard_test"], r["checkerboard_ratio"],
                         r["periodic_power_ref"], r["periodic_power_test"], r["periodic_power_ratio"]])
    if not rows:
        return None
    return Section(name, "Patch-period patterns (fraction of spatial power)", "table",
                   {"columns": ["layer", "period px", "checkerboard ref", "checkerboard MLX", "MLX / ref",
                                "periodic ref", "periodic MLX", "MLX / ref"], "rows": rows})


def frame_stats_curves(run: RunContext, layer: str, name: str, title: str, xlabel: str) -> Section | None:
    """Channel-averaged mean and std of ``layer`` per frame, both sides."""
    found = pair(run, layer)
    if found is None:
        return None
    series = {}
    for label, x in (("reference", found[0]), ("MLX", found[1])):
        stats = artifacts.frame_stats(x)
        series[f"{label} mean"] = stats["mean"].mean(axis=0).tolist()
        series[f"{label} std"] = stats["std"].mean(axis=0).tolist()
    return Section(name, title, "curves",
                   {"x": list(range(found[0].shape[2])), "series": series, "xlabel": xlabel, "ylabel": "value"},
                   note="MLX is drawn over the reference: where only the MLX lines show, the two coincide.")
