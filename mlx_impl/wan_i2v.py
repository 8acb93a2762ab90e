"""Wan2.1/2.2 image-to-video conditioning (the A14B / 14B layout), ported from diffusers.

Mirrors ``WanImageToVideoPipeline.prepare_latents`` (``expand_timesteps=False``, no last image)
and the concatenation in its ``__call__``::

    latent_model_input = torch.cat([latents, condition], dim=1).to(transformer_dtype)
    condition = torch.concat([mask, image_latents], dim=1)

so the transformer's input channels are noise latents (z_dim), the first-frame mask
(``vae_scale_factor_temporal`` = 4) and the image latents (z_dim): Wan's ``in_dim`` 36 =
16 + 4 + 16; with the tiny test VAE (z_dim 4) 4 + 4 + 4 = 12.

- **mask**: ones over the *pixel* frames, zero from frame 1 on; frame 0 repeated
  ``vae_scale_factor_temporal`` times so the ``num_frames + 3`` frames fold into
  ``num_latent_frames`` groups of 4: group f holds frames 4f..4f+3, and those 4 become the mask's
  channels (the pipeline's ``view(b, -1, 4, h, w).transpose(1, 2)``). Latent frame 0 is all ones,
  the others all zeros. Built in float32 (``torch.ones``' default dtype; the pipeline never casts it).
- **image latents**: the conditioning image followed by ``num_frames - 1`` zero frames, encoded by
  the VAE (posterior mode: the pipeline's ``retrieve_latents(..., sample_mode="argmax")``) and
  normalised ``(mode - latents_mean) * (1 / latents_std)`` in float32.
- **conditioning**: ``[latents, mask, image_latents]`` along channels, cast to the transformer's dtype.

Channels-last throughout: images ``(b, H, W, 3)``, videos ``(b, T, H, W, 3)``, latents
``(b, latent frames, h, w, c)``. Taps (channels-last): ``mask``, ``image_latents``, ``conditioning``.
The VAE's own taps are muted here (it is compared on its own by the ``vae`` component).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx

from mlx_impl import taps
from mlx_impl.taps import tap
from mlx_impl.vae import WanVAEEncoder


def latent_frames(num_frames: int, temporal_factor: int) -> int:
    """``(num_frames - 1) // temporal_factor + 1``, for ``num_frames = 1 + temporal_factor * k``."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(f"num_frames: expected 1 + {temporal_factor}k frames, got {num_frames}")
    return (num_frames - 1) // temporal_factor + 1


def first_frame_mask(batch: int, num_frames: int, latent_height: int, latent_width: int,
                     temporal_factor: int = 4) -> mx.array:
    """The first-frame mask ``(batch, latent frames, latent_height, latent_width, temporal_factor)`` float32."""
    f = latent_frames(num_frames, temporal_factor)
    frames = mx.concatenate([mx.ones((batch, 1, latent_height, latent_width)),
                             mx.zeros((batch, num_frames - 1, latent_height, latent_width))], axis=1)
    first = mx.repeat(frames[:, :1], temporal_factor, axis=1)
    frames = mx.concatenate([first, frames[:, 1:]], axis=1)  # num_frames + temporal_factor - 1 frames
    return frames.reshape(batch, f, temporal_factor, latent_height, latent_width).transpose(0, 1, 3, 4, 2)


def video_condition(image: mx.array, num_frames: int) -> mx.array:
    """The image as frame 0 followed by ``num_frames - 1`` zero frames: ``(b, H, W, C)`` -> ``(b, T, H, W, C)``."""
    b, h, w, c = image.shape
    return mx.concatenate([image[:, None], mx.zeros((b, num_frames - 1, h, w, c), image.dtype)], axis=1)


@contextmanager
def muted() -> Iterator[None]:
    """No taps inside the block, even while a recorder is installed."""
    with taps.recorder(None):
        yield


def image_latents(vae: WanVAEEncoder, image: mx.array, num_frames: int) -> mx.array:
    """The normalised latents of the image followed by zeros.

    ``WanVAEEncoder.encode`` normalises in the VAE's dtype; the pipeline casts the mode to float32
    first. Equal for the float32 VAE the Wan pipelines run, so only that one is accepted.
    """
    if vae.quant_conv.weight.dtype != mx.float32:
        raise NotImplementedError(f"image_latents: the VAE runs in {vae.quant_conv.weight.dtype}; the pipeline "
                                  "normalises its float32 cast, which WanVAEEncoder.encode does not do (float32 VAE only)")
    video = video_condition(image.astype(mx.float32), num_frames)
    with muted():
        return vae.encode(video)


def conditioning(latents: mx.array, mask: mx.array, image_latents: mx.array, dtype: mx.Dtype) -> mx.array:
    """The transformer input: noise latents, mask and image latents along channels, in ``dtype``."""
    condition = mx.concatenate([mask, image_latents.astype(mask.dtype)], axis=-1)
    return mx.concatenate([latents, condition], axis=-1).astype(dtype)


def prepare_conditioning(vae: WanVAEEncoder, image: mx.array, latents: mx.array, num_frames: int,
                         dtype: mx.Dtype = mx.float32, temporal_factor: int = 4, spatial_factor: int = 8) -> mx.array:
    """``prepare_latents`` + the ``__call__`` concatenation: the transformer input for ``latents``.

    ``image``: ``(b, H, W, 3)`` preprocessed to [-1, 1]; ``latents``: ``(b, latent frames, H/8, W/8, z_dim)``
    float32 noise; ``temporal_factor`` / ``spatial_factor``: the VAE config's ``scale_factor_temporal`` /
    ``scale_factor_spatial`` (the pipeline reads those, not the encoder's layout). Taps ``mask``,
    ``image_latents``, ``conditioning``.
    """
    b, height, width, _ = image.shape
    f = latent_frames(num_frames, temporal_factor)
    lh, lw = height // spatial_factor, width // spatial_factor
    if tuple(latents.shape[:4]) != (b, f, lh, lw):
        raise ValueError(f"latents: expected (b, frames, h, w) = {(b, f, lh, lw)} for {num_frames} frames of "
                         f"{height}x{width}, got {tuple(latents.shape)}")
    mask = tap("mask", first_frame_mask(b, num_frames, lh, lw, temporal_factor))
    cond = tap("image_latents", image_latents(vae, image, num_frames))
    return tap("conditioning", conditioning(latents.astype(mx.float32), mask, cond, dtype))

