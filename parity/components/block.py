"""Helios DiT transformer block: per-sublayer parity, precision budget, and drift over recurrent application.

Config key ``stream`` sets how a bfloat16 run is computed, on both sides:

- ``"model"`` (the default): the whole block in bf16, as diffusers runs it with
  ``torch_dtype=torch.bfloat16`` (fp32 modules kept). The reference rounds its own residual
  stream to bf16 after every add.
- ``"float32"``: mixed precision as the official Wan / Helios inference runs it: float32
  weights and residual stream, the real block under ``torch.autocast("cpu", bfloat16)`` (its
  Linear layers and attention in bf16, its ``.type_as(hidden_states)`` keeping the stream
  float32); ours with bf16 Linear weights and a float32 stream. Only here can a port that
  rounds the stream to bf16 (the "zoom" bug) be told from the reference.

The float64 truth run and float32 runs are plain runs in that dtype in both modes. The default
config (what ``make parity COMPONENT=block`` runs) stays ``"model"``, diffusers' own bf16 path;
``fixtures/configs/block_mixed.json`` (``parity run block --dtype bfloat16 --config
fixtures/configs/block_mixed.json``) is the mixed-precision run, with ``stream_scale`` 4 (see
:meth:`BlockComponent.stream_grid`); ``wan_block`` takes the same keys as overrides.

Config key ``attention_maps`` (``"auto"``, true, false; ``parity run --attention-maps``): both
sides record each attention call's probabilities as ``attn1/probs`` / ``attn2/probs``, judged per
head (:mod:`parity.attention`); ``"auto"`` records them while a map holds at most
``parity.attention.AUTO_MAX_ELEMENTS`` probabilities (every fixture config, the 14B one included).
Helios' ``history_attention: "restricted"``: history tokens attend to history keys only.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal

import mlx.core as mx
import numpy as np
from pydantic import Field

from fixtures.inputs import normal
from mlx_impl import block as mlx_block
from mlx_impl import rope as mlx_rope
from mlx_impl.taps import muted, requesting
from parity import attention, drift
from parity.capture import Capture
from parity.component import Component, RunContext, Section
from parity.components._diffusers import HeliosTransformerConfig
from parity.config import Bool, ComponentConfig, NonNegativeInt, PositiveFloat, PositiveInt
from parity.weights import strict_load
from reference_runners.layers import BLOCK_LAYERS


def bf16_exact(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to the nearest bfloat16 (kept float32), so every dtype's run starts from the same values.

    Then the float64 truth and the bf16 runs see identical inputs and the precision budget
    measures arithmetic alone, not the rounding of the inputs (which would mask small faults).
    """
    return np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))


@dataclass
class MlxBlock:
    """Our block and the config its inputs are laid out by."""

    block: Any
    config: Any


class GridConfig(ComponentConfig):
    """The token grid a DiT block runs on, the drift run, and the precision mode."""

    batch: PositiveInt = 1
    frames: PositiveInt
    height: PositiveInt
    width: PositiveInt
    text_len: PositiveInt
    temb_scale: PositiveFloat = 1.0
    drift_steps: PositiveInt = 12
    hf_cutoff: float = Field(0.5, strict=True, ge=0, lt=1.414)
    #: How a bfloat16 run is computed (see the module docstring).
    stream: Literal["model", "float32"] = "model"
    stream_scale: PositiveFloat = 1.0
    #: Record and judge attention probability maps (see the module docstring).
    attention_maps: Literal["auto"] | Bool = "auto"


class BlockConfig(GridConfig):
    transformer: HeliosTransformerConfig
    history_frames: NonNegativeInt = 1
    #: ``"restricted"``: history tokens attend to history keys only (main tokens to all).
    history_attention: Literal["full", "restricted"] = "full"


