"""Helios pipeline: K autoregressive chunks, each chunk's latents the short / mid / long history of the next.

Reference: diffusers' own ``HeliosPyramidPipeline.__call__`` (:mod:`reference_runners.helios_pipeline`) on a tiny
real ``HeliosTransformer3DModel``, the real ``HeliosDMDScheduler`` (pyramid stages) and a tiny real
``AutoencoderKLWan`` decoding each chunk. Ours: the same loop in MLX (:mod:`mlx_impl.helios_pipeline`) on our
transformer, scheduler and decoder. Both draw the same noise (inputs ``noise/chunk{c}``,
``block_noise/chunk{c}/stage{s}``); the text is given (no text encoder, no CFG: the distilled model).

Layers, per chunk ``chunk{c}/``: ``history/{long,mid,short}`` (what the transformer receives),
``stage{s}/timesteps``, ``stage{s}/sigmas``, ``stage0/downsample``, ``stage{s}/transition``,
``stage{s}/step{k}``, ``latents`` (the chunk's output), ``frames`` (its decode, ``(1, 3, T, H, W)`` on
[-1, 1]); then ``video`` (the chunks' frames concatenated and trimmed, what the pipeline outputs).
The transformer's blocks and the decoder's are not captured: their components check them.

Precision: ``stream`` as the transformer components' (``model``: diffusers' bf16 model; ``float32``:
the official inference's float32 residual stream, bf16 matmuls, reference under autocast). The VAE
decodes in float32 in every run but the float64 truth, as the Helios example loads it
(``AutoencoderKLWan.from_pretrained(..., torch_dtype=torch.float32)``).

Sections: ``chunks`` (curves over chunks: free-running error of the latents and frames, bf16 budget
ratios, high-frequency energy ratio of the latents and spatial-gradient ratio of the frames (the zoom
signature), ours over the reference's, with their growth from the first chunk to the last as measured);
``seams``, ``periodicity``, ``frame_stats`` (the video in pixel space: brightness / contrast / frame-difference
jumps at chunk seams vs inside chunks, 8 px patterns, mean and std per frame; :mod:`parity.artifacts`);
``teacher_forcing`` / ``teacher_forcing_chunks`` (each chunk of ours run again from the *reference's*
history, judged by the layers' rules: the first chunk whose own error breaks its limit is the culprit;
a chunk failing only free-running inherits its error through the history).

Measured on the fixture (2 blocks, 8x8 latents): a bf16 residual add in every block in the float32-stream
mode keeps each chunk within its budget (latents' budget ratio ~1.2 against ~1.1 clean) and does not grow
over chunks: each DMD step re-anchors on its x0 prediction, so the history carries no compounding error
at this depth; the deep-stream zoom fault is the transformer components' (``blocks.{i}`` culprit).

The decoded video compares with ``parity video``: ``parity video <run>/helios_pipeline-<dtype>/{ref,mlx}/video.npy
--chunk-frames 5`` (the default config: 3 chunks of 2 latent frames, 5 frames each, trimmed to 13).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
import numpy as np
from pydantic import Field, model_validator

from fixtures.inputs import normal
from mlx_impl import scheduler as sched
from mlx_impl import transformer as mlx_transformer
from mlx_impl.helios_pipeline import TEMPORAL, TERMS, Chunk, HeliosPipeline
from mlx_impl.taps import muted
from mlx_impl.vae_decoder import WanVAEDecoder, convert, decoder_weights
from parity import drift, teacher_forcing
from parity.capture import Capture
from parity.compare import FAIL, Judge, judge_tensors
from parity.component import Component, RunContext, Section
from parity.components import _vae_views as views
from parity.components._diffusers import HeliosDMDSchedulerConfig, HeliosTransformerConfig, WanVaeConfig
from parity.components.block import bf16_exact
from parity.components.scheduler import check_pyramid
from parity.components.transformer import stream_dtype
from parity.config import Bool, ComponentConfig, PositiveInt, Triple
from parity.teacher_forcing import relative_error
from parity.weights import WeightLoadError, select_prefix, strict_load

PARTS = ("transformer.", "vae.")


class HeliosPipelineConfig(ComponentConfig):
    transformer: HeliosTransformerConfig
    vae: WanVaeConfig
    scheduler: HeliosDMDSchedulerConfig
    #: Chunks generated (the pipeline's ``num_frames`` is ``chunks`` windows of ``1 + 4 (latent_frames - 1)``).
    chunks: PositiveInt
    #: ``num_latent_frames_per_chunk``.
    latent_frames: PositiveInt
    #: Latent height and width (the pipeline's are 8x these).
    height: PositiveInt
    width: PositiveInt
    #: ``history_sizes``: long, mid and 1x latent frames (the pipeline sorts them big to small).
    history_sizes: Triple
    #: ``pyramid_num_inference_steps_list``: DMD steps per stage.
    steps: list[PositiveInt] = Field(min_length=1)
    is_amplify_first_chunk: Bool = False
    text_len: PositiveInt
    stream: Literal["model", "float32"] = "model"
    teacher_forcing: Bool = True
    #: High-frequency cutoff of the latents' energy ratio (a fraction of Nyquist, :func:`parity.drift.high_frequency_energy`).
    hf_cutoff: float = Field(0.5, strict=True, ge=0, lt=1.414)

    @model_validator(mode="after")
    def _consistent(self) -> "HeliosPipelineConfig":
        t = self.transformer
        check_pyramid(self.steps, self.scheduler.stages, self.height, self.width, t.patch_size)
        if t.patch_size[0] != 1:
            raise ValueError(f"transformer.patch_size {tuple(t.patch_size)}: the pipeline patches one latent frame at a time")
        if not t.has_multi_term_memory_patch:
            raise ValueError("transformer.has_multi_term_memory_patch: the pipeline always gives history")
        if not t.in_channels == t.out_channels == self.vae.z_dim:
            raise ValueError(f"transformer in/out channels {t.in_channels}/{t.out_channels}: expected the VAE's "
                             f"z_dim {self.vae.z_dim}")
        return self


@dataclass
class MlxPipeline:
    """Our pipeline and the config its inputs are laid out by."""

    pipeline: HeliosPipeline
    config: Any


class HeliosPipelineComponent(Component):
    name = "helios_pipeline"
    description = ("HeliosPyramidPipeline: K autoregressive chunks (short/mid/long history from the earlier chunks), "
                   "DMD pyramid stages on the real transformer, each chunk decoded by the VAE")
    #: one chunk (no history but zeros); one step per stage (no DMD re-noise) except the amplified first chunk's
    coverage = ({"chunks": 1}, {"steps": [1, 1, 1], "is_amplify_first_chunk": True})
    config_model = HeliosPipelineConfig
    keep_fp32 = mlx_transformer.HELIOS_KEEP_FP32

    # --- inputs ------------------------------------------------------------------------------------
    def make_inputs(self, config: HeliosPipelineConfig, seed: int) -> dict[str, np.ndarray]:
        """The text (bf16-exact), and per chunk its noise ``(1, c, frames, h, w)`` and block-noise draws."""
        t, stages = config.transformer, config.scheduler.stages
        _, ph, pw = t.patch_size
        inputs = {"text": bf16_exact(normal(seed, "helios_pipeline/text", (1, config.text_len, t.text_dim)))}
        shape = (1, t.in_channels, config.latent_frames, config.height, config.width)
        for c in range(config.chunks):
            inputs[f"noise/chunk{c}"] = normal(seed, f"helios_pipeline/noise/chunk{c}", shape)
            for s in range(1, stages):
                scale = 2 ** (stages - 1 - s)  # stage s runs at 1/scale of the full resolution
                blocks = t.in_channels * config.latent_frames * (config.height // scale // ph) * (config.width // scale // pw)
                inputs[f"block_noise/chunk{c}/stage{s}"] = normal(seed, f"helios_pipeline/block_noise/chunk{c}/stage{s}",
                                                                  (blocks, ph * pw))
        return inputs

    # --- reference ---------------------------------------------------------------------------------
    def build_reference(self, config: HeliosPipelineConfig, seed: int) -> Any:
        from reference_runners import helios_pipeline as runner
        from reference_runners import transformer, vae

        reference = runner.Reference(transformer.build("helios", config.transformer.to_dict(), seed),
                                     vae.build(config.vae.to_dict(), seed))
        reference.config = config
        return reference

    def cast_reference(self, reference: Any, dtype: str) -> Any:
        """The transformer in ``dtype`` (its ``stream``), the VAE in float32 (float64 in the truth run)."""
        from reference_runners import helios_pipeline as runner
        from reference_runners import transformer

        config = reference.config
        model = transformer.cast(reference.transformer, dtype, stream_dtype(config.stream, dtype), self.keep_fp32)
        vae = super().cast_reference(reference.vae, "float64" if dtype == "float64" else "float32")
        return runner.Side(model, vae, config)

    def run_reference(self, reference: Any, inputs: dict, dtype: str, capture: Any) -> None:
        import torch

        from reference_runners import helios_pipeline as runner

        runner.run(reference, inputs, getattr(torch, stream_dtype(reference.config.stream, dtype)), capture)

    # --- MLX ---------------------------------------------------------------------------------------
    def build_mlx(self, config: HeliosPipelineConfig, weights: dict[str, np.ndarray], dtype: str) -> MlxPipeline:
        unused = sorted(k for k in weights if not k.startswith(PARTS))
        if unused:
            raise WeightLoadError(f"{self.name}: weights outside {list(PARTS)}: {unused[:5]}")
        mixed = stream_dtype(config.stream, dtype) != dtype
        transformer = mlx_transformer.HeliosTransformer(mlx_transformer.HeliosDims.of(config.transformer.to_dict()))
        strict_load(transformer, select_prefix(weights, "transformer."), convert=mlx_transformer.convert_key,
                    dtype=getattr(mx, dtype),
                    keep_float32=mlx_transformer.AUTOCAST_FP32 if mixed else mlx_transformer.HELIOS_KEEP_FP32)
        decoder = WanVAEDecoder.from_config(config.vae.to_dict())
        strict_load(decoder, decoder_weights(select_prefix(weights, "vae.")), convert=convert, dtype=mx.float32)
        pipeline = HeliosPipeline(transformer, sched.HeliosDMDScheduler(**config.scheduler.to_dict()), decoder,
                                  config.history_sizes, config.latent_frames, config.steps, config.is_amplify_first_chunk)
        return MlxPipeline(pipeline, config)

    @staticmethod
    def chunk_input(inputs: dict[str, np.ndarray], config: HeliosPipelineConfig, c: int) -> Chunk:
        noise = mx.array(np.ascontiguousarray(inputs[f"noise/chunk{c}"].transpose(0, 2, 3, 4, 1)))
        return Chunk(noise, [inputs[f"block_noise/chunk{c}/stage{s}"] for s in range(1, config.scheduler.stages)], c == 0)

    def run_mlx(self, model: MlxPipeline, inputs: dict, dtype: str) -> None:
        config = model.config
        chunks = [self.chunk_input(inputs, config, c) for c in range(config.chunks)]
        stream = getattr(mx, stream_dtype(config.stream, dtype))
        mx.eval(model.pipeline.generate(mx.array(inputs["text"]), chunks, stream))

    # --- sections ----------------------------------------------------------------------------------
    def views(self, run: RunContext) -> list[Section]:
        """``chunks``: per chunk, the free-running error and the high-frequency / gradient ratios (information)."""
        judged = {layer.name: layer for layer in run.comparison.layers} if run.comparison else {}
        chunks = [c for c in range(run.config.chunks) if f"chunk{c}/latents" in run.ref]
        bf16 = run.truth is not None
        series: dict[str, list[float]] = {name: [] for name in (
            "relative error (latents)", "relative error (frames)", "HF energy ratio (latents, ours / ref)",
            "gradient ratio (frames, ours / ref)", *(("budget ratio (latents)", "budget ratio (frames)",
                                                      "HF energy ratio (latents, ref / float64)") if bf16 else ()))}
        cutoff = run.config.hf_cutoff
        for c in chunks:
            latents, frames = f"chunk{c}/latents", f"chunk{c}/frames"
            for part, name in (("latents", latents), ("frames", frames)):
                series[f"relative error ({part})"].append(relative_error(judged.get(name)))
                if bf16:
                    layer = judged.get(name)
                    budget = layer.metrics.get("budget_ratio") if layer is not None else None
                    series[f"budget ratio ({part})"].append(math.nan if budget is None else budget)
            series["HF energy ratio (latents, ours / ref)"].append(
                _ratio(run, latents, lambda x: drift.high_frequency_energy(x, cutoff)))
            series["gradient ratio (frames, ours / ref)"].append(
                _ratio(run, frames, lambda x: drift.mean_gradient(x, axes=(-2, -1))))
            if bf16:
                hf = [drift.high_frequency_energy(np.asarray(x[latents]), cutoff) for x in (run.ref, run.truth)]
                series["HF energy ratio (latents, ref / float64)"].append(hf[0] / hf[1] if hf[1] else math.nan)
        starts = video_starts(run.config, run.ref.shapes["video"][2]) if "video" in run.ref else []
        sections = [Section("chunks", "Chunk by chunk: error compounding through the history", "curves",
                            {"x": [f"chunk{c}" for c in chunks], "series": series, "xlabel": "chunk",
                             "ylabel": "error / ratio", "log": True},
                            note=growth_note(series) + " Information only: every layer is judged in the table."),
                    views.seam_table(run, frames=("video (pixel space)", "video", starts), per_block=False),
                    views.periodicity_table(run, [("video (pixel space)", views.pair(run, "video"), views.PIXEL_PERIOD)]),
                    views.frame_stats_curves(run, "video", "frame_stats", "Video: brightness (mean) and contrast (std) "
                                             "per frame", "frame")]
        return [section for section in sections if section is not None]

    def extra_runs(self, run: RunContext) -> list[Section]:
        if not run.config.teacher_forcing or run.reference is None or run.thresholds is None:
            return []
        return self.teacher_forcing(run)

    def teacher_forcing(self, run: RunContext) -> list[Section]:
        """Each chunk of ours run again from the reference's history (the state its transformer saw), its latents
        judged against the reference's; in bf16 against the float64 pipeline run from that same state."""
        import torch

        from reference_runners import helios_pipeline as runner

        config, dtype = run.config, run.dtype
        judge = Judge(self.lineage(), dtype, run.thresholds)
        truth = self.cast_reference(run.reference, "float64") if dtype != "float32" else None
        judged = {layer.name: layer for layer in run.comparison.layers}
        stream = getattr(mx, stream_dtype(config.stream, dtype))
        labels, local, inherited, diverged = [], [], [], []
        for c in range(config.chunks):
            name = f"chunk{c}/latents"
            if name not in run.ref or any(f"chunk{c}/history/{t}" not in run.ref for t in TERMS):
                break
            window, prefix = forced_start(run.ref, c)
            with muted():
                out = run.mlx_model.pipeline.chunk(mx.array(window), None if prefix is None else mx.array(prefix),
                                                   mx.array(run.inputs["text"]), self.chunk_input(run.inputs, config, c),
                                                   stream)
                mx.eval(out)
            truth_out = None
            if truth is not None:
                capture = Capture("truth")
                with torch.no_grad():
                    runner.run(truth, run.inputs, torch.float64, capture, runner.Start(c, window, prefix))
                truth_out = capture[name]
            tol, exact = judge.tolerances(name)
            local.append(judge_tensors(name, name, np.asarray(run.ref[name]), np.array(out.astype(mx.float32)), truth_out,
                                       tol, exact, run.ref.dtypes[name], str(out.dtype).removeprefix("mlx.core.")))
            inherited.append(judged.get(name))
            diverged.append(any(layer.verdict == FAIL for key, layer in judged.items() if key.startswith(f"chunk{c}/")))
            labels.append(f"chunk{c}")
        return teacher_forcing.sections(labels, local, inherited, diverged, dtype, "chunk")


