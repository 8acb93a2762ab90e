"""Wan2.1 VAE decoder: chunked causal decoding, compared per block and per chunk, plus pixel-space boundary artifacts.

The reference is diffusers' ``AutoencoderKLWan.decode`` on the latents the Wan pipelines hand it
(denormalised as they do): ``post_quant_conv`` once, then the decoder one latent frame at a time
with its feature cache carried across. Latent frame 0 decodes to 1 frame, every later one to 4.
Layers: ``post_quant_conv``, ``chunk<c>/<block>`` for every decoder block of every chunk, then
``frames`` (the clamped video, ``(N, C, T, H, W)`` on [-1, 1]: ``parity video`` reads its dumps).
"""
from __future__ import annotations

from typing import Any, Literal

import mlx.core as mx
import numpy as np

from fixtures.inputs import normal
from parity.component import Component, RunContext, Section
from parity.components import _vae_views as views
from parity.components._diffusers import WanVaeConfig
from parity.config import ComponentConfig, PositiveInt
from parity.weights import strict_load

DECODINGS = ("chunked", "one_shot")


class VaeDecoderConfig(ComponentConfig):
    vae: WanVaeConfig
    latent_frames: PositiveInt
    latent_height: PositiveInt
    latent_width: PositiveInt
    batch: PositiveInt = 1
    mlx_decoding: Literal[DECODINGS] = "chunked"


def pixel_views(run: RunContext, prefix: str = "") -> list[Section]:
    """The decoder's sections: block x chunk error, and in pixel space the error per frame and chunk, seams,
    the 8 px patterns, per-frame statistics (layers under ``prefix``: ``decode/`` in the round trip)."""
    _blocks, chunks = views.chunked_blocks(run.ref, prefix)
    if not chunks:
        return []
    starts = views.chunk_starts(chunks)
    out_channels = run.config.vae.out_channels
    channels = list(views.RGB) if out_channels == 3 else [f"c{c}" for c in range(out_channels)]
    frames = f"{prefix}frames"
    joined = views.across_chunks(run, "conv_out", chunks, prefix)
    tag = prefix.strip("/") + "_" if prefix else ""
    return [s for s in (
        views.block_chunk_heatmap(run, prefix, "Decoder: " if prefix else ""),
        views.frame_error_heatmap(run, frames, f"{tag}frame_error",
                                  "Decoded video: error per frame (frame 0 is chunk 0, then 4 frames per chunk)",
                                  channels),
        views.chunk_table(run, frames, starts, "output frames", "conv_out", prefix),
        views.seam_table(run, prefix, ("frames (pixel space)", frames, starts)),
        views.periodicity_table(run, [("frames (pixel space)", views.pair(run, frames), views.PIXEL_PERIOD),
                                      ("conv_out, unclamped", joined[:2] if joined else None, views.PIXEL_PERIOD)],
                                f"{tag}periodicity"),
        views.frame_stats_curves(run, frames, f"{tag}frame_stats", "Decoded video: mean / std per frame "
                                 "(channel-averaged)", "frame"),
    ) if s is not None]


class VaeDecoderComponent(Component):
    name = "vae_decoder"
    description = ("AutoencoderKLWan (Wan2.1) decoder: pipeline denormalisation, post_quant_conv, chunked causal "
                   "decode with feature cache (1 latent frame -> 1 frame, then 4), clamp")
    #: one latent frame (first chunk only); four; odd latent sizes
    coverage = ({"latent_frames": 1}, {"latent_frames": 4}, {"latent_height": 3, "latent_width": 5})
    config_model = VaeDecoderConfig
    reference_runner = "vae_decoder"
    diffusers_config_key = "vae"

    def make_inputs(self, config: VaeDecoderConfig, seed: int) -> dict[str, np.ndarray]:
        shape = (config.batch, config.vae.z_dim, config.latent_frames, config.latent_height, config.latent_width)
        return {"latents": normal(seed, "vae_decoder/latents", shape)}

    def build_reference(self, config: VaeDecoderConfig, seed: int) -> Any:
        from reference_runners import vae as reference

        return reference.build(config.vae.to_dict(), seed)

    def build_mlx(self, config: VaeDecoderConfig, weights: dict[str, np.ndarray], dtype: str) -> Any:
        from mlx_impl.vae_decoder import WanVAEDecoder, convert, decoder_weights

        model = WanVAEDecoder.from_config(config.vae.to_dict(), chunked=config.mlx_decoding == "chunked")
        strict_load(model, decoder_weights(weights), convert=convert, dtype=getattr(mx, dtype))
        return model

    def run_mlx(self, model: Any, inputs: dict, dtype: str) -> None:
        latents = mx.array(np.ascontiguousarray(inputs["latents"].transpose(0, 2, 3, 4, 1))).astype(getattr(mx, dtype))
        mx.eval(model.decode(latents))

    def views(self, run: RunContext) -> list[Section]:
        return pixel_views(run)


COMPONENT = VaeDecoderComponent()
