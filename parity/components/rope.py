"""RoPE: Helios 3-axis rotary embedding and Wan rotary embedding, plus the rotation of q/k."""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from pydantic import model_validator

from fixtures.inputs import normal
from mlx_impl import rope
from mlx_impl.taps import tap, tap_scope
from parity.component import Component
from parity.config import ComponentConfig, NonNegativeInt, PositiveFloat, PositiveInt, Triple
from parity.weights import WeightLoadError


class RopeConfig(ComponentConfig):
    rope_dim: Triple
    heads: PositiveInt
    theta: PositiveFloat
    batch: PositiveInt
    frame_start: NonNegativeInt
    num_frames: PositiveInt
    height: PositiveInt
    width: PositiveInt
    wan_patch_size: Triple
    wan_max_seq_len: PositiveInt

    @model_validator(mode="after")
    def _fits_wan_table(self) -> "RopeConfig":
        longest = max(self.num_frames, self.height, self.width)
        if longest > self.wan_max_seq_len:
            raise ValueError(f"a grid axis of {longest} positions does not fit Wan's table of wan_max_seq_len = "
                             f"{self.wan_max_seq_len} positions")
        return self


class RopeComponent(Component):
    name = "rope"
    description = "Helios HeliosRotaryPosEmbed and Wan WanRotaryPosEmbed: frequencies, cos/sin, rotated q/k"
    #: one frame; positions from 0; an odd grid; Wan's table used to its last position
    coverage = ({"num_frames": 1}, {"frame_start": 0}, {"height": 3, "width": 7},
                {"num_frames": 10, "wan_max_seq_len": 10})
    config_model = RopeConfig
    reference_runner = "rope"

    def make_inputs(self, config: RopeConfig, seed: int) -> dict[str, np.ndarray]:
        tokens = config.num_frames * config.height * config.width
        shape = (config.batch, tokens, config.heads, sum(config.rope_dim))
        frames = np.arange(config.frame_start, config.frame_start + config.num_frames, dtype=np.int64)
        return {
            "frame_indices": np.broadcast_to(frames, (config.batch, config.num_frames)).copy(),
            **{f"{model}_{name}": normal(seed, f"rope/{model}_{name}", shape)
               for model in ("helios", "wan") for name in ("q", "k")},
        }

    def second_inputs(self, config: RopeConfig, seed: int) -> dict[str, np.ndarray]:
        """Other q/k, and the frames after the first call's (a table cached at the first call shows)."""
        inputs = self.make_inputs(config, seed + 1)
        inputs["frame_indices"] = inputs["frame_indices"] + config.num_frames
        return inputs

    def build_reference(self, config: RopeConfig, seed: int) -> Any:
        from reference_runners import rope as reference

        return reference.build(config)

    def reference_weights(self, reference_modules: Any) -> dict[str, np.ndarray]:
        return {}  # frequency tables are derived from the config, not stored in checkpoints

    def cast_reference(self, reference_modules: Any, dtype: str) -> Any:
        # Both models compute their tables in float32 (Wan via float64) whatever the model dtype;
        # only q/k take the run's dtype (see run_reference).
        return reference_modules

    def build_mlx(self, config: RopeConfig, weights: dict[str, np.ndarray], dtype: str) -> Any:
        if weights:
            raise WeightLoadError(f"rope has no weights, got unused keys {sorted(weights)}")
        return config

    def run_mlx(self, config: RopeConfig, inputs: dict, dtype: str) -> None:
        mx_dtype = getattr(mx, dtype)
        with tap_scope("helios"):
            cos, sin = rope.helios_rotary_emb(mx.array(inputs["frame_indices"]), config.height, config.width,
                                              config.rope_dim, config.theta)
            for name in ("q", "k"):
                tap(f"{name}_rot", rope.apply_rotary_emb(mx.array(inputs[f"helios_{name}"]).astype(mx_dtype), cos, sin))
        with tap_scope("wan"):
            tables = rope.wan_rope_tables(sum(config.rope_dim), config.wan_max_seq_len, config.theta)
            cos, sin = rope.wan_rotary_emb(tables, config.num_frames, config.height, config.width)
            for name in ("q", "k"):
                tap(f"{name}_rot", rope.apply_rotary_emb(mx.array(inputs[f"wan_{name}"]).astype(mx_dtype), cos, sin))


COMPONENT = RopeComponent()
