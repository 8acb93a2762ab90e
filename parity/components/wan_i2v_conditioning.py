"""Wan2.1/2.2 image-to-video conditioning: first-frame mask, image latents from the VAE encoder, the concatenation.

Layers (channels-last): ``mask`` (the first-frame mask folded into ``scale_factor_temporal``
channels per latent frame), ``image_latents`` (the image followed by zero frames, encoded and
normalised), ``conditioning`` (noise latents, mask and image latents along channels: the
transformer input, ``in_dim`` = z_dim + 4 + z_dim; Wan2.2 I2V A14B 16 + 4 + 16 = 36, the tiny test
VAE 4 + 4 + 4 = 12). The reference is the pipeline's own ``prepare_latents`` on a real
``AutoencoderKLWan`` (:mod:`reference_runners.wan_i2v`); the image is frame 0 of a
``fixtures.videos`` video (``image_kind``), in [-1, 1].

The run's dtype is the transformer's: only ``conditioning`` is cast to it. The Wan I2V pipelines
load the VAE in float32, so both sides keep it there in a bf16 run (float64 in the truth run).
The VAE encoder itself is compared block by block by the ``vae`` component.
"""
from __future__ import annotations

from typing import Any, Literal

import mlx.core as mx
import numpy as np
from pydantic import model_validator

from fixtures.inputs import normal
from fixtures.videos import KINDS, video
from mlx_impl.vae_decoder import encoder_weights
from parity.component import Component
from parity.components._diffusers import WanVaeConfig
from parity.config import ComponentConfig, PositiveInt
from parity.weights import strict_load


class WanI2VConditioningConfig(ComponentConfig):
    vae: WanVaeConfig
    batch: PositiveInt = 1
    num_frames: PositiveInt
    height: PositiveInt
    width: PositiveInt
    image_kind: Literal[KINDS]

    @model_validator(mode="after")
    def _sizes(self) -> "WanI2VConditioningConfig":
        vae = self.vae
        temporal, spatial = 2 ** sum(vae.temperal_downsample), 2 ** (len(vae.dim_mult) - 1)
        if (vae.scale_factor_temporal, vae.scale_factor_spatial) != (temporal, spatial):
            raise ValueError(f"vae scale factors ({vae.scale_factor_temporal}, {vae.scale_factor_spatial}): the encoder "
                             f"downsamples by ({temporal}, {spatial}); the pipeline sizes its latents by the factors")
        if (self.num_frames - 1) % temporal:
            raise ValueError(f"num_frames {self.num_frames}: expected 1 + {temporal}k frames")
        if self.height % spatial or self.width % spatial:
            raise ValueError(f"height x width {self.height}x{self.width}: expected multiples of {spatial}")
        return self


class WanI2VConditioningComponent(Component):
    name = "wan_i2v_conditioning"
    description = ("WanImageToVideoPipeline conditioning: first-frame mask, VAE image latents, and the "
                   "[latents, mask, image latents] transformer input")
    #: the image alone (one frame); three latent frames; a non-square size
    coverage = ({"num_frames": 1}, {"num_frames": 9}, {"height": 24, "width": 40})
    config_model = WanI2VConditioningConfig
    reference_runner = "wan_i2v"
    diffusers_config_key = "vae"
    reference_submodule = "vae"

    def make_inputs(self, config: WanI2VConditioningConfig, seed: int) -> dict[str, np.ndarray]:
        vae = config.vae
        frames = (config.num_frames - 1) // vae.scale_factor_temporal + 1
        shape = (config.batch, vae.z_dim, frames, config.height // vae.scale_factor_spatial,
                 config.width // vae.scale_factor_spatial)
        image = video(config.image_kind, 1, config.height, config.width, config.batch, vae.in_channels, seed)[:, :, 0]
        return {"image": np.ascontiguousarray(image), "latents": normal(seed, "wan_i2v/latents", shape)}

    def build_reference(self, config: WanI2VConditioningConfig, seed: int) -> Any:
        from reference_runners import vae
        from reference_runners.wan_i2v import Reference

        return Reference(vae.build(config.vae.to_dict(), seed), config.num_frames)

    def cast_reference(self, reference: Any, dtype: str) -> Any:
        """The VAE stays float32 in a bf16 run (the dtype is the transformer's); float64 in the truth run."""
        return super().cast_reference(reference, "float32" if dtype == "bfloat16" else dtype)

    def build_mlx(self, config: WanI2VConditioningConfig, weights: dict[str, np.ndarray], dtype: str) -> Any:
        from mlx_impl.vae import WanVAEEncoder, convert

        model = WanVAEEncoder.from_config(config.vae.to_dict())
        strict_load(model, encoder_weights(weights), convert=convert, dtype=mx.float32)  # float32 in every run
        return model, config

    def run_mlx(self, model: Any, inputs: dict, dtype: str) -> None:
        from mlx_impl import wan_i2v

        vae, config = model
        mx.eval(wan_i2v.prepare_conditioning(
            vae, mx.array(inputs["image"].transpose(0, 2, 3, 1)), mx.array(inputs["latents"].transpose(0, 2, 3, 4, 1)),
            config.num_frames, getattr(mx, dtype), config.vae.scale_factor_temporal, config.vae.scale_factor_spatial))


COMPONENT = WanI2VConditioningComponent()
