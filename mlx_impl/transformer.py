"""Whole Helios and Wan DiT transformers in MLX, built from our block, RoPE and time embedding.

Mirrors diffusers' ``HeliosTransformer3DModel`` / ``WanTransformer3DModel`` forward:

1. **patchify**: the ``Conv3d(kernel = stride = patch)`` patch embedding as what it is, a Linear
   over non-overlapping patches: ``(b, T, H, W, c)`` -> ``(b, f, h, w, pt*ph*pw*c)`` -> ``dim``;
   tokens in ``(f, h, w)`` order (the reference's ``flatten(2).transpose(1, 2)``).
2. **history** (Helios, multi-term memory): ``long``, ``mid``, ``short`` history latents are
   patchified with kernels 4p, 2p, p (mid and long first replicate-padded to multiples of
   (2, 4, 4) / (4, 8, 8), the reference's hard-coded ``pad_for_3d_conv`` sizes), and their
   RoPE is computed on the *short* history's post-patch grid, then (mid, long) replicate-padded
   and average-pooled by 2 / 4 along t, h, w (``center_down_sample_3d``). Tokens are
   ``[long, mid, short, main]``: each term is prepended.
3. **condition embedder** (:class:`~mlx_impl.time_embedding.TimeTextEmbedding`): with
   ``zero_history_timestep`` every history token is modulated by the embedding of t = 0,
   computed from the current weights at every call; the main tokens by the timestep's.
4. **blocks** (:mod:`mlx_impl.block`), each under the tap scope ``blocks.{i}``.
5. **norm_out**: float32 LayerNorm of the main tokens, ``* (1 + scale) + shift`` from
   ``scale_shift_table + temb``, cast to the stream's dtype; **proj_out**; **unpatchify**:
   ``(b, f, h, w, pt, ph, pw, c)`` -> ``(b, f*pt, h*ph, w*pw, c)``.

Channels-last throughout. Taps: ``patch_embedding``, ``rope``, ``history/{short,mid,long}``
(+ ``/rope``), ``tokens`` (what block 0 receives), ``condition_embedder/...``,
``blocks.{i}/<sublayer>``, ``norm_out``, ``norm_out/modulated``, ``proj_out``, ``unpatchify``.

Precision follows the weights and the input, as in the block: with bf16 weights and a bf16
input the model runs in bf16 (diffusers' ``torch_dtype=bfloat16``); with bf16 Linear weights and
a float32 input it is the mixed precision of the official inference (float32 stream, patch
embeddings rounded to bf16 and carried in float32).

Use from other code (a two-expert Wan2.2 pipeline, a causal variant)::

    model = WanTransformer(WanDims.of(diffusers_config))
    strict_load(model, state_dict, convert=convert_key, dtype=mx.bfloat16, keep_float32=KEEP_FP32)
    velocity = model(latents, timestep, text)   # latents (b, T, H, W, in_channels), text (b, L, text_dim)
    velocity = model(latents, timestep, context=model.embed_text(text))   # the text embedded once, reused

``model.embed_text`` / ``model.embed_time`` / ``model.run_blocks`` are the pieces of the forward,
usable on their own (each expert its own text embedding: catalog bug 9, :mod:`mlx_impl.wan_experts`).
``blocks`` is any sequence of blocks: :class:`StreamedBlocks` loads each block's weights when it is reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_impl import block as mlx_block
from mlx_impl import rope as mlx_rope
from mlx_impl.block import linear
from mlx_impl.taps import muted, tap, tap_scope
from mlx_impl.time_embedding import TimeTextEmbedding

#: Module names diffusers keeps in float32 in a bf16 model (``_keep_in_fp32_modules``).
HELIOS_KEEP_FP32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "history_key_scale")
WAN_KEEP_FP32 = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
#: Under ``torch.autocast(bfloat16)`` every Linear / Conv computes in bf16; these (no matmul) stay float32.
AUTOCAST_FP32 = ("scale_shift_table", "norm1", "norm2", "norm3", "norm_q", "norm_k", "history_key_scale")
#: diffusers config keys for image cross-attention (Wan2.1 I2V's CLIP branch), which must stay None here.
NOT_PORTED = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
#: Replicate-padding multiples of the mid / long history latents (diffusers' ``pad_for_3d_conv`` calls).
HISTORY_PAD = {"mid": (2, 4, 4), "long": (4, 8, 8)}
#: Patch kernel of each history term, in multiples of ``patch_size``; RoPE pooling of mid / long.
HISTORY_SCALE = {"short": 1, "mid": 2, "long": 4}
#: Order in which history terms are processed; each is prepended, so tokens are [long, mid, short, main].
HISTORY_TERMS = ("short", "mid", "long")


def convert_key(key: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """diffusers key -> ours: Conv3d patch kernels ``(dim, c, pt, ph, pw)`` become Linear ``(dim, pt*ph*pw*c)``;
    block FFN keys as :func:`mlx_impl.block.convert_key`."""
    if key.endswith(".weight") and np.ndim(array) == 5:
        array = np.transpose(array, (0, 2, 3, 4, 1)).reshape(array.shape[0], -1)
    return mlx_block.convert_key(key, array)


# --- dimensions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    """The config keys the MLX models read (diffusers' names and defaults)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> "Dims":
        """From a diffusers config dict; keys the models do not read are ignored, unless they ask for what is not ported."""
        unported = sorted(k for k in NOT_PORTED if config.get(k) is not None)
        if unported:
            raise ValueError(f"config keys {unported} set: image conditioning (image_dim, added KV projections) is not ported")
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known}
        return cls(**values)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass(frozen=True)
