"""Helios autoregressive text-to-video generation in MLX: diffusers' ``HeliosPyramidPipeline.__call__`` (distilled,
``keep_first_frame``, no CFG) on our transformer, DMD scheduler and VAE decoder.

Chunk by chunk, as the pipeline:

1. the history window is the last ``sum(history_sizes)`` latent frames of the history (zeros before the
   first chunk), split into long, mid and 1x frames (``history_sizes`` sorted big to small); the short
   history is ``[prefix, 1x]``, the prefix being the first chunk's first latent frame (zeros for the first
   chunk). Frame indices count ``[prefix, long, mid, 1x, chunk]`` from 0; the short history's are the
   prefix's and the 1x frames';
2. the chunk's noise is sampled by :func:`mlx_impl.scheduler.pyramid_sample` (DMD stages), with the
   transformer, given the history in its dtype, as the denoiser; ``is_amplify_first_chunk`` applies to the
   first chunk only;
3. the chunk's latents are appended to the (float32) history and decoded, in the VAE's dtype, by
   :class:`mlx_impl.vae_decoder.WanVAEDecoder`, each chunk on its own;

then the decoded chunks are concatenated and trimmed to ``1 + 4k`` frames (the pipeline's
``(frames - 1) // vae_scale_factor_temporal * vae_scale_factor_temporal + 1``).

Taps, under ``chunk{c}/``: ``history/{long,mid,short}``, the pyramid's (``stage0/downsample``,
``stage{s}/timesteps``, ``stage{s}/sigmas``, ``stage{s}/transition``, ``stage{s}/step{k}``), ``latents``,
``frames`` (channels-first); then ``video``. The transformer's and the decoder's own taps are muted: their
components check them. Latents are channels-last ``(b, frames, h, w, c)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from mlx_impl import scheduler as sched
from mlx_impl.taps import muted, tap, tap_scope
from mlx_impl.transformer import History, HeliosTransformer
from mlx_impl.vae import tap_cf
from mlx_impl.vae_decoder import WanVAEDecoder

#: History terms, oldest first (the pipeline's split order).
TERMS = ("long", "mid", "short")
#: The VAE's frames per latent frame after the first (``vae_scale_factor_temporal``).
TEMPORAL = 4


@dataclass
class Chunk:
    """What one chunk gets besides the history: its noise ``(b, frames, h, w, c)``, the normal draws of each
    stage transition's block noise, and whether it is the first chunk (amplified steps)."""

    noise: mx.array
    block_noise: Sequence[np.ndarray]
    first: bool


@dataclass
class HeliosPipeline:
    """Our transformer, scheduler and decoder, and the pipeline's settings (its ``__call__`` arguments)."""

    transformer: HeliosTransformer
    scheduler: sched.HeliosDMDScheduler
    decoder: WanVAEDecoder
    history_sizes: Sequence[int]
    latent_frames: int
    steps: Sequence[int]
    is_amplify_first_chunk: bool = False
    vae_dtype: mx.Dtype = mx.float32

    @property
    def sizes(self) -> list[int]:
        """``history_sizes`` sorted big to small, as the pipeline sorts them: (long, mid, 1x)."""
        return sorted(self.history_sizes, reverse=True)

    def indices(self) -> tuple[dict[str, mx.array], mx.array]:
        """Frame indices ``(1, n)`` of each history term and of the chunk (``keep_first_frame``)."""
        bounds = np.cumsum([1, *self.sizes, self.latent_frames])
        prefix, long, mid, one_x, chunk = np.split(np.arange(bounds[-1]), bounds[:-1])
        short = np.concatenate([prefix, one_x])
        return {t: mx.array(i[None]) for t, i in zip(TERMS, (long, mid, short))}, mx.array(chunk[None])

    def generate(self, text: mx.array, chunks: Sequence[Chunk], dtype: mx.Dtype) -> mx.array:
        """The video ``(b, 1 + 4k, H, W, C)`` of ``len(chunks)`` chunks; ``dtype``: the transformer's (its stream's)."""
        b, _, h, w, c = chunks[0].noise.shape
        history = mx.zeros((b, sum(self.sizes), h, w, c), mx.float32)
        prefix = None
        videos = []
        for k, chunk in enumerate(chunks):
            with tap_scope(f"chunk{k}"):
                latents = self.chunk(self.window(history), prefix, text, chunk, dtype)
                if prefix is None:
                    prefix = latents[:, :1]
                history = mx.concatenate([history, latents.astype(mx.float32)], axis=1)
                videos.append(self.decode(history[:, -self.latent_frames:]))
        video = mx.concatenate(videos, axis=1)
        frames = (video.shape[1] - 1) // TEMPORAL * TEMPORAL + 1
        return tap_cf("video", video[:, :frames])

    def window(self, history: mx.array) -> mx.array:
        """The history latents the next chunk sees: the last ``sum(history_sizes)`` frames."""
        return history[:, -sum(self.sizes):]

    def chunk(self, window: mx.array, prefix: mx.array | None, text: mx.array, chunk: Chunk, dtype: mx.Dtype) -> mx.array:
        """One chunk's latents from the history ``window`` and ``prefix`` (None: zeros, the first chunk)."""
        long, mid, one_x = mx.split(window, np.cumsum(self.sizes[:2]).tolist(), axis=1)
        if prefix is None:
            prefix = mx.zeros_like(one_x[:, :1])
        latents = {"long": long, "mid": mid, "short": mx.concatenate([prefix.astype(one_x.dtype), one_x], axis=1)}
        term_indices, frame_indices = self.indices()
        history = {t: History(tap(f"history/{t}", latents[t].astype(dtype)), term_indices[t]) for t in TERMS}
        text = text.astype(dtype)

        def denoiser(x: mx.array, timestep: int) -> mx.array:
            with muted():
                return self.transformer(x, mx.array([timestep] * x.shape[0]), text, frame_indices, history)

        out = sched.pyramid_sample(self.scheduler, chunk.noise, denoiser, self.steps, chunk.block_noise,
                                   self.transformer.dims.patch_size, dtype,
                                   self.is_amplify_first_chunk and chunk.first)
        return tap("latents", out)

    def decode(self, latents: mx.array) -> mx.array:
        """The chunk's frames ``(b, 1 + 4 (n - 1), H, W, C)`` from its (float32) latents."""
        with muted():
            frames = self.decoder.decode(latents.astype(self.vae_dtype))
        return tap_cf("frames", frames)
