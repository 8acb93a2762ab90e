"""Helios DiT transformer block.

Mirrors diffusers' ``HeliosTransformerBlock`` (with ``qk_norm="rms_norm_across_heads"``, no
image cross-attention): modulation ``modulation + temb`` in float32; LayerNorm -> modulated ->
self-attention (fused q/k/v, RMS norm of q and k across all heads, 3-axis RoPE, optional history
key amplification) -> gated float32 residual; (guidance) cross-attention of the main tokens to
the text, residual add in the stream's dtype; LayerNorm -> modulated -> GELU-tanh FFN -> gated
float32 residual. Dtype casts sit where diffusers has them.

This port's own choices:

- attention tensors are heads-first ``(batch, heads, tokens, head_dim)`` from the head split on;
- self-attention projects q, k, v with one fused Linear ``qkv`` (output ``(batch, tokens, 3*dim)``,
  q | k | v), cross-attention k and v with one fused Linear ``kv`` (k | v);
- the block takes the modulation of the main tokens ``(batch, 6, dim)`` and of the history
  tokens ``(1 or batch, 6, dim)`` and broadcasts them over tokens itself (diffusers is given a
  per-token ``(batch, tokens, 6, dim)``);
- RoPE comes as this port's complex-like table (see :mod:`external_port.rope`);
- names: ``pre_norm`` / ``cross_norm`` / ``ffn_norm`` for ``norm1`` / ``norm2`` / ``norm3``,
  ``self_attn`` / ``cross_attn`` for ``attn1`` / ``attn2``, ``q_norm`` / ``k_norm``, ``o`` for
  ``to_out.0``, ``ffn.layers.{0,1,2}`` for ``ffn.net.0.proj`` / GELU / ``ffn.net.2``,
  ``modulation`` ``(6, dim)`` for ``scale_shift_table`` ``(1, 6, dim)``.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import rope
from . import weights as _weights

#: Upper bound of the history key scale (``HeliosAttention.max_scale``).
MAX_HISTORY_SCALE = 10.0


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Softmax attention, scale ``head_dim ** -0.5``; ``(batch, heads, tokens, head_dim)`` in and out."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


def _heads(x: mx.array, heads: int) -> mx.array:
    """``(batch, tokens, dim)`` -> ``(batch, heads, tokens, head_dim)``."""
    batch, tokens, dim = x.shape
    return x.reshape(batch, tokens, heads, dim // heads).transpose(0, 2, 1, 3)


def _merge(x: mx.array) -> mx.array:
    """``(batch, heads, tokens, head_dim)`` -> ``(batch, tokens, heads * head_dim)``."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)


class SelfAttention(nn.Module):
    """``HeliosAttention`` as ``attn1`` (with ``HeliosAttnProcessor``)."""

    def __init__(self, dim: int, heads: int, eps: float, history_scale_mode: str | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim, eps)
        self.k_norm = nn.RMSNorm(dim, eps)
        self.o = nn.Linear(dim, dim)
        if history_scale_mode not in (None, "scalar", "per_head"):
            raise ValueError(f"history_scale_mode must be None, 'scalar' or 'per_head', got {history_scale_mode!r}")
        if history_scale_mode is not None:
            self.history_scale = mx.ones((1 if history_scale_mode == "scalar" else heads,))

    def __call__(self, x: mx.array, table: mx.array, num_history: int = 0) -> mx.array:
        q, k, v = mx.split(self.qkv(x), 3, axis=-1)
        q, k, v = _heads(self.q_norm(q), self.heads), _heads(self.k_norm(k), self.heads), _heads(v, self.heads)
        q, k = rope.rotate(q, table), rope.rotate(k, table)
        if num_history and "history_scale" in self:
            scale = 1.0 + mx.sigmoid(self.history_scale) * (MAX_HISTORY_SCALE - 1.0)
            history = (k[:, :, :num_history] * scale.reshape(1, -1, 1, 1)).astype(k.dtype)
            k = mx.concatenate([history, k[:, :, num_history:]], axis=2)
        return self.o(_merge(attention(q, k, v)).astype(q.dtype))


