"""Wan2.1 VAE round trip: a video encoded to the pipelines' normalised latents and decoded back, ours vs the reference.

Both halves run as their own components do (chunked, with the feature cache), so the layers are the
encoder's under ``encode/`` and the decoder's under ``decode/``. Beyond the per-layer verdict, each
side's decoded video is held against the input video (PSNR and SSIM per frame): with random weights
both are far from it, but equally far.
"""
from __future__ import annotations

from typing import Any, Literal, NamedTuple

import mlx.core as mx
import numpy as np

from parity import video
from parity.component import Component, RunContext, Section
from parity.components import _vae_views as views
from parity.components.vae import VaeConfig
from parity.components.vae_decoder import DECODINGS, pixel_views
from parity.weights import strict_load


class VaeRoundtripConfig(VaeConfig):
    mlx_decoding: Literal[DECODINGS] = "chunked"


class Halves(NamedTuple):
    encoder: Any
    decoder: Any


class VaeRoundtripComponent(Component):
    name = "vae_roundtrip"
    description = "AutoencoderKLWan (Wan2.1) encode -> decode: both halves chunked with feature cache, vs each other and the input"
    #: one frame; a non-square size with odd latents
    coverage = ({"frames": 1}, {"height": 24, "width": 40})
    config_model = VaeRoundtripConfig
    diffusers_config_key = "vae"

    def make_inputs(self, config: VaeRoundtripConfig, seed: int) -> dict[str, np.ndarray]:
        from fixtures.videos import video as test_video

        return {"video": test_video(config.kind, config.frames, config.height, config.width, config.batch,
                                    config.vae.in_channels, seed)}

    def build_reference(self, config: VaeRoundtripConfig, seed: int) -> Any:
        from reference_runners import vae as reference

        return reference.build(config.vae.to_dict(), seed)

    def run_reference(self, reference: Any, inputs: dict[str, np.ndarray], dtype: str, capture: Any) -> None:
        import torch

        from reference_runners.vae_decoder import run_roundtrip

        run_roundtrip(reference, inputs, getattr(torch, dtype), capture)

    def build_mlx(self, config: VaeRoundtripConfig, weights: dict[str, np.ndarray], dtype: str) -> Halves:
        from mlx_impl.vae import WanVAEEncoder
        from mlx_impl.vae_decoder import WanVAEDecoder, convert, decoder_weights, encoder_weights

        vae, mx_dtype = config.vae.to_dict(), getattr(mx, dtype)
        encoder = WanVAEEncoder.from_config(vae, chunked=config.mlx_encoding == "chunked")
        strict_load(encoder, encoder_weights(weights), convert=convert, dtype=mx_dtype)
        decoder = WanVAEDecoder.from_config(vae, chunked=config.mlx_decoding == "chunked")
        strict_load(decoder, decoder_weights(weights), convert=convert, dtype=mx_dtype)
        return Halves(encoder, decoder)

    def run_mlx(self, model: Halves, inputs: dict, dtype: str) -> None:
        from mlx_impl.vae_decoder import roundtrip

        clip = mx.array(np.ascontiguousarray(inputs["video"].transpose(0, 2, 3, 4, 1))).astype(getattr(mx, dtype))
        mx.eval(roundtrip(model.encoder, model.decoder, clip))

    def views(self, run: RunContext) -> list[Section]:
        encoder = [s for s in (
            views.block_chunk_heatmap(run, "encode/", "Encoder: "),
            views.frame_error_heatmap(run, "encode/latents", "encode_latent_frame_error",
                                      "Encoder: latent error per frame", [f"z{c}" for c in range(run.config.vae.z_dim)]),
        ) if s is not None]
        against_input = vs_input(run)
        return [*encoder, *pixel_views(run, "decode/"), *([against_input] if against_input else [])]


COMPONENT = VaeRoundtripComponent()


def vs_input(run: RunContext) -> Section | None:
    """PSNR and SSIM per frame of each side's decoded video against the input video, on [0, 1] frames; None when
    a side has no decoded video of the input's shape, or the frames are too small for SSIM (``video.MIN_SIDE``)."""
    clip = run.inputs["video"]
    decoded = {side: views.tensor(capture, "decode/frames") for side, capture in (("ref", run.ref), ("mlx", run.mlx))}
    if any(x is None or x.shape != clip.shape for x in decoded.values()) or min(clip.shape[3:]) < video.MIN_SIDE:
        return None
    metrics: dict[str, list[list[float]]] = {}
    for n in range(clip.shape[0]):  # one video per batch item
        source = video.frames_from_array(clip[n:n + 1], f"input video {n}")[0]
        for side, x in decoded.items():
            frames = video.frames_from_array(x[n:n + 1], f"{side} decoded video {n}")[0]
            metrics.setdefault(f"psnr_{side}", []).append([video.psnr(a, b) for a, b in zip(source, frames)])
            metrics.setdefault(f"ssim_{side}", []).append([video.ssim(a, b) for a, b in zip(source, frames)])
    mean = {k: np.mean(v, axis=0) for k, v in metrics.items()}  # over batch items
    starts = views.chunk_starts(1 + (clip.shape[2] - 1) // 4)
    chunk = np.searchsorted(starts, np.arange(clip.shape[2]), side="right") - 1
    rows = [[t, int(chunk[t]), mean["psnr_ref"][t], mean["psnr_mlx"][t], mean["ssim_ref"][t], mean["ssim_mlx"][t]]
            for t in range(clip.shape[2])]
    return Section("vs_input", "Decoded video vs the input video, per frame", "table",
                   {"columns": ["frame", "chunk", "PSNR ref dB", "PSNR MLX dB", "SSIM ref", "SSIM MLX"], "rows": rows},
                   note="Each side's encode -> decode against the input it started from (frames on [0, 1]; PSNR "
                        "against peak 1, SSIM of Wang et al. 2004 averaged over channels and batch). With random "
                        "weights both are far from the input; MLX should read like the reference.")