def video_starts(config: HeliosPipelineConfig, frames: int) -> list[int]:
    """The first frame of each chunk in the ``frames``-frame video: every chunk decodes to ``1 + 4 (latent_frames - 1)``."""
    window = 1 + TEMPORAL * (config.latent_frames - 1)
    return [c * window for c in range(config.chunks) if c * window < frames]


def forced_start(ref: Any, chunk: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The history window (channels-last, ``[long, mid, short[1:]]``) and prefix (``short[:1]``; None for chunk 0,
    the pipeline's zeros) chunk ``chunk`` started from in the reference run: the history its transformer received."""
    long, mid, short = (np.asarray(ref[f"chunk{chunk}/history/{t}"]) for t in TERMS)
    return np.concatenate([long, mid, short[:, 1:]], axis=1), (short[:, :1] if chunk else None)


def _ratio(run: RunContext, name: str, measure) -> float:
    """``measure`` of our tensor over the reference's (NaN when ours is missing or misshapen)."""
    if name not in run.mlx or run.mlx.shapes[name] != run.ref.shapes[name]:
        return math.nan
    ref = measure(np.asarray(run.ref[name]))
    return measure(np.asarray(run.mlx[name])) / ref if ref else math.nan


def growth_note(series: dict[str, list[float]]) -> str:
    """How each curve changed from the first chunk to the last (the compounding, measured in this run)."""
    parts = []
    for label, values in series.items():
        if len(values) >= 2 and all(math.isfinite(v) for v in (values[0], values[-1])):
            change = f" (x{values[-1] / values[0]:.3g})" if values[0] else ""
            parts.append(f"{label} {values[0]:.3g} -> {values[-1]:.3g}{change}")
    return ("From the first chunk to the last: " + "; ".join(parts) + ".") if parts else "One chunk: no growth to show."


COMPONENT = HeliosPipelineComponent()
