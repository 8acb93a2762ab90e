"""The Wan2.1 VAE decoder in MLX: the Wan pipelines' latent denormalisation + diffusers' ``post_quant_conv`` +
``WanDecoder3d`` + the clamp of ``AutoencoderKLWan._decode``; and the encode -> decode round trip.

Channels-last throughout: latents are ``(N, T, h, w, z_dim)``, videos ``(N, T, H, W, C)``. Parameter names
match the ``AutoencoderKLWan`` state dict (``decoder.*``, ``post_quant_conv.*``); :func:`mlx_impl.vae.convert`
maps their layouts. The building blocks (causal conv, feature cache, RMS norm, residual, attention, resample,
mid block, head, chunk rule) are the encoder's, from :mod:`mlx_impl.vae`.

Decoding is chunked exactly as ``AutoencoderKLWan._decode``: ``post_quant_conv`` once over all latents, then
the decoder one latent frame at a time with one feature cache carried across the chunks. Each causal conv
carries the last ``CACHE_T`` frames of its input; each ``upsample3d`` passes the first chunk through untouched
and from the second chunk on runs its ``time_conv`` (causal, its history starting at that chunk) to turn every
frame into two. So latent frame 0 becomes 1 video frame and every later latent frame 4 (two ``upsample3d``).
The decoded frames are concatenated and clamped to [-1, 1]. The one-shot path (``chunked=False``) computes
the same thing in one call.

Taps (channels-first copies, made only while recording): ``post_quant_conv``; per chunk ``c``
``chunk<c>/conv_in``, ``chunk<c>/mid_block.{resnets.0, attentions.0, resnets.1}``, for each up block ``i``
``chunk<c>/up_blocks.<i>.resnets.<j>``, ``chunk<c>/up_blocks.<i>.upsamplers.0`` (if it resamples) and
``chunk<c>/up_blocks.<i>`` (the block's output), ``chunk<c>/norm_out``, ``chunk<c>/conv_out`` (unclamped);
then ``frames`` (the clamped video, ``(N, C, T, H, W)``). :func:`roundtrip` taps the encoder under
``encode/`` and the decoder under ``decode/``.
"""
from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_impl.taps import tap_scope
from mlx_impl.vae import (CausalConv3d, ChunkSlices, FeatureCache, MidBlock, Record, Resample, ResidualBlock, RMSNorm,
                          WanVAEEncoder, scoped, check_temporal_flags, check_wan21, chunk_ranges, convert, head,
                          latent_stats, tap_cf)

__all__ = ["WanVAEDecoder", "Decoder3d", "UpBlock", "roundtrip", "decoder_weights", "encoder_weights", "convert",
           "ENCODER_KEYS", "DECODER_KEYS"]

#: Key prefixes of a full ``AutoencoderKLWan`` state dict, by the half that loads them.
ENCODER_KEYS = ("encoder.", "quant_conv.")
DECODER_KEYS = ("decoder.", "post_quant_conv.")


def decoder_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A full VAE state dict without the encoder's keys: the decoder's, plus any key that belongs to
    neither half (left in so a strict load reports it as unused)."""
    return {k: v for k, v in weights.items() if not k.startswith(ENCODER_KEYS)}


def encoder_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A full VAE state dict without the decoder's keys (the encoder's, plus any key of neither half)."""
    return {k: v for k, v in weights.items() if not k.startswith(DECODER_KEYS)}


class UpBlock(nn.Module):
    """``WanUpBlock``: ``num_res_blocks + 1`` residual blocks, then an optional ``WanResample`` (``upsamplers.0``)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_res_blocks + 1)]
        if upsample_mode is not None:
            self.upsamplers = [Resample(out_dim, upsample_mode)]

    def __call__(self, x: mx.array, cache: FeatureCache | None, record: Record, name: str) -> mx.array:
        for j, resnet in enumerate(self.resnets):
            x = record(f"{name}.resnets.{j}", resnet(x, cache))
        if "upsamplers" in self:
            x = record(f"{name}.upsamplers.0", self.upsamplers[0](x, cache))
        return record(name, x)


class Decoder3d(nn.Module):
    """``WanDecoder3d`` (Wan2.1 layout, ``is_residual=False``).

    Widths ``dim * [dim_mult[-1], *dim_mult[::-1]]``; every up block but the last resamples (``upsample3d``
    where ``temperal_upsample`` says so, else ``upsample2d``), halving the width, so every block after the
    first takes half its predecessor's width."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_upsample: Sequence[bool], out_channels: int = 3):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2
            mode = None
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            self.up_blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def __call__(self, x: mx.array, cache: FeatureCache | None = None, record: Record = tap_cf) -> mx.array:
        x = record("conv_in", self.conv_in(x, cache))
        x = self.mid_block(x, cache, record)
        for i, block in enumerate(self.up_blocks):
            x = block(x, cache, record, f"up_blocks.{i}")
        return head(self.norm_out, self.conv_out, x, cache, record)


