"""Wan2.1 VAE encoder: chunked causal encoding, compared per block and per chunk, plus boundary-artifact metrics."""
from __future__ import annotations

from typing import Any, Literal

import mlx.core as mx
import numpy as np
from pydantic import field_validator

from fixtures.videos import KINDS, video
from parity import artifacts
from parity.capture import Capture
from parity.component import Component, RunContext, Section
from parity.components._diffusers import WanVaeConfig
from parity.config import ComponentConfig, PositiveInt
from parity.weights import strict_load

#: Keys of a full AutoencoderKLWan checkpoint that belong to the decoder, deliberately left out
#: (the encoder loads ``encoder.*`` and ``quant_conv.*``; any other key stays, to be reported unused).
DECODER_KEYS = ("decoder.", "post_quant_conv.")
ENCODINGS = ("chunked", "one_shot")


class VaeConfig(ComponentConfig):
    vae: WanVaeConfig
    kind: Literal[KINDS]
    frames: PositiveInt
    height: PositiveInt
    width: PositiveInt
    batch: PositiveInt = 1
    mlx_encoding: Literal[ENCODINGS] = "chunked"

    @field_validator("frames")
    @classmethod
    def _chunkable(cls, frames: int) -> int:
        if (frames - 1) % 4:
            raise ValueError(f"expected 1 + 4k frames (1, 5, 9, 13, ...), got {frames}; diffusers' _encode would "
                             f"silently drop the last {(frames - 1) % 4}")
        return frames
#: Spatial period of the VAE's patches: 8 px in pixel space, 1 latent px (Nyquist: checkerboard period 2) in latent space.
PIXEL_PERIOD, LATENT_PERIOD = 8, 2


def encoder_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoder's keys of a full VAE state dict; any key that is neither encoder nor decoder stays (and is unused)."""
    return {k: v for k, v in weights.items() if not k.startswith(DECODER_KEYS)}


class VaeComponent(Component):
    name = "vae"
    description = "AutoencoderKLWan (Wan2.1) encoder: chunked causal encode with feature cache, quant_conv, normalised latents"
    #: one frame (first chunk only), two chunks, four chunks; a non-square size with odd latents
    coverage = ({"frames": 1}, {"frames": 5}, {"frames": 13}, {"height": 24, "width": 40})
    config_model = VaeConfig
    reference_runner = "vae"
    #: Encoder blocks the reference records (per chunk: the ``chunk{i}/`` scope), and quant_conv.
    reference_layers = {"encoder.conv_in": "conv_in", "encoder.down_blocks.*": "down_blocks.{0}",
                        "encoder.mid_block.resnets.*": "mid_block.resnets.{0}",
                        "encoder.mid_block.attentions.*": "mid_block.attentions.{0}",
                        "encoder.norm_out": "norm_out", "encoder.conv_out": "conv_out", "quant_conv": "quant_conv"}
    diffusers_config_key = "vae"

    def make_inputs(self, config: VaeConfig, seed: int) -> dict[str, np.ndarray]:
        return {"video": video(config.kind, config.frames, config.height, config.width, config.batch,
                               config.vae.in_channels, seed)}

    def build_reference(self, config: VaeConfig, seed: int) -> Any:
        from reference_runners import vae as reference

        return reference.build(config.vae.to_dict(), seed)

    def build_mlx(self, config: VaeConfig, weights: dict[str, np.ndarray], dtype: str) -> Any:
        from mlx_impl.vae import WanVAEEncoder, convert

        model = WanVAEEncoder.from_config(config.vae.to_dict(), chunked=config.mlx_encoding == "chunked")
        strict_load(model, encoder_weights(weights), convert=convert, dtype=getattr(mx, dtype))
        return model

    def run_mlx(self, model: Any, inputs: dict, dtype: str) -> None:
        video_cl = mx.array(np.ascontiguousarray(inputs["video"].transpose(0, 2, 3, 4, 1))).astype(getattr(mx, dtype))
        mx.eval(model.encode(video_cl))

    def views(self, run: RunContext) -> list[Section]:
        """Boundary-artifact views: where (block x chunk) and when (latent frame) the error sits, seam jumps,
        patch-period patterns, per-frame statistics. Information only: the layer verdicts localise faults."""
        blocks = [name.removeprefix("chunk0/") for name in run.ref.order if name.startswith("chunk0/")]
        chunks = 1 + (run.config.frames - 1) // 4
        return [s for s in (
            _block_chunk_heatmap(run, blocks, chunks),
            _latent_frame_heatmap(run),
            _chunk_table(run, chunks),
            _seam_table(run, blocks, chunks),
            _periodicity_table(run, chunks),
            _frame_stats_curves(run),
        ) if s is not None]


def _tensor(capture: Capture, name: str) -> np.ndarray | None:
    return capture[name] if name in capture.tensors else None


