"""Time and text conditioning of Helios / Wan transformers, in MLX.

Mirrors diffusers' ``HeliosTimeTextEmbedding`` / ``WanTimeTextImageEmbedding``: sinusoidal
timestep projection -> ``TimestepEmbedding`` MLP -> SiLU -> projection to the 6 modulation
vectors, plus the text projection. Parameter names match the diffusers state dict. Each Linear
computes in its weight's dtype (:func:`mlx_impl.block.linear`: a no-op unless mixed precision).
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlx_impl.block import linear
from mlx_impl.taps import tap, tap_requested


def sinusoidal_embedding(timesteps: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """``[cos(t*f), sin(t*f)]`` with ``f = exp(-ln(max_period) * i / (dim/2))``, in float32.

    (diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos=True, downscale_freq_shift=0``.)
    At t = 0 this is ones for the cosine half and zeros for the sine half, never all zeros.
    """
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    angles = timesteps.astype(mx.float32)[:, None] * freqs[None, :]
    emb = mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return linear(self.linear_2, nn.silu(linear(self.linear_1, x)))


class TextProjection(nn.Module):
    """diffusers' ``PixArtAlphaTextProjection`` with ``act_fn="gelu_tanh"``."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return linear(self.linear_2, nn.gelu_approx(linear(self.linear_1, x)))


class TimeTextEmbedding(nn.Module):
    """Timestep and text conditioning; ``time_embedder`` is meant to stay float32 in bf16 models."""

    def __init__(self, dim: int, time_freq_dim: int, time_proj_dim: int, text_embed_dim: int):
        super().__init__()
        self.time_freq_dim = time_freq_dim
        self.time_embedder = TimestepEmbedding(time_freq_dim, dim)
        self.time_proj = nn.Linear(dim, time_proj_dim)
        self.text_embedder = TextProjection(text_embed_dim, dim)

    def embed_time(self, timesteps: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """``(temb, timestep_proj)`` for ``timesteps``; temb is cast to the model's ``dtype`` (tap ``temb`` when requested: ``wan_two_experts``), then projected."""
        sinusoid = tap("timesteps_proj", self.sinusoid(timesteps))
        temb = tap("time_embedder", self.time_embedder(sinusoid.astype(self.time_embedder.linear_1.weight.dtype)))
        temb = tap_requested("temb", temb.astype(dtype))
        return temb, tap("time_proj", linear(self.time_proj, nn.silu(temb)))

    def sinusoid(self, timesteps: mx.array) -> mx.array:
        return sinusoidal_embedding(timesteps, self.time_freq_dim)

    def embed_text(self, text: mx.array) -> mx.array:
        return tap("text_embedder", self.text_embedder(text))

    def history_t0(self, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """The t = 0 embedding Helios gives history tokens, computed from the current weights each call."""
        return self.embed_time(mx.zeros((1,), dtype=mx.float32), dtype)
