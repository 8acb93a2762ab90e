"""Helios and Wan DiT transformer blocks in MLX.

Mirrors diffusers' ``HeliosTransformerBlock`` / ``WanTransformerBlock``: modulation from
``scale_shift_table + temb`` in float32; norm1 -> self-attention (q/k RMS norm across heads,
RoPE) -> gated residual; norm2 -> cross-attention to text -> residual; norm3 -> modulated
GELU-tanh FFN -> gated residual. Norms, modulation and the gated residual sums run in float32
and are cast back to the stream's dtype exactly where diffusers casts; the cross-attention
residual is a plain add in the stream's dtype, as there. Tokens are channels-last
``(batch, tokens, dim)``.

Precision follows the weights and the input, so one implementation serves both ways the block
is run: all in the model dtype (diffusers' ``torch_dtype=bfloat16``: bf16 input and weights),
or mixed precision as the official Wan / Helios inference runs it (float32 residual stream,
norms and modulation; bf16 Linear weights; ``torch.autocast(bfloat16)``): each Linear casts its
input to its weight's dtype (:func:`linear`), so the stream stays float32 between sub-layers
while the matmuls and attention run in bf16.

Helios extras: history tokens precede the ``original_context_length`` main tokens; with
``guidance_cross_attn`` only the main tokens attend to the text, and with ``is_amplify_history``
the history keys are scaled by ``1 + sigmoid(history_key_scale) * (max_scale - 1)``. With
``restrict_history`` the self-attention of history tokens sees only history keys (main tokens
see all), a boolean mask given to the attention kernel.
Parameter names match the diffusers state dict except the FFN (see :func:`convert_key`).

Attention probabilities are tapped as ``<attention>/probs`` ``(batch, heads, queries, keys)``
only while recording with :data:`ATTENTION_MAPS` requested (:mod:`mlx_impl.taps`), recomputed
from our q/k with our scale and mask (:func:`attention_probs`).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_impl.rope import apply_rotary_emb
from mlx_impl.taps import tap, tap_scope, wants

#: Modulation vectors in ``scale_shift_table`` order.
MODULATION = ("shift_msa", "scale_msa", "gate_msa", "c_shift_msa", "c_scale_msa", "c_gate_msa")
#: Upper bound of the history key scale (diffusers' ``HeliosAttention.max_scale``).
MAX_HISTORY_SCALE = 10.0
#: The optional tap of attention probabilities (``mlx_impl.taps.requesting(ATTENTION_MAPS)``).
ATTENTION_MAPS = "attention_maps"
#: The probability computation holds about this many logits at once (query rows per chunk).
MAP_CHUNK_ELEMENTS = 1 << 20


def convert_key(key: str, array):
    """diffusers key -> MLX key: ``ffn.net.0.proj`` / ``ffn.net.2`` are ``ffn.proj_in`` / ``ffn.proj_out`` here."""
    return key.replace("ffn.net.0.proj.", "ffn.proj_in.").replace("ffn.net.2.", "ffn.proj_out."), array


def linear(layer: nn.Linear, x: mx.array) -> mx.array:
    """``layer(x)`` computed in the layer's weight dtype, as under ``torch.autocast`` (a no-op unless mixed)."""
    return layer(x.astype(layer.weight.dtype))