class WanVAEDecoder(nn.Module):
    """``AutoencoderKLWan`` decode path from the normalised latents the Wan pipelines hand it."""

    def __init__(self, base_dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_downsample: Sequence[bool], latents_mean: Sequence[float], latents_std: Sequence[float],
                 out_channels: int = 3, decoder_base_dim: int | None = None, chunked: bool = True):
        super().__init__()
        check_temporal_flags(temperal_downsample, dim_mult)
        self.latents_mean, self.latents_inv_std = latent_stats(z_dim, latents_mean, latents_std)
        self.z_dim = z_dim
        self.chunked = chunked
        self.post_quant_conv = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(base_dim if decoder_base_dim is None else decoder_base_dim, z_dim, dim_mult,
                                 num_res_blocks, list(temperal_downsample)[::-1], out_channels)

    @classmethod
    def from_config(cls, config: dict, chunked: bool = True) -> "WanVAEDecoder":
        """Build from an ``AutoencoderKLWan`` config (Wan2.1 layout only)."""
        check_wan21(config, cls.__name__)
        return cls(config["base_dim"], config["z_dim"], config["dim_mult"], config["num_res_blocks"],
                   config["temperal_downsample"], config["latents_mean"], config["latents_std"],
                   config.get("out_channels", 3), config.get("decoder_base_dim"), chunked)

    def decode(self, latents: mx.array, chunked: bool | None = None) -> mx.array:
        """The clamped video ``(N, 1 + 4 (T - 1), 8 h, 8 w, C)`` of normalised latents ``(N, T, h, w, z_dim)``.

        ``chunked`` (default: the model's setting) chooses chunked or one-shot decoding."""
        self.check_latents(latents)
        chunked = self.chunked if chunked is None else chunked
        x = tap_cf("post_quant_conv", self.post_quant_conv(self.denormalise(latents)))
        ranges = chunk_ranges(x.shape[1], 1)  # one latent frame per chunk
        if chunked:
            cache = FeatureCache()
            out = mx.concatenate([self.decoder(x[:, start:stop], cache, record=scoped(f"chunk{i}"))
                                  for i, (start, stop) in enumerate(ranges)], axis=1)
        else:
            out = self.decoder(x, record=ChunkSlices(len(ranges)))
        return tap_cf("frames", mx.clip(out, -1.0, 1.0))

    def denormalise(self, latents: mx.array) -> mx.array:
        """``latents / (1 / latents_std) + latents_mean`` in ``latents``' dtype, as the Wan pipelines do
        before ``vae.decode`` (a division by the float32 reciprocal, not a multiplication by ``std``)."""
        dtype = latents.dtype
        return latents / mx.array(self.latents_inv_std).astype(dtype) + mx.array(self.latents_mean).astype(dtype)

    def check_latents(self, latents: mx.array) -> None:
        if latents.ndim != 5 or latents.shape[-1] != self.z_dim:
            raise ValueError(f"expected channels-last latents (N, T, h, w, {self.z_dim}), got shape {tuple(latents.shape)}")
        if latents.shape[1] < 1:
            raise ValueError("expected at least one latent frame, got 0")


def roundtrip(encoder: WanVAEEncoder, decoder: WanVAEDecoder, video: mx.array) -> mx.array:
    """``video`` ``(N, T, H, W, C)`` encoded to the pipelines' normalised latents and decoded back, as
    ``decoder.decode(encoder.encode(video))``; taps of the two halves under ``encode/`` and ``decode/``."""
    with tap_scope("encode"):
        latents = encoder.encode(video)
    with tap_scope("decode"):
        return decoder.decode(latents)
