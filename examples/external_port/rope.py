"""Helios 3-axis rotary position embedding.

Mirrors diffusers' ``HeliosRotaryPosEmbed`` (the table) and ``apply_rotary_emb_transposed``
(the rotation), with this port's own layouts:

- the table is complex-like, ``(batch, tokens, head_dim // 2, 2)`` float32: one row per
  rotation pair ``i`` (the pair of channels ``2i, 2i+1``), ``[..., 0]`` its cosine and
  ``[..., 1]`` its sine. Pairs are ordered t, then y, then x (``rope_dim`` = (DT, DY, DX)).
  diffusers' table is ``(batch, 2 * head_dim, frames, height, width)``
  (``[cos_t, cos_y, cos_x, sin_t, sin_y, sin_x]``, every value repeated for both channels of its
  pair), flattened by the transformer to ``(batch, tokens, 2 * head_dim)``; so
  ``table[..., 0] == ref[..., 0:head_dim:2]`` and ``table[..., 1] == ref[..., head_dim::2]``.
- q and k are heads-first, ``(batch, heads, tokens, head_dim)``.

Tokens run over frames, then rows, then columns (the transformer's ``flatten(2)`` order).
These are plain functions, called through the module (``rope.rotate(...)``) by the block.
"""
from __future__ import annotations

from typing import Sequence

import mlx.core as mx


def axis_frequencies(dim: int, theta: float) -> mx.array:
    """``1 / theta ** (2j / dim)`` for ``j < dim // 2``, float32 (``HeliosRotaryPosEmbed._get_freqs_base``)."""
    exponents = mx.arange(0, dim, 2, dtype=mx.float32)[: dim // 2] / dim
    return 1.0 / (theta ** exponents)


def rotary_table(frame_indices: mx.array, height: int, width: int, rope_dim: Sequence[int],
                 theta: float = 10000.0) -> mx.array:
    """The cos/sin table ``(batch, frames * height * width, sum(rope_dim) // 2, 2)`` for frame
    indices ``(batch, frames)`` and a ``height x width`` grid. Positions and angles are float32
    (``HeliosRotaryPosEmbed.forward``: ``einsum`` of base and positions with autocast off)."""
    batch, frames = frame_indices.shape
    t = mx.broadcast_to(frame_indices.astype(mx.float32)[:, :, None, None], (batch, frames, height, width))
    y = mx.broadcast_to(mx.arange(height, dtype=mx.float32)[None, None, :, None], t.shape)
    x = mx.broadcast_to(mx.arange(width, dtype=mx.float32)[None, None, None, :], t.shape)
    angles = mx.concatenate([pos.reshape(batch, -1, 1) * axis_frequencies(d, theta)
                             for pos, d in zip((t, y, x), rope_dim)], axis=-1)
    return mx.stack([mx.cos(angles), mx.sin(angles)], axis=-1)


def rotate(x: mx.array, table: mx.array) -> mx.array:
    """Rotate the channel pairs ``(2i, 2i+1)`` of ``x`` ``(batch, heads, tokens, head_dim)`` by the
    table's angles; computed in float32, returned in ``x``'s dtype (``apply_rotary_emb_transposed``)."""
    cos = table[:, None, :, :, 0]
    sin = table[:, None, :, :, 1]
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    out = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