class CrossAttention(nn.Module):
    """``HeliosAttention`` as ``attn2`` (text cross-attention)."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(dim, eps)
        self.k_norm = nn.RMSNorm(dim, eps)
        self.o = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        k, v = mx.split(self.kv(context), 2, axis=-1)
        q = _heads(self.q_norm(self.q(x)), self.heads)
        k, v = _heads(self.k_norm(k), self.heads), _heads(v, self.heads)
        return self.o(_merge(attention(q, k, v)).astype(q.dtype))


class HeliosBlock(nn.Module):
    """``HeliosTransformerBlock``; tokens are ``(batch, num_history + main, dim)``, history first."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, cross_attn_norm: bool = True, eps: float = 1e-6,
                 guidance_cross_attn: bool = True, is_amplify_history: bool = False,
                 history_scale_mode: str = "per_head"):
        super().__init__()
        self.guidance_cross_attn = guidance_cross_attn
        self.pre_norm = nn.LayerNorm(dim, eps, affine=False)
        self.self_attn = SelfAttention(dim, heads, eps, history_scale_mode if is_amplify_history else None)
        if cross_attn_norm:
            self.cross_norm = nn.LayerNorm(dim, eps, affine=True)
        self.cross_attn = CrossAttention(dim, heads, eps)
        self.ffn_norm = nn.LayerNorm(dim, eps, affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approx="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = mx.zeros((6, dim))

    def __call__(self, x: mx.array, context: mx.array, temb: mx.array, temb_history: mx.array, table: mx.array,
                 num_history: int) -> mx.array:
        """``x`` ``(batch, tokens, dim)``; ``context`` the embedded text ``(batch, text_len, dim)``;
        ``temb`` ``(batch, 6, dim)`` / ``temb_history`` ``(1 or batch, 6, dim)`` the timestep
        projections of the main / history tokens; ``table`` ``(batch, tokens, head_dim // 2, 2)``."""
        shift, scale, gate, c_shift, c_scale, c_gate = self.modulate(temb, temb_history, num_history,
                                                                     x.shape[1] - num_history)
        normed = (self.pre_norm(x.astype(mx.float32)) * (1 + scale) + shift).astype(x.dtype)
        x = (x.astype(mx.float32) + self.self_attn(normed, table, num_history) * gate).astype(x.dtype)
        x = self.cross(x, context, num_history)
        normed = (self.ffn_norm(x.astype(mx.float32)) * (1 + c_scale) + c_shift).astype(x.dtype)
        return (x.astype(mx.float32) + self.ffn(normed).astype(mx.float32) * c_gate).astype(x.dtype)

    def modulate(self, temb: mx.array, temb_history: mx.array, num_history: int, num_main: int) -> list[mx.array]:
        """The six vectors ``modulation + temb`` in float32, per token ``(batch, tokens, dim)``."""
        batch = temb.shape[0]
        main = self.modulation + temb.astype(mx.float32)
        history = self.modulation + temb_history.astype(mx.float32)
        out = []
        for i in range(6):
            parts = [mx.broadcast_to(history[:, i:i + 1], (batch, num_history, main.shape[-1]))] if num_history else []
            parts.append(mx.broadcast_to(main[:, i:i + 1], (batch, num_main, main.shape[-1])))
            out.append(mx.concatenate(parts, axis=1))
        return out

    def cross(self, x: mx.array, context: mx.array, num_history: int) -> mx.array:
        """``x + cross_attn(cross_norm(x), context)`` over the main tokens only when ``guidance_cross_attn``."""
        history, main = (x[:, :num_history], x[:, num_history:]) if self.guidance_cross_attn else (None, x)
        normed = main.astype(mx.float32)
        if "cross_norm" in self:
            normed = self.cross_norm(normed)
        main = main + self.cross_attn(normed.astype(main.dtype), context)
        return main if history is None else mx.concatenate([history, main], axis=1)


def _squeeze_table(table: np.ndarray) -> np.ndarray:
    return table.reshape(table.shape[-2:])


#: diffusers ``HeliosTransformerBlock`` keys (relative to ``blocks.<n>.``) -> port keys.
RULES = [
    _weights.Rule("scale_shift_table", "modulation", _squeeze_table),
    _weights.Rule(("attn1.to_q.{p}", "attn1.to_k.{p}", "attn1.to_v.{p}"), "self_attn.qkv.{p}"),
    _weights.Rule("attn1.norm_q.weight", "self_attn.q_norm.weight"),
    _weights.Rule("attn1.norm_k.weight", "self_attn.k_norm.weight"),
    _weights.Rule("attn1.to_out.0.{p}", "self_attn.o.{p}"),
    _weights.Rule("attn1.history_key_scale", "self_attn.history_scale"),
    _weights.Rule("attn2.to_q.{p}", "cross_attn.q.{p}"),
    _weights.Rule(("attn2.to_k.{p}", "attn2.to_v.{p}"), "cross_attn.kv.{p}"),
    _weights.Rule("attn2.norm_q.weight", "cross_attn.q_norm.weight"),
    _weights.Rule("attn2.norm_k.weight", "cross_attn.k_norm.weight"),
    _weights.Rule("attn2.to_out.0.{p}", "cross_attn.o.{p}"),
    _weights.Rule("norm2.{p}", "cross_norm.{p}"),
    _weights.Rule("ffn.net.0.proj.{p}", "ffn.layers.0.{p}"),
    _weights.Rule("ffn.net.2.{p}", "ffn.layers.2.{p}"),
]
#: Kept float32 when loading in a lower precision (diffusers' ``_keep_in_fp32_modules``).
KEEP_FLOAT32 = ("modulation", "cross_norm", "history_scale")


def convert_state_dict(diffusers_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A ``HeliosTransformerBlock`` state dict (keys without ``blocks.<n>.``) in this port's names/layouts."""
    return _weights.convert(diffusers_state, RULES, model="HeliosBlock")


def load(model: HeliosBlock, converted: dict[str, np.ndarray], dtype: mx.Dtype | None = None) -> HeliosBlock:
    """Strict load of converted weights (``dtype``: cast all but the float32-kept parameters)."""
    return _weights.load(model, converted, RULES, dtype, KEEP_FLOAT32)
