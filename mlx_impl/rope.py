"""Rotary position embeddings of Helios and Wan, and their application to q/k, in MLX.

Layouts are token-major, ready for attention on ``(batch, tokens, heads, head_dim)``:
cos/sin have shape ``(batch, tokens, head_dim)`` with each frequency repeated for the two
elements of a rotation pair (pairs are adjacent elements ``2i, 2i+1``).
"""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlx_impl.taps import tap


# --- Helios: one frequency base per axis, rope_dim = (DT, DY, DX) --------------------------
def helios_freqs_base(dim: int, theta: float) -> mx.array:
    """``1 / theta ** (2i / dim)`` for ``i < dim // 2`` in float32 (as diffusers' ``_get_freqs_base``)."""
    exponents = mx.arange(0, dim, 2, dtype=mx.float32)[: dim // 2] / dim
    return 1.0 / (theta ** exponents)


def helios_rotary_emb(frame_indices: mx.array, height: int, width: int, rope_dim, theta: float) -> tuple[mx.array, mx.array]:
    """cos and sin of shape ``(batch, frames*height*width, DT+DY+DX)`` for a t/y/x position grid.

    Positions stay float32 (bf16 cannot count past 256).
    """
    batch, frames = frame_indices.shape
    bases = [tap(f"freqs_{axis}", helios_freqs_base(d, theta)) for axis, d in zip("tyx", rope_dim)]
    t = frame_indices.astype(mx.float32)[:, :, None, None]
    y = mx.arange(height, dtype=mx.float32)[None, None, :, None]
    x = mx.arange(width, dtype=mx.float32)[None, None, None, :]
    shape = (batch, frames, height, width)
    angles = [
        mx.broadcast_to(pos[..., None] * base, (*shape, base.shape[0]))
        for pos, base in zip((t, y, x), bases)
    ]
    width_out = 2 * sum(base.shape[0] for base in bases)  # explicit: no history frames is an empty grid
    angles = mx.repeat(mx.concatenate(angles, axis=-1), 2, axis=-1).reshape(batch, frames * height * width, width_out)
    return tap("cos", mx.cos(angles)), tap("sin", mx.sin(angles))


# --- Wan: per-axis tables over max_seq_len positions, split t/h/w --------------------------
def wan_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) sizes of the head dimension: h = w = 2 * (head_dim // 6), t takes the rest."""
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def _axis_table(dim: int, max_seq_len: int, theta: float) -> np.ndarray:
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return np.repeat(np.outer(np.arange(max_seq_len, dtype=np.float64), inv), 2, axis=1)


def wan_rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[mx.array, mx.array]:
    """cos/sin tables ``(max_seq_len, head_dim)``: one table per axis, each normalised by its own size.

    Computed host-side in float64, then stored as float32 (as diffusers does on CPU/CUDA).
    """
    angles = np.concatenate([_axis_table(d, max_seq_len, theta) for d in wan_axis_dims(head_dim)], axis=1)
    cos = mx.array(np.cos(angles).astype(np.float32))
    sin = mx.array(np.sin(angles).astype(np.float32))
    return tap("table_cos", cos), tap("table_sin", sin)


def wan_rotary_emb(tables: tuple[mx.array, mx.array], frames: int, height: int, width: int) -> tuple[mx.array, mx.array]:
    """cos and sin ``(1, frames*height*width, head_dim)`` for a patch grid, gathering t/h/w parts."""
    head_dim = tables[0].shape[1]
    t_dim, h_dim, _ = wan_axis_dims(head_dim)
    out = []
    for table in tables:
        t_part, h_part, w_part = mx.split(table, [t_dim, t_dim + h_dim], axis=1)
        grid = (frames, height, width)
        parts = [
            mx.broadcast_to(t_part[:frames, None, None, :], (*grid, t_dim)),
            mx.broadcast_to(h_part[None, :height, None, :], (*grid, h_dim)),
            mx.broadcast_to(w_part[None, None, :width, :], (*grid, w_part.shape[1])),
        ]
        out.append(mx.concatenate(parts, axis=-1).reshape(1, math.prod(grid), head_dim))
    return tap("cos", out[0]), tap("sin", out[1])


# --- application -----------------------------------------------------------------------------
def apply_rotary_emb(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate adjacent pairs of ``x`` ``(batch, tokens, heads, head_dim)`` by the angles in cos/sin.

    The rotation is computed in float32 (cos/sin are float32) and cast back to ``x``'s dtype,
    as the diffusers processors do.
    """
    cos = cos[:, :, None, 0::2]
    sin = sin[:, :, None, 1::2]
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
