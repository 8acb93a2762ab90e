"""Helios timestep and text conditioning.

Mirrors diffusers' ``HeliosTimeTextEmbedding`` as ``HeliosTransformer3DModel`` uses it: the
sinusoidal timestep features -> ``TimestepEmbedding`` (Linear, SiLU, Linear) -> SiLU -> Linear
to the six modulation vectors, the text projection (``PixArtAlphaTextProjection``, GELU-tanh),
and the embedding of t = 0 that history tokens get (``zero_history_timestep``).

This port's own choices:

- :func:`timestep_features` lays the sinusoid out ``[sin, cos]`` (diffusers flips it to
  ``[cos, sin]``); :func:`convert_state_dict` swaps the two column halves of the first time
  Linear to match, so everything after it is unchanged.
- :class:`TimeTextEmbedder` computes the current timestep FIRST and the t = 0 history embedding
  SECOND (diffusers: t = 0 first), each through the same submodules.
- The modulation vectors are returned as ``(batch, 6, dim)``; the ``time_proj`` module itself
  outputs ``(batch, 6 * dim)`` like diffusers' ``time_proj``.
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import weights as _weights


def timestep_features(timesteps: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """``[sin(t * f), cos(t * f)]`` ``(batch, dim)`` float32, ``f_j = exp(-ln(max_period) * j / (dim / 2))``.

    diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`` gives the same
    values with the halves swapped. At t = 0: zeros, then ones (never all zeros).
    """
    if dim % 2:
        raise ValueError(f"timestep_features: dim must be even, got {dim}")
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    angles = timesteps.astype(mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.sin(angles), mx.cos(angles)], axis=-1)


class TimeTextEmbedder(nn.Module):
    """``HeliosTimeTextEmbedding``.

    Submodules: ``time_mlp`` (= ``time_embedder``: ``layers.0`` Linear, ``layers.1`` SiLU,
    ``layers.2`` Linear), ``time_proj`` (= ``act_fn`` + ``time_proj``: ``layers.0`` SiLU,
    ``layers.1`` Linear to ``6 * dim``), ``text_mlp`` (= ``text_embedder``: ``layers.0`` Linear,
    ``layers.1`` GELU-tanh, ``layers.2`` Linear).
    """

    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.dim, self.freq_dim = dim, freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approx="tanh"), nn.Linear(dim, dim))

    def embed_time(self, timesteps: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """``temb`` ``(batch, dim)`` in ``dtype`` and the modulation ``(batch, 6, dim)``."""
        features = timestep_features(timesteps, self.freq_dim)
        temb = self.time_mlp(features.astype(self.time_mlp.layers[0].weight.dtype)).astype(dtype)
        return temb, self.time_proj(temb).reshape(temb.shape[0], 6, self.dim)

    def __call__(self, timesteps: mx.array, text: mx.array):
        """``timesteps`` ``(batch,)``, ``text`` ``(batch, text_len, text_dim)`` ->
        ``(temb, modulation, context, temb_history, modulation_history)``: ``(batch, dim)``,
        ``(batch, 6, dim)``, ``(batch, text_len, dim)``, ``(1, dim)``, ``(1, 6, dim)``."""
        temb, modulation = self.embed_time(timesteps, text.dtype)
        context = self.text_mlp(text)
        temb_history, modulation_history = self.embed_time(mx.zeros((1,), dtype=timesteps.dtype), text.dtype)
        return temb, modulation, context, temb_history, modulation_history


def _swap_halves(weight: np.ndarray) -> np.ndarray:
    half = weight.shape[1] // 2
    return np.concatenate([weight[:, half:], weight[:, :half]], axis=1)


#: diffusers ``HeliosTimeTextEmbedding`` keys (relative to ``condition_embedder.``) -> port keys.
RULES = [
    _weights.Rule("time_embedder.linear_1.weight", "time_mlp.layers.0.weight", _swap_halves),
    _weights.Rule("time_embedder.linear_1.bias", "time_mlp.layers.0.bias"),
    _weights.Rule("time_embedder.linear_2.{p}", "time_mlp.layers.2.{p}"),
    _weights.Rule("time_proj.{p}", "time_proj.layers.1.{p}"),
    _weights.Rule("text_embedder.linear_1.{p}", "text_mlp.layers.0.{p}"),
    _weights.Rule("text_embedder.linear_2.{p}", "text_mlp.layers.2.{p}"),
]
#: Kept float32 when loading in a lower precision (diffusers' ``_keep_in_fp32_modules``).
KEEP_FLOAT32 = ("time_mlp",)


def convert_state_dict(diffusers_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A ``HeliosTimeTextEmbedding`` state dict (keys without ``condition_embedder.``) in this port's names/layouts."""
    return _weights.convert(diffusers_state, RULES, model="TimeTextEmbedder")


def load(model: TimeTextEmbedder, converted: dict[str, np.ndarray], dtype: mx.Dtype | None = None) -> TimeTextEmbedder:
    """Strict load of converted weights (``dtype``: cast all but ``time_mlp``)."""
    return _weights.load(model, converted, RULES, dtype, KEEP_FLOAT32)
