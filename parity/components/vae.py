"""Wan2.1 VAE encoder: chunked causal encoding, compared per block and per chunk, plus boundary-artifact metrics."""
from __future__ import annotations

from typing import Any, Literal

import mlx.core as mx
import numpy as np
from pydantic import field_validator

from fixtures.videos import KINDS, video
from parity.component import Component, RunContext, Section
from parity.components import _vae_views as views
from parity.components._diffusers import WanVaeConfig
from parity.config import ComponentConfig, PositiveInt
from parity.weights import strict_load

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
        from mlx_impl.vae_decoder import encoder_weights

        model = WanVAEEncoder.from_config(config.vae.to_dict(), chunked=config.mlx_encoding == "chunked")
        strict_load(model, encoder_weights(weights), convert=convert, dtype=getattr(mx, dtype))
        return model

    def run_mlx(self, model: Any, inputs: dict, dtype: str) -> None:
        video_cl = mx.array(np.ascontiguousarray(inputs["video"].transpose(0, 2, 3, 4, 1))).astype(getattr(mx, dtype))
        mx.eval(model.encode(video_cl))

    def views(self, run: RunContext) -> list[Section]:
        """Boundary-artifact views: where (block x chunk) and when (latent frame) the error sits, seam jumps,
        patch-period patterns, per-frame statistics. Information only: the layer verdicts localise faults."""
        _blocks, chunks = views.chunked_blocks(run.ref)
        joined = views.across_chunks(run, "conv_in", chunks)
        return [s for s in (
            views.block_chunk_heatmap(run),
            views.frame_error_heatmap(run, "latents", "latent_frame_error",
                                      "Latent error per frame (each latent frame is one chunk)",
                                      [f"z{c}" for c in range(run.config.vae.z_dim)]),
            views.chunk_table(run, "latents", list(range(chunks)), "input frames", "conv_in"),
            views.seam_table(run),
            views.periodicity_table(run, [("conv_in (pixel space)", joined[:2] if joined else None, views.PIXEL_PERIOD),
                                          ("latents", views.pair(run, "latents"), views.LATENT_PERIOD)]),
            views.frame_stats_curves(run, "latents", "latent_frame_stats",
                                     "Latent mean / std per frame (channel-averaged)", "latent frame"),
        ) if s is not None]


COMPONENT = VaeComponent()