def _pair(run: RunContext, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Reference and MLX tensors of layer ``name``, or None if either is missing or their shapes differ."""
    ref, mlx = _tensor(run.ref, name), _tensor(run.mlx, name)
    if ref is None or mlx is None or ref.shape != mlx.shape:
        return None
    return ref, mlx


def _across_chunks(run: RunContext, block: str, chunks: int) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """A block's per-chunk outputs joined along time on both sides, with each chunk's first frame index."""
    pairs = [_pair(run, f"chunk{i}/{block}") for i in range(chunks)]
    if any(p is None for p in pairs):
        return None
    starts = np.cumsum([0] + [p[0].shape[2] for p in pairs[:-1]]).tolist()
    return np.concatenate([p[0] for p in pairs], axis=2), np.concatenate([p[1] for p in pairs], axis=2), starts


def _block_chunk_heatmap(run: RunContext, blocks: list[str], chunks: int) -> Section:
    values = []
    for block in blocks:
        row = []
        for i in range(chunks):
            pair = _pair(run, f"chunk{i}/{block}")
            if pair is None:
                row.append(float("nan"))
                continue
            ref, mlx = (p.astype(np.float64) for p in pair)
            rms = float(np.sqrt(np.mean(ref**2)))
            row.append(float(np.sqrt(np.mean((mlx - ref) ** 2))) / rms if rms else float("nan"))
        values.append(row)
    return Section("block_chunk_error", "Error per block and chunk (MLX vs reference)", "heatmap",
                   {"rows": blocks, "cols": [f"chunk{i}" for i in range(chunks)], "values": values,
                    "label": "rmse / rms(reference)"},
                   note="NaN (magenta): the block is missing on one side or its shapes differ.")


def _latent_frame_heatmap(run: RunContext) -> Section | None:
    pair = _pair(run, "latents")
    if pair is None:
        return None
    ref, mlx = pair
    errors = artifacts.frame_errors(ref, mlx)
    rows = ["all channels"] + [f"z{c}" for c in range(ref.shape[1])]
    values = [errors["rmse"].tolist(), *errors["rmse_channel"].tolist()]
    truth = _tensor(run.truth, "latents") if run.truth is not None else None
    if truth is not None:
        rows += ["MLX vs float64", "reference vs float64"]
        values += [artifacts.frame_errors(truth, mlx)["rmse"].tolist(), artifacts.frame_errors(truth, ref)["rmse"].tolist()]
    return Section("latent_frame_error", "Latent error per frame (each latent frame is one chunk)", "heatmap",
                   {"rows": rows, "cols": [f"f{t}" for t in range(ref.shape[2])], "values": values, "label": "rmse"})


def _chunk_table(run: RunContext, chunks: int) -> Section | None:
    pair = _pair(run, "latents")
    if pair is None or pair[0].shape[2] != chunks:
        return None
    latent = artifacts.chunk_errors(*pair, boundaries=list(range(chunks)))
    joined = _across_chunks(run, "conv_in", chunks)
    full = artifacts.chunk_errors(joined[0], joined[1], joined[2]) if joined else None
    rows = [[f"chunk{i}", "0" if i == 0 else f"{1 + 4 * (i - 1)}-{4 * i}", latent["rmse"][i], latent["max_abs"][i],
             full["rmse"][i] if full else None] for i in range(chunks)]
    rows.append(["growth (last / first)", "", latent["growth"], None, full["growth"] if full else None])
    return Section("chunk_error", "Error per chunk", "table",
                   {"columns": ["chunk", "input frames", "latents rmse", "latents max abs", "conv_in rmse"], "rows": rows})


def _seam_table(run: RunContext, blocks: list[str], chunks: int) -> Section | None:
    """Seam / inside-chunk ratios of the blocks that keep several frames per chunk."""
    rows = []
    for block in blocks:
        joined = _across_chunks(run, block, chunks)
        if joined is None or joined[0].shape[2] <= chunks:
            continue  # one frame per chunk: every transition is a seam, nothing to compare with
        report = artifacts.seam_report(*joined)
        rows.append([block, *(report[side][kind] for kind in ("mean_jump", "std_jump", "frame_diff")
                              for side in ("ref", "test")), report["error_seam_ratio"]])
    if not rows:
        return None
    return Section("seams", "Chunk seams: jump across a seam / jump inside a chunk", "table",
                   {"columns": ["block", "mean jump ref", "mean jump MLX", "std jump ref", "std jump MLX",
                                "frame diff ref", "frame diff MLX", "MLX error: chunk starts / inside"],
                    "rows": rows},
                   note="Jump ratios ~1: seams look like any other frame transition; MLX should read like the "
                        "reference. Error ratio >> 1: the MLX error sits on the first frames of chunks (causal context).")


def _periodicity_table(run: RunContext, chunks: int) -> Section | None:
    rows = []
    joined = _across_chunks(run, "conv_in", chunks)
    for name, pair, period in (("conv_in (pixel space)", joined[:2] if joined else None, PIXEL_PERIOD),
                               ("latents", _pair(run, "latents"), LATENT_PERIOD)):
        if pair is not None:
            r = artifacts.periodicity_report(*pair, period=period)
            rows.append([name, period, r["checkerboard_ref"], r["checkerboard_test"], r["checkerboard_ratio"],
                         r["periodic_power_ref"], r["periodic_power_test"], r["periodic_power_ratio"]])
    if not rows:
        return None
    return Section("periodicity", "Patch-period patterns (fraction of spatial power)", "table",
                   {"columns": ["layer", "period px", "checkerboard ref", "checkerboard MLX", "MLX / ref",
                                "periodic ref", "periodic MLX", "MLX / ref"], "rows": rows})


def _frame_stats_curves(run: RunContext) -> Section | None:
    pair = _pair(run, "latents")
    if pair is None:
        return None
    series = {}
    for label, x in (("reference", pair[0]), ("MLX", pair[1])):
        stats = artifacts.frame_stats(x)
        series[f"{label} mean"] = stats["mean"].mean(axis=0).tolist()
        series[f"{label} std"] = stats["std"].mean(axis=0).tolist()
    return Section("latent_frame_stats", "Latent mean / std per frame (channel-averaged)", "curves",
                   {"x": list(range(pair[0].shape[2])), "series": series, "xlabel": "latent frame", "ylabel": "value"})


COMPONENT = VaeComponent()