class BlockComponent(Component):
    name = "block"
    description = "HeliosTransformerBlock: modulation, self-attention with RoPE and history tokens, text cross-attention, FFN"
    #: history off; more history than frames; an odd grid
    coverage = ({"history_frames": 0}, {"history_frames": 3, "frames": 1}, {"height": 5, "width": 7})
    config_model = BlockConfig
    reference_layers = BLOCK_LAYERS
    diffusers_config_key = "transformer"
    reference_submodule = "block"
    weights_prefix = "blocks.0."
    keep_fp32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "history_key_scale")
    #: Mixed precision (``stream: float32``): under autocast only the Linear layers compute in bf16.
    autocast_fp32 = (*keep_fp32, "norm_q", "norm_k")

    # --- configuration and inputs -------------------------------------------------------------
    def stream_dtype(self, config: BlockConfig, dtype: str) -> str:
        """The dtype of the residual stream, inputs, norms and modulation in a ``dtype`` run.

        float32 for a bf16 run with ``"stream": "float32"`` (mixed precision), else ``dtype``.
        """
        return "float32" if config.stream == "float32" and dtype == "bfloat16" else dtype

    def stream_grid(self, config: dict[str, Any], seed: int, stream: str, shape: tuple[int, ...]) -> np.ndarray:
        """A residual-stream input: a structured token grid times ``stream_scale``, bf16-exact.

        ``stream_scale`` is the stream's size relative to one block's update (about 1 at scale
        1: norm1 makes the update independent of it). Deep in a DiT the stream carries the sum
        of all earlier blocks' updates: ~sqrt(k) times one update after k roughly independent
        ones, 4.5 halfway through Wan-14B's 40 blocks; there rounding the stream costs more
        than the update's own bf16 error. block_mixed.json uses 4; at 1 the bf16-rounded stream
        costs only 1.6-1.75x the reference's error at residual1 and is not separable from it.
        """
        return bf16_exact(config.stream_scale * drift.structured_grid(seed, stream, shape))

    def dim(self, config: Any) -> int:
        return config.transformer.num_attention_heads * config.transformer.attention_head_dim

    def history_len(self, config: Any) -> int:
        """History tokens before the main ones (Helios; none in Wan)."""
        return getattr(config, "history_frames", 0) * config.height * config.width

    def maps_on(self, config: Any) -> bool:
        """Whether both sides record attention maps (config ``attention_maps``; the largest is the self-attention's)."""
        tokens = self.history_len(config) + config.frames * config.height * config.width
        return attention.enabled(config.attention_maps, config.batch * config.transformer.num_attention_heads * tokens ** 2)

    def attention_groups(self, config: Any) -> dict[str, dict[str, tuple[int, int]]]:
        """The self-attention's history keys (Helios); cross-attention keys are all text."""
        history = self.history_len(config)
        return {"attn1/probs": {"history": (0, history)}} if history else {}

    def make_inputs(self, config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
        """Token grids with smooth and near-Nyquist content, text tokens, timestep projections; all bf16-exact."""
        dim, batch = self.dim(config), config.batch
        grid = (config.height, config.width, dim)
        history = config.history_frames
        frames = np.arange(history, history + config.frames, dtype=np.int64)
        return {
            "hidden": self.stream_grid(config, seed, "block/hidden", (batch, config.frames, *grid)),
            "history": self.stream_grid(config, seed, "block/history", (batch, history, *grid)),
            "frame_indices": np.broadcast_to(frames, (batch, config.frames)).copy(),
            "history_indices": np.broadcast_to(np.arange(history, dtype=np.int64), (batch, history)).copy(),
            "text": bf16_exact(normal(seed, "block/text", (batch, config.text_len, dim))),
            "timestep_proj": bf16_exact(normal(seed, "block/timestep_proj", (batch, 6 * dim), config.temb_scale)),
            "timestep_proj_t0": bf16_exact(normal(seed, "block/timestep_proj_t0", (1, 6 * dim), config.temb_scale)),
        }

    # --- reference --------------------------------------------------------------------------------
    def build_reference(self, config: dict[str, Any], seed: int) -> Any:
        from reference_runners import block as reference

        return reference.Reference(reference.build_helios(config.transformer, seed), config)

    def cast_reference(self, reference: Any, dtype: str) -> Any:
        """The block in ``dtype``; in mixed precision, float32 and run under autocast to ``dtype``."""
        stream = self.stream_dtype(reference.config, dtype)
        return replace(reference, block=super().cast_reference(reference.block, stream),
                       autocast=dtype if stream != dtype else None)

    def reference_inputs(self, reference: Any, inputs: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
        import torch

        from reference_runners import block as ref_runner

        stream = self.stream_dtype(reference.config, dtype)
        return ref_runner.helios_block_inputs(reference.config, inputs, getattr(torch, stream))

    def run_reference(self, reference: Any, inputs: dict, dtype: str, capture: Capture) -> None:
        import torch

        from reference_runners import block as ref_runner

        ref_runner.run_helios(reference, inputs, getattr(torch, self.stream_dtype(reference.config, dtype)), capture,
                              maps=self.maps_on(reference.config))

    # --- MLX -----------------------------------------------------------------------------------
    def build_mlx(self, config: BlockConfig, weights: dict[str, np.ndarray], dtype: str) -> Any:
        t = config.transformer
        block = mlx_block.HeliosTransformerBlock(
            self.dim(config), t.ffn_dim, t.num_attention_heads, t.cross_attn_norm, t.eps,
            guidance_cross_attn=t.guidance_cross_attn, is_amplify_history=t.is_amplify_history,
            history_scale_mode=t.history_scale_mode, restrict_history=config.history_attention == "restricted")
        return self.load_mlx(block, config, weights, dtype)

    def load_mlx(self, block: Any, config: Any, weights: dict[str, np.ndarray], dtype: str) -> MlxBlock:
        """Strict-load ``block`` in ``dtype``; in mixed precision only its Linear layers are cast."""
        mixed = self.stream_dtype(config, dtype) != dtype
        strict_load(block, weights, convert=mlx_block.convert_key, dtype=getattr(mx, dtype),
                    keep_float32=self.autocast_fp32 if mixed else self.keep_fp32)
        return MlxBlock(block, config)

    def mlx_inputs(self, model: MlxBlock, inputs: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
        """The block's arguments: history then main tokens, per-token timestep projections, RoPE cos/sin."""
        t, mx_dtype = model.config.transformer, getattr(mx, self.stream_dtype(model.config, dtype))
        batch, _, height, width, dim = inputs["hidden"].shape
        history_len, main_len = (int(np.prod(inputs[k].shape[1:4])) for k in ("history", "hidden"))
        cos, sin = (mx.concatenate(parts, axis=1) for parts in zip(*[
            mlx_rope.helios_rotary_emb(mx.array(inputs[k]), height, width, t.rope_dim, t.rope_theta)
            for k in ("history_indices", "frame_indices")]))
        tokens = [mx.array(inputs[k]).reshape(batch, n, dim) for k, n in (("history", history_len), ("hidden", main_len))]
        temb = mlx_block.helios_timestep_proj(mx.array(inputs["timestep_proj"]).astype(mx_dtype),
                                              mx.array(inputs["timestep_proj_t0"]).astype(mx_dtype), history_len, main_len)
        return {"x": mx.concatenate(tokens, axis=1).astype(mx_dtype), "context": mx.array(inputs["text"]).astype(mx_dtype),
                "temb": temb, "rope": (cos, sin), "history_len": history_len}

    def run_mlx(self, model: Any, inputs: dict, dtype: str) -> None:
        maps = isinstance(model, MlxBlock) and self.maps_on(model.config)  # a port's model is its own
        with requesting(mlx_block.ATTENTION_MAPS) if maps else nullcontext():
            mx.eval(self.mlx_apply(model, inputs, dtype))

    def mlx_apply(self, model: Any, inputs: dict, dtype: str, x: mx.array | None = None) -> mx.array:
        """One application of the block to the tokens ``x`` ``(batch, history + main, dim)`` (default: the
        inputs'), returning its output tokens; the drift run feeds them back. A port overrides this."""
        with muted():  # the RoPE tables are the rope component's
            args = self.mlx_inputs(model, inputs, dtype)
        if x is not None:
            args["x"] = x
        return model.block(**args)

    # --- drift ---------------------------------------------------------------------------------
    def main_grid(self, config: Any, tokens: np.ndarray) -> np.ndarray:
        """The main (non-history) tokens of ``(batch, tokens, dim)`` as a ``(batch, frames, height, width, dim)`` grid."""
        main = config.frames * config.height * config.width
        return tokens[:, -main:].reshape(tokens.shape[0], config.frames, config.height, config.width, -1)

    def mlx_recurrent(self, model: Any, inputs: dict[str, np.ndarray], dtype: str, steps: int) -> list[np.ndarray]:
        x, outputs = None, []
        for _ in range(steps):
            x = self.mlx_apply(model, inputs, dtype, x)
            outputs.append(np.array(x.astype(mx.float32)))
        return outputs

    def extra_runs(self, run: RunContext) -> list[Section]:
        """Drift: the block applied recurrently on both sides and in float64 (needs the models)."""
        from reference_runners import block as ref_runner

        steps, cutoff = run.config.drift_steps, run.config.hf_cutoff
        sides = {}
        for side, dtype in (("truth", "float64"), ("ref", run.dtype)):
            reference = self.cast_reference(run.reference, dtype)
            sides[side] = ref_runner.run_recurrent(reference, self.reference_inputs(reference, run.inputs, dtype), steps)
        mlx = self.mlx_recurrent(run.mlx_model, run.inputs, run.dtype, steps)
        series = drift.drift_series(sides["truth"], sides["ref"], mlx, lambda x: self.main_grid(run.config, x), cutoff)
        tolerance = run.thresholds.for_component(self.lineage(), run.dtype) if run.thresholds else None
        bound = tolerance.drift_ratio if tolerance else None
        level = tolerance.budget_ratio if tolerance else None
        failing = None if bound is None else drift.first_failing_step(series, bound, level)
        data = {"x": list(range(1, steps + 1)), "series": series, "xlabel": "application of the block",
                "ylabel": "relative error vs float64 / ratio", "log": True}
        if bound is None:
            return [Section("drift", "Drift over recurrent application", "curves", data,
                            note="no drift_ratio in the thresholds: not judged")]
        budget = "" if level is None else f"error ratio against float64 <= {level:g} (the layers' precision budget), "
        note = (f"per step: {budget}error growth (that ratio over the first step's, floored at 1) <= {bound:g} and "
                f"HF ratio (ours / reference's) within [1/{bound:g}, {bound:g}]. End: error ratio "
                f"{series['error_ratio'][-1]:.3g}, growth {series['error_growth'][-1]:.3g}, HF ratio {series['hf_ratio'][-1]:.4g}")
        return [Section("drift", "Drift over recurrent application", "curves", data, passed=failing is None,
                        failing=None if failing is None else f"drift/step{failing + 1}", note=note)]


COMPONENT = BlockComponent()