class HeliosDims(Dims):
    rope_dim: tuple[int, int, int] = (44, 42, 42)
    rope_theta: float = 10000.0
    guidance_cross_attn: bool = True
    zero_history_timestep: bool = True
    has_multi_term_memory_patch: bool = True
    is_amplify_history: bool = False
    history_scale_mode: str = "per_head"


@dataclass(frozen=True)
class WanDims(Dims):
    rope_max_seq_len: int = 1024


# --- patches -------------------------------------------------------------------------------------
def patchify(latents: mx.array, patch: Sequence[int]) -> mx.array:
    """``(b, T, H, W, c)`` -> ``(b, f, h, w, pt*ph*pw*c)``: non-overlapping patches (a trailing remainder is dropped, as a strided conv does)."""
    b, t, h, w, c = latents.shape
    pt, ph, pw = patch
    f, gh, gw = t // pt, h // ph, w // pw
    x = latents[:, :f * pt, :gh * ph, :gw * pw].reshape(b, f, pt, gh, ph, gw, pw, c)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, f, gh, gw, pt * ph * pw * c)


def unpatchify(x: mx.array, grid: Sequence[int], patch: Sequence[int]) -> mx.array:
    """``(b, f*h*w, pt*ph*pw*c)`` -> ``(b, f*pt, h*ph, w*pw, c)`` (the reference's ``permute(0, 7, 1, 4, 2, 5, 3, 6)``)."""
    f, h, w = grid
    pt, ph, pw = patch
    b = x.shape[0]
    x = x.reshape(b, f, h, w, pt, ph, pw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, f * pt, h * ph, w * pw, -1)


def replicate_pad(x: mx.array, multiples: Sequence[int], axes: Sequence[int] = (1, 2, 3)) -> mx.array:
    """Pad ``axes`` at their end to multiples of ``multiples`` by repeating the last slice (``mode="replicate"``)."""
    for axis, multiple in zip(axes, multiples):
        extra = -x.shape[axis] % multiple
        if extra:
            last = mx.take(x, mx.array([x.shape[axis] - 1]), axis=axis)
            x = mx.concatenate([x, mx.repeat(last, extra, axis=axis)], axis=axis)
    return x


