"""Time embedding: Helios' sinusoid -> TimestepEmbedding -> SiLU -> projection, text projection, t=0 history embedding."""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from pydantic import Field, model_validator

from fixtures.inputs import normal
from mlx_impl.taps import tap_scope
from parity.component import Component
from parity.components._diffusers import HeliosTransformerConfig
from parity.config import ComponentConfig, NonNegativeFloat, PositiveInt
from parity.weights import strict_load

PREFIX = "condition_embedder."


class TimeEmbeddingConfig(ComponentConfig):
    transformer: HeliosTransformerConfig
    timesteps: list[NonNegativeFloat] = Field(min_length=1)
    text_len: PositiveInt
    latent_frames: PositiveInt
    latent_height: PositiveInt
    latent_width: PositiveInt

    @model_validator(mode="after")
    def _fits(self) -> "TimeEmbeddingConfig":
        bad = [t for t in self.timesteps if not 0 <= t <= 1000]
        if bad:
            raise ValueError(f"timesteps {bad}: expected values in [0, 1000]")
        _, ph, pw = self.transformer.patch_size
        if self.latent_height % ph or self.latent_width % pw:
            raise ValueError(f"latent size {self.latent_height}x{self.latent_width}: expected multiples of the "
                             f"patch size {ph}x{pw}")
        return self


class TimeEmbeddingComponent(Component):
    name = "time_embedding"
    description = "HeliosTimeTextEmbedding inside HeliosTransformer3DModel: timestep, t=0 history and text embeddings"
    #: t = 0 alone; the two ends of the training range
    coverage = ({"timesteps": [0.0]}, {"timesteps": [1000.0, 1.0]})
    config_model = TimeEmbeddingConfig
    reference_runner = "time_embedding"
    reference_submodule = "condition_embedder"
    weights_prefix = PREFIX
    diffusers_config_key = "transformer"
    keep_fp32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "history_key_scale")

    def make_inputs(self, config: TimeEmbeddingConfig, seed: int) -> dict[str, np.ndarray]:
        t = config.transformer
        batch = len(config.timesteps)
        latent_shape = (batch, t.in_channels, config.latent_frames, config.latent_height, config.latent_width)
        return {
            "timesteps": np.asarray(config.timesteps, dtype=np.float32),
            "text": normal(seed, "time_embedding/text", (batch, config.text_len, t.text_dim)),
            "latents": normal(seed, "time_embedding/latents", latent_shape),
        }

    def second_inputs(self, config: TimeEmbeddingConfig, seed: int) -> dict[str, np.ndarray]:
        """Other text and latents, and the timesteps mirrored (1000 - t): an embedding cached at the first call shows."""
        inputs = self.make_inputs(config, seed + 1)
        inputs["timesteps"] = (1000.0 - inputs["timesteps"]).astype(np.float32)
        return inputs

    def build_reference(self, config: TimeEmbeddingConfig, seed: int) -> Any:
        from reference_runners import time_embedding as reference

        return reference.build(config.transformer.to_dict(), seed)

    def build_mlx(self, config: TimeEmbeddingConfig, weights: dict[str, np.ndarray], dtype: str) -> Any:
        from mlx_impl.time_embedding import TimeTextEmbedding

        t = config.transformer
        dim = t.num_attention_heads * t.attention_head_dim
        model = TimeTextEmbedding(dim, t.freq_dim, 6 * dim, t.text_dim)
        strict_load(model, weights, dtype=getattr(mx, dtype), keep_float32=self.keep_fp32)
        return model

    def run_mlx(self, model: Any, inputs: dict, dtype: str) -> None:
        mx_dtype = getattr(mx, dtype)
        with tap_scope("t0"):
            model.history_t0(mx_dtype)
        with tap_scope("main"):
            model.embed_time(mx.array(inputs["timesteps"]), mx_dtype)
            model.embed_text(mx.array(inputs["text"]).astype(mx_dtype))


COMPONENT = TimeEmbeddingComponent()
