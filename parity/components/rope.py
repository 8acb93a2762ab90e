"""RoPE: Helios 3-axis rotary embedding and Wan rotary embedding, plus the rotation of q/k."""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from fixtures.inputs import normal
from mlx_impl import rope
from mlx_impl.taps import tap, tap_scope
from parity.capture import Capture
from parity.component import Component


class RopeComponent(Component):
    name = "rope"
    description = "Helios HeliosRotaryPosEmbed and Wan WanRotaryPosEmbed: frequencies, cos/sin, rotated q/k"
    reference_runner = "rope"

    def make_inputs(self, config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
        tokens = config["num_frames"] * config["height"] * config["width"]
        head_dim = sum(config["rope_dim"])
        shape = (config["batch"], tokens, config["heads"], head_dim)
        start = config["frame_start"]
        frames = np.arange(start, start + config["num_frames"], dtype=np.int64)
        return {
            "frame_indices": np.broadcast_to(frames, (config["batch"], config["num_frames"])).copy(),
            **{f"{model}_{name}": normal(seed, f"rope/{model}_{name}", shape)
               for model in ("helios", "wan") for name in ("q", "k")},
        }

    def build_reference(self, config: dict[str, Any], seed: int) -> Any:
        from reference_runners import rope as reference

        return reference.build(config)

    def reference_weights(self, reference_modules: Any) -> dict[str, np.ndarray]:
        return {}  # frequency tables are derived from the config, not stored in checkpoints

    def cast_reference(self, reference_modules: Any, dtype: str) -> Any:
        # Both models compute their tables in float32 (Wan via float64) whatever the model dtype;
        # only q/k take the run's dtype (see run_reference).
        return reference_modules

    def build_mlx(self, config: dict[str, Any], weights: dict[str, np.ndarray], dtype: str) -> Any:
        if weights:
            raise KeyError(f"rope has no weights, got unused keys {sorted(weights)}")
        return config

    def run_mlx(self, config: Any, inputs: dict, dtype: str, capture: Capture) -> None:
        from parity.capture import capture_mlx

        mx_dtype = getattr(mx, dtype)
        with capture_mlx(capture):
            with tap_scope("helios"):
                cos, sin = rope.helios_rotary_emb(mx.array(inputs["frame_indices"]), config["height"], config["width"],
                                                  config["rope_dim"], config["theta"])
                for name in ("q", "k"):
                    tap(f"{name}_rot", rope.apply_rotary_emb(mx.array(inputs[f"helios_{name}"]).astype(mx_dtype), cos, sin))
            with tap_scope("wan"):
                head_dim = sum(config["rope_dim"])
                tables = rope.wan_rope_tables(head_dim, config["wan_max_seq_len"], config["theta"])
                cos, sin = rope.wan_rotary_emb(tables, config["num_frames"], config["height"], config["width"])
                for name in ("q", "k"):
                    tap(f"{name}_rot", rope.apply_rotary_emb(mx.array(inputs[f"wan_{name}"]).astype(mx_dtype), cos, sin))


COMPONENT = RopeComponent()