def avg_pool(grid: mx.array, kernel: Sequence[int]) -> mx.array:
    """Mean over non-overlapping ``kernel`` windows of a ``(b, t, h, w, c)`` grid (``avg_pool3d``, stride = kernel)."""
    b, t, h, w, c = grid.shape
    kt, kh, kw = kernel
    x = grid[:, :t - t % kt, :h - h % kh, :w - w % kw]
    x = x.reshape(b, t // kt, kt, h // kh, kh, w // kw, kw, c)
    return x.mean(axis=(2, 4, 6))


class PatchEmbedding(nn.Module):
    """``Conv3d(in, dim, kernel=stride=patch)`` as a Linear on patches; output cast to the input's dtype.

    (With bf16 weights and a float32 input: the conv computes in bf16, as under autocast, and the
    result is carried in float32.)
    """

    def __init__(self, in_channels: int, dim: int, patch: Sequence[int]):
        super().__init__()
        self._patch = tuple(patch)
        self.weight = mx.zeros((dim, math.prod(patch) * in_channels))
        self.bias = mx.zeros((dim,))

    def __call__(self, latents: mx.array) -> mx.array:
        patches = patchify(latents, self._patch).astype(self.weight.dtype)
        return mx.addmm(self.bias, patches, self.weight.T).astype(latents.dtype)


def modulated_out_norm(x: mx.array, temb: mx.array, table: mx.array, eps: float) -> mx.array:
    """``LayerNorm(x.float()) * (1 + scale) + shift`` with ``shift, scale = table + temb``, in x's dtype.

    ``temb`` ``(b, dim)``; ``table`` ``(1, 2, dim)`` (float32 in a bf16 model).
    """
    mod = table + temb[:, None, :]
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    normed = tap("norm_out", mx.fast.layer_norm(x.astype(mx.float32), None, None, eps))
    return tap("norm_out/modulated", (normed * (1 + scale) + shift).astype(x.dtype))


# --- blocks, resident or streamed -----------------------------------------------------------------
class StreamedBlocks:
    """A sequence of ``count`` blocks sharing one module whose weights are loaded when a block is reached.

    ``load(module, i)`` puts block ``i``'s weights into ``module`` (e.g. strict_load from a
    memory-mapped checkpoint); only one block's weights are held at a time. Not an ``nn.Module``
    attribute value: its weights are no part of the model's parameters.
    """

    def __init__(self, module: nn.Module, count: int, load: Callable[[nn.Module, int], None]):
        self.module, self.count, self.load = module, count, load

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> nn.Module:
        if not 0 <= index < self.count:
            raise IndexError(f"block {index} of {self.count}")
        self.load(self.module, index)
        return self.module

    def __iter__(self):
        return (self[i] for i in range(self.count))


class _Transformer(nn.Module):
    """What both models share: patch embedding, condition embedder, blocks, output norm and projection."""

    dims: Dims

    def __init__(self, dims: Dims, blocks: Sequence[nn.Module] | None):
        super().__init__()
        self.dims = dims
        d = dims.dim
        self.patch_embedding = PatchEmbedding(dims.in_channels, d, dims.patch_size)
        self.condition_embedder = TimeTextEmbedding(d, dims.freq_dim, 6 * d, dims.text_dim)
        self.blocks = list(blocks) if blocks is not None else [self.make_block() for _ in range(dims.num_layers)]
        self.proj_out = nn.Linear(d, dims.out_channels * math.prod(dims.patch_size))

    def make_block(self) -> nn.Module:
        raise NotImplementedError

    def stream_blocks(self, load: Callable[[nn.Module, int], None]) -> None:
        """Replace the resident blocks by :class:`StreamedBlocks` (``load(module, i)`` fills block i's weights)."""
        self.blocks = []
        object.__setattr__(self, "_streamed", StreamedBlocks(self.make_block(), self.dims.num_layers, load))

    def block_sequence(self) -> Sequence[nn.Module]:
        return getattr(self, "_streamed", None) or self.blocks

    def embed_text(self, text: mx.array) -> mx.array:
        with tap_scope("condition_embedder"), tap_scope("main"):
            return self.condition_embedder.embed_text(text)

    def run_blocks(self, x: mx.array, context: mx.array, temb: mx.array, rope, history_len: int = 0,
                   blocks: Sequence[nn.Module] | None = None) -> mx.array:
        """``x`` through every block (tap scopes ``blocks.{i}``); evaluated after each block when streaming."""
        blocks = self.block_sequence() if blocks is None else blocks
        streamed = isinstance(blocks, StreamedBlocks)
        for i in range(len(blocks)):
            with tap_scope(f"blocks.{i}"):
                x = self.call_block(blocks[i], x, context, temb, rope, history_len)
            if streamed:
                mx.eval(x)
        return x

    def call_block(self, block: nn.Module, x, context, temb, rope, history_len: int) -> mx.array:
        return block(x, context, temb, rope)

    def output(self, x: mx.array, temb: mx.array, grid: Sequence[int], table: mx.array) -> mx.array:
        """norm_out, proj_out and unpatchify of the main tokens (the last ``prod(grid)``)."""
        x = modulated_out_norm(x[:, -math.prod(grid):], temb, table, self.dims.eps)
        x = tap("proj_out", linear(self.proj_out, x))
        return tap("unpatchify", unpatchify(x, grid, self.dims.patch_size))


# --- Wan -----------------------------------------------------------------------------------------
class WanTransformer(_Transformer):
    """diffusers' ``WanTransformer3DModel`` (text-to-video, and image-to-video with ``in_channels > out_channels``)."""

    def __init__(self, dims: WanDims, blocks: Sequence[nn.Module] | None = None):
        super().__init__(dims, blocks)
        self.scale_shift_table = mx.zeros((1, 2, dims.dim))

    def make_block(self) -> nn.Module:
        d = self.dims
        return mlx_block.WanTransformerBlock(d.dim, d.ffn_dim, d.num_attention_heads, d.cross_attn_norm, d.eps)

    def rope(self, grid: Sequence[int]) -> tuple[mx.array, mx.array]:
        d = self.dims
        with muted():  # the tables are the rope component's
            cos, sin = mlx_rope.wan_rotary_emb(mlx_rope.wan_rope_tables(d.attention_head_dim, d.rope_max_seq_len), *grid)
        return tap("rope/cos", cos), tap("rope/sin", sin)

    def embed_time(self, timestep: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """``(temb (b, dim), timestep projection (b, 6, dim))``."""
        with tap_scope("condition_embedder"), tap_scope("main"):
            temb, proj = self.condition_embedder.embed_time(timestep, dtype)
        return temb, proj.reshape(proj.shape[0], 6, -1)

    def __call__(self, latents: mx.array, timestep: mx.array, text: mx.array | None = None,
                 context: mx.array | None = None) -> mx.array:
        """``latents`` ``(b, T, H, W, in_channels)``, ``timestep`` ``(b,)``, ``text`` ``(b, L, text_dim)`` -> ``(b, T, H, W, out)``.

        ``context`` instead of ``text``: the text already embedded by this model (:meth:`embed_text`), e.g.
        once per prompt for a whole denoising loop; its dtype stands for the text's (the model's dtype)."""
        grid = self.patch_grid(latents)
        rope = self.rope(grid)
        x = tap("patch_embedding", self.patch_embedding(latents))
        x = tap("tokens", x.reshape(x.shape[0], -1, x.shape[-1]))
        temb, proj = self.embed_time(timestep, (text if context is None else context).dtype)
        context = self.embed_text(text) if context is None else context
        x = self.run_blocks(x, context, proj, rope)
        return self.output(x, temb, grid, self.scale_shift_table)

    def patch_grid(self, latents: mx.array) -> tuple[int, int, int]:
        return tuple(n // p for n, p in zip(latents.shape[1:4], self.dims.patch_size))


# --- Helios --------------------------------------------------------------------------------------
class HeliosOutputNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale_shift_table = mx.zeros((1, 2, dim))


@dataclass
class History:
    """One history term: latents ``(b, T, H, W, c)`` and their frame indices ``(b, T)``."""

    latents: mx.array
    indices: mx.array


class HeliosTransformer(_Transformer):
    """diffusers' ``HeliosTransformer3DModel`` with short / mid / long history (multi-term memory)."""

    def __init__(self, dims: HeliosDims, blocks: Sequence[nn.Module] | None = None):
        super().__init__(dims, blocks)
        d = dims.dim
        if dims.has_multi_term_memory_patch:
            for term, scale in HISTORY_SCALE.items():
                setattr(self, f"patch_{term}", PatchEmbedding(dims.in_channels, d, [scale * p for p in dims.patch_size]))
        self.norm_out = HeliosOutputNorm(d)

    def make_block(self) -> nn.Module:
        d = self.dims
        return mlx_block.HeliosTransformerBlock(
            d.dim, d.ffn_dim, d.num_attention_heads, d.cross_attn_norm, d.eps, guidance_cross_attn=d.guidance_cross_attn,
            is_amplify_history=d.is_amplify_history, history_scale_mode=d.history_scale_mode)

    def call_block(self, block: nn.Module, x, context, temb, rope, history_len: int) -> mx.array:
        return block(x, context, temb, rope, history_len)

    def rope(self, indices: mx.array, height: int, width: int) -> mx.array:
        """``[cos | sin]`` ``(b, t*height*width, 2*head_dim)`` (the reference's ``rotary_emb`` layout)."""
        d = self.dims
        with muted():
            cos, sin = mlx_rope.helios_rotary_emb(indices, height, width, d.rope_dim, d.rope_theta)
        return mx.concatenate([cos, sin], axis=-1)

    def history_rope(self, term: str, indices: mx.array, grid: Sequence[int]) -> mx.array:
        """RoPE of a history term on the short history's post-patch ``grid`` (h, w); mid / long padded and pooled."""
        height, width = grid
        rope = self.rope(indices, height, width)
        scale = HISTORY_SCALE[term]
        if scale == 1:
            return rope
        b, t = indices.shape
        kernel = (scale,) * 3
        pooled = avg_pool(replicate_pad(rope.reshape(b, t, height, width, -1), kernel), kernel)
        return pooled.reshape(b, -1, pooled.shape[-1])

    def embed_history(self, x: mx.array, rope: mx.array, history: Mapping[str, History]) -> tuple[mx.array, mx.array]:
        """Prepend each history term's tokens and RoPE (short, then mid, then long: [long, mid, short, main])."""
        grid = None
        for term in HISTORY_TERMS:
            if term not in history:
                continue
            if term != "short" and grid is None:
                raise ValueError(f"history {term!r} needs the short history (its RoPE grid is the short history's)")
            latents = history[term].latents
            if term in HISTORY_PAD:
                latents = replicate_pad(latents, HISTORY_PAD[term])
            with tap_scope("history"):
                tokens = tap(term, getattr(self, f"patch_{term}")(latents))
                if term == "short":
                    grid = tokens.shape[2:4]
                term_rope = tap(f"{term}/rope", self.history_rope(term, history[term].indices, grid))
            x = mx.concatenate([tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]), x], axis=1)
            rope = mx.concatenate([term_rope, rope], axis=1)
        return x, rope

    def embed_time(self, timestep: mx.array, dtype: mx.Dtype, history_len: int, main_len: int
                   ) -> tuple[mx.array, mx.array]:
        """``(temb (b, dim) of the main tokens, per-token projection (b, history + main, 6, dim))``.

        With ``zero_history_timestep`` the history tokens get the projection of t = 0, computed first
        (also with no history, as the reference does whenever it has frame indices).
        """
        zero_history = self.dims.zero_history_timestep
        with tap_scope("condition_embedder"):
            if zero_history:
                with tap_scope("t0"):
                    _, proj_t0 = self.condition_embedder.history_t0(dtype)
            with tap_scope("main"):
                temb, proj = self.condition_embedder.embed_time(timestep, dtype)
        if zero_history:
            return temb, mlx_block.helios_timestep_proj(proj, proj_t0, history_len, main_len)
        tokens = history_len + main_len
        return temb, mx.broadcast_to(proj.reshape(proj.shape[0], 1, 6, -1), (proj.shape[0], tokens, 6, proj.shape[-1] // 6))

    def __call__(self, latents: mx.array, timestep: mx.array, text: mx.array, frame_indices: mx.array,
                 history: Mapping[str, History] | None = None) -> mx.array:
        """``latents`` ``(b, T, H, W, in)``, ``timestep`` ``(b,)``, ``text`` ``(b, L, text_dim)``, ``frame_indices``
        ``(b, T / pt)``; ``history``: term -> :class:`History` -> ``(b, T, H, W, out)``."""
        history = dict(history or {})
        if history and not self.dims.has_multi_term_memory_patch:
            raise ValueError("history latents given to a model without has_multi_term_memory_patch")
        x = tap("patch_embedding", self.patch_embedding(latents))
        grid = tuple(x.shape[1:4])
        rope = tap("rope", self.rope(frame_indices, *grid[1:]))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        main_len = x.shape[1]
        x, rope = self.embed_history(x, rope, history)
        x = tap("tokens", x)
        history_len = x.shape[1] - main_len
        temb, proj = self.embed_time(timestep, text.dtype, history_len, main_len)
        context = self.embed_text(text)
        cos, sin = mx.split(rope, 2, axis=-1)
        x = self.run_blocks(x, context, proj, (cos, sin), history_len)
        return self.output(x, temb, grid, self.norm_out.scale_shift_table)
