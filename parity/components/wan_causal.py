"""Diffusion forcing with a key/value cache (``wan_causal``): SkyReels-V2's block-causal Wan transformer.

What the reference defines about a cache (diffusers 0.42.1): nothing directly. ``SkyReelsV2Transformer3DModel`` has
no cached path; with ``num_frame_per_block`` B > 1 its ``forward`` builds a block-causal mask
(``causal_mask = range_tensor.unsqueeze(0) <= range_tensor.unsqueeze(1)``, ``range_tensor`` the block of each
frame; with B = 1 there is no mask and frames attend both ways, so no cache can reproduce it). Its
diffusion-forcing pipeline (``pipeline_skyreels_v2_diffusion_forcing.py``, ``generate_timestep_matrix``) extends
the schedule with a final 0 (``step_template = torch.cat([..999.., step_template, ..0..])``), so a causal block
whose step index reached ``num_iterations`` has timestep 0 and is no longer updated (``update_mask`` excludes
``new_row == num_iterations``), yet stays in ``valid_interval`` and is fed to every later call:
``latent_model_input = latents[:, :, valid_interval_start:valid_interval_end]`` with
``timestep = t.expand(...)[:, valid_interval_start:valid_interval_end]``. Through the causal mask the keys/values
of a finished block are, at every layer, those of its final (clean) latents at t = 0, whatever comes after it:
what a cache of it must hold (``cache_from: clean``). ``cache_from: step`` caches each chunk's step's own (the one
pass over the same tokens and timesteps). A cache window is no part of diffusers (its long-video mode re-runs the
last ``base_num_frames`` frames with positions from 0); here a window keeps whole causal blocks, oldest evicted,
positions still counted from the start, and its reference is the model with its mask narrowed to what the window
keeps (:func:`window_mask`).

The component runs the reference once per chunk c (a *pass* over the frames up to chunk c's end: the chunks
before it as the cache holds them, chunk c's step) and compares

- **(a) one pass**: our one pass against the last pass, under the names of ``wan_transformer``
  (``patch_embedding``, ``rope/0``, ``condition_embedder/main/...``, ``tokens``, ``blocks.{i}/<sublayer>``,
  ``norm_out``, ``proj_out``, ``unpatchify``);
- **(b) cached vs reference**: our chunk-by-chunk run with its cache against pass c cut to chunk c:
  ``chunk{c}/blocks.{i}/q_rope`` (queries after RoPE), ``k_cache`` (the keys they attend to: the cache's and the
  chunk's own), ``attn`` and ``cross_attn`` (self- and cross-attention outputs, before ``to_out``),
  ``chunk{c}/output``;
- **(c) self-consistency**: our cached run against our own one pass over each pass, cut the same way (a section;
  needs no reference).

Plus the harness's chunk-plan invariance (one chunk against one causal block per chunk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import mlx.core as mx
import numpy as np
from pydantic import model_validator

from fixtures.inputs import normal, rng
from mlx_impl import causal as mlx_causal
from mlx_impl import transformer as mlx_transformer
from parity import invariance
from parity.capture import Capture
from parity.capture_mlx import record_taps
from parity.compare import FAIL
from parity.component import Component, RunContext, Section
from parity.components._diffusers import SkyReelsV2TransformerConfig
from parity.components.block import bf16_exact
from parity.components.transformer import MlxTransformer
from parity.config import ComponentConfig, PositiveInt
from parity.weights import strict_load

#: The chunk layers, and what they are cut from in a pass: its layer, and which tokens (chunk c's queries, or
#: the keys chunk c sees).
CHUNK_LAYERS = {"q_rope": ("attn1/q_rope", "queries"), "k_cache": ("attn1/k_rope", "keys"),
                "attn": ("attn1/attention", "queries"), "cross_attn": ("attn2/attention", "queries")}


class WanCausalConfig(ComponentConfig):
    """Latent grid, text, and the cached run: ``chunks`` (frames each, whole causal blocks), the cache ``window``
    (frames; None: everything), and what the cache holds of a chunk (``cache_from``)."""

    transformer: SkyReelsV2TransformerConfig
    batch: PositiveInt = 1
    frames: PositiveInt
    height: PositiveInt
    width: PositiveInt
    text_len: PositiveInt
    chunks: list[PositiveInt]
    window: PositiveInt | None = None
    cache_from: Literal["clean", "step"] = "clean"

    @model_validator(mode="after")
    def _plan(self) -> "WanCausalConfig":
        t = self.transformer
        block = t.num_frame_per_block
        if block < 2:
            raise ValueError("transformer.num_frame_per_block 1: diffusers builds no causal mask then (every frame "
                             "attends to every other), so no cache reproduces it; set the causal block size (> 1)")
        pt, ph, pw = t.patch_size
        if pt != 1 or self.height % ph or self.width % pw:
            raise ValueError(f"patch size {tuple(t.patch_size)}: expected 1 in time (one timestep per latent frame) "
                             f"and a divisor of height {self.height} / width {self.width}")
        if self.frames % block or sum(self.chunks) != self.frames or any(n % block for n in self.chunks):
            raise ValueError(f"chunks {self.chunks}: expected whole causal blocks of {block} frames adding up to "
                             f"frames {self.frames}")
        if self.window is not None and self.window < block:
            raise ValueError(f"window {self.window}: expected at least one causal block ({block} frames)")
        return self


class Reference(NamedTuple):
    """The diffusers model and the config its passes are laid out by."""

    model: Any
    config: WanCausalConfig


@dataclass
class Pass:
    """One call of the reference: the frames up to chunk ``[start, end)``'s end; ``kept``: the first frame the
    chunk's cache holds; ``mask``: the window's frame mask (None: the model's own)."""

    latents: np.ndarray
    timesteps: np.ndarray
    start: int
    end: int
    kept: int
    mask: np.ndarray | None


def kept_from(start: int, window: int | None, block: int) -> int:
    """The first frame a cache of ``window`` frames (whole causal blocks, oldest evicted) holds when a chunk
    starts at ``start``. Apart from :func:`mlx_impl.causal.kept_from` on purpose: the reference never runs the
    port's code."""
    return 0 if window is None else max(0, start - window // block * block)


def window_mask(chunks: Sequence[int], window: int, block: int) -> np.ndarray:
    """``(frames, frames)``: frame g is visible from frame f iff g's causal block is not after f's and the cache
    still held g when f's chunk started."""
    frames = np.arange(sum(chunks))
    first = np.concatenate([np.full(n, kept_from(int(s), window, block)) for s, n in zip(starts(chunks), chunks)])
    return (frames[None, :] // block <= frames[:, None] // block) & (frames[None, :] >= first[:, None])


def starts(chunks: Sequence[int]) -> np.ndarray:
    return np.cumsum([0, *chunks[:-1]]).astype(int)


def passes(inputs: Mapping[str, np.ndarray], config: WanCausalConfig) -> list[Pass]:
    """Pass c: the chunks before c as the cache holds them (``clean``: their final latents at t = 0; ``step``:
    their step's latents and timesteps), then chunk c's step."""
    latents, timesteps = inputs["latents"], inputs["timestep"]
    before = (inputs["clean"], np.zeros_like(timesteps)) if config.cache_from == "clean" else (latents, timesteps)
    block = config.transformer.num_frame_per_block
    found = []
    for c, (start, n) in enumerate(zip(starts(config.chunks), config.chunks)):
        end = start + n
        found.append(Pass(np.concatenate([before[0][:, :, :start], latents[:, :, start:end]], axis=2),
                          np.concatenate([before[1][:, :start], timesteps[:, start:end]], axis=1), int(start), int(end),
                          kept_from(int(start), config.window, block),
                          window_mask(config.chunks[:c + 1], config.window, block) if config.window else None))
    return found


def record_chunks(capture: Capture, records: Sequence[Capture], runs: Sequence[Pass], config: WanCausalConfig,
                  frame_axis: int) -> None:
    """Into ``capture``, per chunk c, the chunk layers cut from ``records[c]`` (a one-pass run of pass c; its
    output's frames on ``frame_axis``)."""
    _, ph, pw = config.transformer.patch_size
    per_frame = (config.height // ph) * (config.width // pw)
    for c, (p, record) in enumerate(zip(runs, records)):
        tokens = {"queries": slice(p.start * per_frame, p.end * per_frame),
                  "keys": slice(p.kept * per_frame, p.end * per_frame)}
        for i in range(config.transformer.num_layers):
            for layer, (source, which) in CHUNK_LAYERS.items():
                source = f"blocks.{i}/{source}"
                capture.add(f"chunk{c}/blocks.{i}/{layer}", np.ascontiguousarray(record[source][:, tokens[which]]),
                            record.dtypes[source])
        frames = [slice(None)] * record["unpatchify"].ndim
        frames[frame_axis] = slice(p.start, p.end)
        capture.add(f"chunk{c}/output", np.ascontiguousarray(record["unpatchify"][tuple(frames)]),
                    record.dtypes["unpatchify"])


def channels_last(array: np.ndarray, dtype: str) -> mx.array:
    """``(b, c, frames, H, W)`` numpy -> ``(b, frames, H, W, c)`` MLX in ``dtype``."""
    return mx.array(np.moveaxis(array, 1, -1)).astype(getattr(mx, dtype))


class WanCausalComponent(Component):
    name = "wan_causal"
    description = ("SkyReelsV2Transformer3DModel, block-causal with per-frame timesteps (diffusion forcing): one "
                   "pass, and chunk by chunk with a key/value cache")
    config_model = WanCausalConfig
    diffusers_config_key = "transformer"
    reference_submodule = "model"
    keep_fp32 = mlx_transformer.WAN_KEEP_FP32
    alignment = {"patch_embedding": ("patch_embedding", "channels_first"),
                 "unpatchify": ("unpatchify", "channels_first"), "chunk*/output": ("chunk{0}/output", "channels_first"),
                 "rope/0": ("rope/cos", "reshape"), "rope/1": ("rope/sin", "reshape")}
    #: one chunk of three causal blocks; a chunk of two blocks after a cached one; a window smaller than the
    #: video (chunk 2 no longer sees chunk 0); the cache from each chunk's step
    coverage = ({"chunks": [6]}, {"chunks": [2, 4]}, {"window": 2}, {"cache_from": "step"})

    # --- inputs ------------------------------------------------------------------------------------
    def make_inputs(self, config: WanCausalConfig, seed: int) -> dict[str, np.ndarray]:
        """Each chunk's step latents, every frame's final latents, one timestep per causal block, text; bf16-exact."""
        t = config.transformer
        shape = (config.batch, t.in_channels, config.frames, config.height, config.width)
        steps = rng(seed, "wan_causal/timestep").integers(1, 1000, (config.batch, config.frames // t.num_frame_per_block))
        return {"latents": bf16_exact(normal(seed, "wan_causal/latents", shape)),
                "clean": bf16_exact(normal(seed, "wan_causal/clean", shape)),
                "timestep": np.repeat(steps, t.num_frame_per_block, axis=1).astype(np.float32),
                "text": bf16_exact(normal(seed, "wan_causal/text", (config.batch, config.text_len, t.text_dim)))}

    def second_inputs(self, config: WanCausalConfig, seed: int) -> dict[str, np.ndarray]:
        """Other latents and text, timesteps mirrored (1000 - t): a cache or prompt kept from the first call shows."""
        inputs = self.make_inputs(config, seed + 1)
        inputs["timestep"] = (1000.0 - inputs["timestep"]).astype(np.float32)
        return inputs

    # --- reference ---------------------------------------------------------------------------------
    def build_reference(self, config: WanCausalConfig, seed: int) -> Reference:
        from reference_runners import causal

        return Reference(causal.build(config.transformer.to_dict(), seed), config)

    def cast_reference(self, reference: Reference, dtype: str) -> Reference:
        return Reference(super().cast_reference(reference.model, dtype), reference.config)

    def run_reference(self, reference: Reference, inputs: dict, dtype: str, capture: Capture) -> None:
        """Every pass; the last one's layers as they are (the one pass), then per chunk the layers cut from its pass."""
        import torch

        from reference_runners import causal

        runs = passes(inputs, reference.config)
        records = [causal.run_pass(reference.model, p.latents, p.timesteps, inputs["text"], p.mask, getattr(torch, dtype))
                   for p in runs]
        for name in records[-1].order:
            capture.add(name, records[-1][name], records[-1].dtypes[name])
        record_chunks(capture, records, runs, reference.config, frame_axis=2)

    # --- MLX ---------------------------------------------------------------------------------------
    def build_mlx(self, config: WanCausalConfig, weights: dict[str, np.ndarray], dtype: str) -> MlxTransformer:
        model = mlx_causal.CausalWanTransformer(mlx_causal.CausalDims.of(config.transformer.to_dict()))
        strict_load(model, weights, convert=mlx_transformer.convert_key, dtype=getattr(mx, dtype),
                    keep_float32=self.keep_fp32)
        return MlxTransformer(model, config)

    def run_mlx(self, model: MlxTransformer, inputs: dict, dtype: str) -> None:
        """Our one pass over the last pass, then the cached run over every chunk."""
        config, causal = model.config, model.model
        last = passes(inputs, config)[-1]
        text = mx.array(inputs["text"]).astype(getattr(mx, dtype))
        one = causal(channels_last(last.latents, dtype), mx.array(last.timesteps), text, config.chunks, config.window)
        clean = channels_last(inputs["clean"], dtype) if config.cache_from == "clean" else None
        mx.eval(one, causal.rollout(channels_last(inputs["latents"], dtype), mx.array(inputs["timestep"]), text,
                                    config.chunks, config.window, clean))

    # --- chunk plans ---------------------------------------------------------------------------------
    def chunk_plans(self, config: WanCausalConfig) -> tuple[Mapping[str, Any], ...]:
        """The cache from each chunk's step (no window): one chunk of every frame, and one causal block per chunk."""
        block = config.transformer.num_frame_per_block
        return tuple({"cache_from": "step", "window": None, "chunks": chunks}
                     for chunks in ([config.frames], [block] * (config.frames // block)))

    def plan_layers(self, capture: Capture, config: WanCausalConfig) -> Capture:
        """The cached run's chunk layers joined over the chunks (``cached/...``); ``k_cache`` differs by plan and
        the one pass does not depend on it: both left out."""
        joined = Capture("mlx")
        suffixes = [n.split("/", 1)[1] for n in capture.order if n.startswith("chunk0/") and not n.endswith("k_cache")]
        for suffix in suffixes:
            parts = [capture[f"chunk{c}/{suffix}"] for c in range(len(config.chunks))]
            joined.add(f"cached/{suffix}", np.concatenate(parts, axis=1), capture.dtypes[f"chunk0/{suffix}"])
        return joined

    # --- sections ----------------------------------------------------------------------------------
    def views(self, run: RunContext) -> list[Section]:
        return [self.one_pass_section(run), self.cached_section(run), self.self_consistency(run)]

    def one_pass_section(self, run: RunContext) -> Section:
        """(a) our one pass against the reference's last pass: the judged layers, per part of the model."""
        layers = [l for l in run.comparison.layers if not l.name.startswith(("chunk", "call2/"))]
        parts: dict[str, list] = {}
        part = "embeddings"
        for layer in layers:
            head = layer.name.split("/")[0]
            part = head if head.startswith("blocks.") else part if part == "embeddings" else "output"
            parts.setdefault(part, []).append(layer)
        rows = [[part, len(group), sum(l.verdict == FAIL for l in group),
                 next((l.name for l in group if l.verdict == FAIL), ""),
                 max((e for e in map(_relative, group) if not math.isnan(e)), default=math.nan)]
                for part, group in parts.items()]
        first = next((l.name for l in layers if l.verdict == FAIL), None)
        return Section("one_pass", "(a) One pass: ours against the reference's", "table",
                       {"columns": ["part", "layers", "failing", "first failing", "worst relative error"], "rows": rows},
                       passed=first is None, failing=first,
                       note="Our block-causal one pass against diffusers' over the last pass's frames (the earlier "
                            "chunks as the cache holds them, the last chunk's step). The layers are judged in the table.")

    def cached_section(self, run: RunContext) -> Section:
        """(b) our cached run against the reference's passes: relative error per chunk layer and chunk."""
        config = run.config
        judged = {l.name: l for l in run.comparison.layers}
        suffixes = [f"blocks.{i}/{layer}" for i in range(config.transformer.num_layers) for layer in CHUNK_LAYERS]
        suffixes.append("output")
        chunks = [f"chunk{c}" for c in range(len(config.chunks))]
        values = [[_relative(judged.get(f"{c}/{s}")) for c in chunks] for s in suffixes]
        failing = next((l.name for l in run.comparison.layers if l.name.startswith("chunk") and l.verdict == FAIL), None)
        return Section("cached", "(b) Cached, chunk by chunk: ours against the reference's passes", "heatmap",
                       {"rows": suffixes, "cols": chunks, "values": values, "label": "relative error (RMSE / RMS ref)"},
                       passed=failing is None, failing=failing,
                       note=f"Chunk c of our cached run (cache from each chunk's {config.cache_from} latents, window "
                            f"{config.window or 'none'}) against diffusers' one pass over the frames up to chunk c's "
                            "end, cut to chunk c. The layers are judged in the table.")

    def self_consistency(self, run: RunContext) -> Section:
        """(c) our cached run against our own one pass over each pass, cut the same way (no reference needed)."""
        config, model = run.config, run.mlx_model.model
        runs = passes(run.inputs, config)
        dtype = run.dtype
        text = mx.array(run.inputs["text"]).astype(getattr(mx, dtype))
        records = []
        for c, p in enumerate(runs):
            record = Capture("mlx")
            with record_taps(record):
                mx.eval(model(channels_last(p.latents, dtype), mx.array(p.timesteps), text, config.chunks[:c + 1],
                              config.window))
            records.append(record)
        ours = Capture("mlx")
        record_chunks(ours, records, runs, config, frame_axis=1)
        cached = Capture("mlx")
        for name in (n for n in ours.order if n in run.mlx):
            cached.add(name, run.mlx[name], run.mlx.dtypes[name])
        section = invariance.agreement("self_consistency", "(c) Self-consistency: our cached run against our one pass",
                                       ours, cached, self, run.thresholds,
                                       "Our chunk-by-chunk run against our own one pass over the same frames, cut to "
                                       "each chunk: no reference involved.")
        if run.dtype != "float32":  # bf16 rounds a masked one-pass sum and a cached one differently
            section.passed, section.failing = None, None
            section.note += " Information only in bf16 (judged in float32 runs)."
        return section


def _relative(layer: Any) -> float:
    """RMSE / RMS of the reference of a judged layer (NaN when not computed)."""
    if layer is None or layer.metrics.get("rmse") is None:
        return math.nan
    return layer.metrics["rmse"] / (layer.metrics.get("ref_rms") or math.nan)


COMPONENT = WanCausalComponent()