def rms_norm(norm: nn.RMSNorm, x: mx.array) -> mx.array:
    """``norm(x)`` in x's dtype; with a wider (float32) weight, computed in it and rounded once, as torch's ``rms_norm``."""
    if norm.weight.dtype == x.dtype:
        return norm(x)
    return norm(x.astype(norm.weight.dtype)).astype(x.dtype)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation, evaluated in float32 and rounded once (as torch does for bf16)."""
    return nn.gelu_approx(x.astype(mx.float32)).astype(x.dtype)


def history_mask(history_len: int, tokens: int) -> mx.array:
    """``(tokens, tokens)`` boolean mask (True: attend): history queries see history keys only, main queries all."""
    index = mx.arange(tokens)
    return ~((index[:, None] < history_len) & (index[None, :] >= history_len))


def attention_probs(q: mx.array, k: mx.array, scale: float, mask: mx.array | None = None) -> np.ndarray:
    """``softmax(q k^T * scale + mask)``, ``(batch, heads, queries, keys)`` float32, from ``(batch, heads, tokens, head_dim)`` q/k.

    Computed in float32 by chunks of query rows (each evaluated before the next), so the work
    memory is about :data:`MAP_CHUNK_ELEMENTS` logits whatever the token count; a boolean mask
    keeps where True, any other mask is added to the logits.
    """
    batch, heads, queries, _ = q.shape
    keys = k.shape[2]
    out = np.empty((batch, heads, queries, keys), np.float32)
    rows = max(1, MAP_CHUNK_ELEMENTS // max(1, batch * heads * keys))
    keys_t = k.astype(mx.float32).swapaxes(-1, -2)
    mx.eval(keys_t)  # once, not in every chunk's graph
    for start in range(0, queries, rows):
        logits = (q[:, :, start:start + rows].astype(mx.float32) * scale) @ keys_t
        if mask is not None:
            part = mask[..., start:start + rows, :] if mask.shape[-2] == queries else mask
            logits = mx.where(part, logits, -mx.inf) if part.dtype == mx.bool_ else logits + part
        out[:, :, start:start + rows] = np.array(mx.softmax(logits, axis=-1))
    return out


class Attention(nn.Module):
    """Self- or cross-attention with q/k RMS norm over all heads; ``to_out`` is a one-element list.

    ``restrict_history`` (set by :class:`HeliosTransformerBlock`): history queries attend to
    history keys only.
    """

    restrict_history = False

    def __init__(self, dim: int, heads: int, eps: float, history_scale_mode: str | None = None):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = [nn.Linear(dim, dim)]
        self.norm_q = nn.RMSNorm(dim, eps)
        self.norm_k = nn.RMSNorm(dim, eps)
        if history_scale_mode not in (None, "scalar", "per_head"):
            raise ValueError(f"history_scale_mode must be 'scalar' or 'per_head', got {history_scale_mode!r}")
        if history_scale_mode:
            self.history_key_scale = mx.ones((1 if history_scale_mode == "scalar" else heads,))

    def __call__(self, x: mx.array, context: mx.array | None = None, rope=None, history_len: int = 0) -> mx.array:
        q, k, v = self.qkv(x, context)
        if rope is not None:
            q, k = self.rotate(q, k, rope)
        if history_len and "history_key_scale" in self:
            k = self.amplify_history(k, history_len)
        return self.project_out(self.attend(q, k, v, self.key_mask(history_len, q.shape[1])))

    def qkv(self, x: mx.array, context: mx.array | None) -> tuple[mx.array, mx.array, mx.array]:
        """Projections, q/k norm, and the split into heads ``(batch, tokens, heads, head_dim)``."""
        context = x if context is None else context
        q, k, v = (tap(n, linear(layer, t)) for n, layer, t in (("q", self.to_q, x), ("k", self.to_k, context),
                                                                ("v", self.to_v, context)))
        q, k = tap("q_norm", rms_norm(self.norm_q, q)), tap("k_norm", rms_norm(self.norm_k, k))
        return tuple(t.reshape(*t.shape[:2], self.heads, -1) for t in (q, k, v))

    def rotate(self, q: mx.array, k: mx.array, rope: tuple[mx.array, mx.array]) -> tuple[mx.array, mx.array]:
        return tap("q_rope", apply_rotary_emb(q, *rope)), tap("k_rope", apply_rotary_emb(k, *rope))

    def amplify_history(self, k: mx.array, history_len: int) -> mx.array:
        """Scale the keys of the first ``history_len`` tokens (float32 scale, result in k's dtype)."""
        scale = 1.0 + mx.sigmoid(self.history_key_scale) * (MAX_HISTORY_SCALE - 1.0)
        history = (k[:, :history_len] * scale[:, None]).astype(k.dtype)
        return tap("k_history_scaled", mx.concatenate([history, k[:, history_len:]], axis=1))

    def key_mask(self, history_len: int, tokens: int) -> mx.array | None:
        """The self-attention mask of a restricted history (:func:`history_mask`); None: every query sees every key."""
        return history_mask(history_len, tokens) if self.restrict_history and history_len else None

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None) -> mx.array:
        """Scaled dot-product attention; ``(batch, tokens, heads, head_dim)`` in and out; then, if requested, the map."""
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = tap("attention", out.transpose(0, 2, 1, 3))
        if wants(ATTENTION_MAPS):
            tap("probs", attention_probs(q, k, self.scale, mask))
        return out

    def project_out(self, out: mx.array) -> mx.array:
        return tap("out", linear(self.to_out[0], out.reshape(*out.shape[:2], -1)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, inner_dim)
        self.proj_out = nn.Linear(inner_dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return tap("out", linear(self.proj_out, tap("hidden", gelu_tanh(linear(self.proj_in, x)))))


class TransformerBlock(nn.Module):
    """The block both models share; ``temb`` is ``(batch, 6, dim)`` or per token ``(batch, tokens, 6, dim)``.

    ``history_len`` leading tokens are history (Helios); their keys are amplified when the
    self-attention has a ``history_key_scale``.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool = False, eps: float = 1e-6,
                 history_scale_mode: str | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps, affine=False)
        self.attn1 = Attention(dim, num_heads, eps, history_scale_mode)
        self.attn2 = Attention(dim, num_heads, eps)
        if cross_attn_norm:
            self.norm2 = nn.LayerNorm(dim, eps)
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim, eps, affine=False)
        self.scale_shift_table = mx.zeros((1, 6, dim))

    def __call__(self, x: mx.array, context: mx.array, temb: mx.array, rope: tuple[mx.array, mx.array],
                 history_len: int = 0) -> mx.array:
        shift, scale, gate, c_shift, c_scale, c_gate = self.modulation(temb)
        normed = self.modulated_norm("norm1", x, shift, scale)
        with tap_scope("attn1"):
            attn = self.attn1(normed, rope=rope, history_len=history_len)
        x = tap("residual1", self.gated_residual(x, attn, gate))
        x = tap("residual2", self.text_attention(x, context, history_len))
        normed = self.modulated_norm("norm3", x, c_shift, c_scale)
        with tap_scope("ffn"):
            ff = self.ffn(normed)
        return tap("residual3", self.gated_residual(x, ff, c_gate))

    def modulation(self, temb: mx.array) -> list[mx.array]:
        """The six modulation vectors ``scale_shift_table + temb`` in float32: ``(batch, tokens or 1, dim)``."""
        if temb.ndim not in (3, 4) or tuple(temb.shape[-2:]) != tuple(self.scale_shift_table.shape[1:]):
            raise ValueError(f"temb must be (batch, 6, dim) or (batch, tokens, 6, dim) with dim "
                             f"{self.scale_shift_table.shape[-1]}, got shape {tuple(temb.shape)}")
        mod = self.scale_shift_table + temb.astype(mx.float32)
        parts = [mod[:, :, i] for i in range(6)] if temb.ndim == 4 else [mod[:, i:i + 1] for i in range(6)]
        return [tap(f"modulation/{name}", part) for name, part in zip(MODULATION, parts)]

    def modulated_norm(self, name: str, x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
        """``norm(x) * (1 + scale) + shift`` in float32, cast to x's dtype."""
        normed = tap(name, getattr(self, name)(x.astype(mx.float32)))
        return tap(f"{name}/modulated", (normed * (1 + scale) + shift).astype(x.dtype))

    @staticmethod
    def gated_residual(x: mx.array, update: mx.array, gate: mx.array) -> mx.array:
        """``x + update * gate`` in float32, cast to x's dtype."""
        return (x.astype(mx.float32) + update.astype(mx.float32) * gate).astype(x.dtype)

    def text_attention(self, x: mx.array, context: mx.array, history_len: int) -> mx.array:
        """``x + attn2(norm2(x), text)``; the add is in the model dtype, as in diffusers."""
        normed = x.astype(mx.float32)
        if "norm2" in self:
            normed = self.norm2(normed)
        normed = tap("norm2", normed).astype(x.dtype)
        with tap_scope("attn2"):
            return x + self.attn2(normed, context)


class WanTransformerBlock(TransformerBlock):
    """diffusers' ``WanTransformerBlock`` (no history tokens)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool = False, eps: float = 1e-6):
        super().__init__(dim, ffn_dim, num_heads, cross_attn_norm, eps)


class HeliosTransformerBlock(TransformerBlock):
    """diffusers' ``HeliosTransformerBlock``: ``history_len`` history tokens come before the main tokens."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool = False, eps: float = 1e-6,
                 guidance_cross_attn: bool = False, is_amplify_history: bool = False,
                 history_scale_mode: str = "per_head", restrict_history: bool = False):
        super().__init__(dim, ffn_dim, num_heads, cross_attn_norm, eps, history_scale_mode if is_amplify_history else None)
        self.guidance_cross_attn = guidance_cross_attn
        self.attn1.restrict_history = restrict_history

    def text_attention(self, x: mx.array, context: mx.array, history_len: int) -> mx.array:
        """With ``guidance_cross_attn`` only the main tokens attend to the text; history passes through."""
        if not self.guidance_cross_attn:
            return super().text_attention(x, context, history_len)
        main = super().text_attention(x[:, history_len:], context, history_len)
        return mx.concatenate([x[:, :history_len], main], axis=1)


def helios_timestep_proj(proj: mx.array, proj_t0: mx.array, history_len: int, main_len: int) -> mx.array:
    """Per-token modulation input ``(batch, history + main, 6, dim)`` as ``HeliosTransformer3DModel`` builds it.

    ``proj`` ``(batch, 6*dim)`` is the projection of the current timestep (main tokens);
    ``proj_t0`` ``(1, 6*dim)`` that of t = 0, which history tokens get (``zero_history_timestep``).
    """
    batch = proj.shape[0]
    main = mx.broadcast_to(proj.reshape(batch, 1, 6, -1), (batch, main_len, 6, proj.shape[-1] // 6))
    history = mx.broadcast_to(proj_t0.reshape(1, 1, 6, -1), (batch, history_len, 6, proj.shape[-1] // 6))
    return mx.concatenate([history.astype(proj.dtype), main], axis=1)
