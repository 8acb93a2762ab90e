"""SkyReels-V2 diffusion forcing on our Wan transformer: block-causal attention and per-frame timesteps, in one
pass or chunk by chunk with a key/value cache.

diffusers' ``SkyReelsV2Transformer3DModel`` with ``num_frame_per_block`` B > 1 lets the tokens of frame f attend
to those of frame g iff ``g // B <= f // B`` (its causal block and the blocks before it); with
``enable_diffusion_forcing`` each latent frame has its own timestep (per-token modulation and output norm). Its
timestep sinusoid is computed in float64 and rounded to float32 (``get_1d_sincos_pos_embed_from_grid``); ours too.

- **One pass** (``model(latents, timesteps, text)``): that forward. With the ``chunks`` and cache ``window`` of a
  cached run, its mask also hides what that run's cache had evicted (:func:`one_pass_mask`).
- **Cached** (:meth:`CausalWanTransformer.stream`, :meth:`~CausalWanTransformer.rollout`): chunk after chunk
  (whole causal blocks), one forward over each chunk's frames: RoPE frame positions from the chunk's first frame,
  queries attending to the cached keys/values of the frames before and to their own chunk, block-causal on
  absolute frame indices (the queries are the *last* frames of the keys), cross-attention keys/values computed
  once per prompt (:class:`Prompt`). Then the chunk's keys/values join the cache (:class:`KVCache`): its step's
  own, or (``clean`` latents given), as the diffusion-forcing pipeline feeds a finished chunk to the model, those
  of one more forward over its final latents at t = 0. A cache ``window`` (frames) evicts the oldest causal blocks
  beyond it; positions keep counting from the start. Every call starts from an empty cache.

Taps: the one pass as :class:`~mlx_impl.transformer.WanTransformer`'s (``blocks.{i}/...``); a cached run only
``chunk{c}/blocks.{i}/{q_rope,k_cache,attn,cross_attn}`` (queries after RoPE, the keys they attend to, the
self- and cross-attention outputs before ``to_out``) and ``chunk{c}/output``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

from mlx_impl import block as mlx_block
from mlx_impl.taps import muted, renamed, tap, tap_scope
from mlx_impl.time_embedding import TimeTextEmbedding
from mlx_impl.transformer import WanDims, WanTransformer

#: One chunk's taps -> the cached run's layers (under ``chunk{c}/``).
CHUNK_LAYERS = ((re.compile(r"(blocks\.\d+)/attn1/q_rope"), r"\1/q_rope"),
                (re.compile(r"(blocks\.\d+)/attn1/k_cache"), r"\1/k_cache"),
                (re.compile(r"(blocks\.\d+)/attn1/attention"), r"\1/attn"),
                (re.compile(r"(blocks\.\d+)/attn2/attention"), r"\1/cross_attn"),
                (re.compile(r"unpatchify"), "output"))


@dataclass(frozen=True)
class CausalDims(WanDims):
    num_frame_per_block: int = 1


# --- masks -----------------------------------------------------------------------------------------
def block_causal(query_frames: np.ndarray, key_frames: np.ndarray, block: int) -> np.ndarray:
    """``(queries, keys)`` bool: key frame g is visible from query frame f iff ``g // block <= f // block``
    (absolute frame indices)."""
    return np.asarray(key_frames)[None, :] // block <= np.asarray(query_frames)[:, None] // block


def kept_from(start: int, window: int | None, block: int) -> int:
    """The first frame a cache of ``window`` frames (whole causal blocks) still holds when a chunk starts at ``start``."""
    return 0 if window is None else max(0, start - window // block * block)


def one_pass_mask(frames: int, block: int, chunks: Sequence[int], window: int | None = None) -> np.ndarray:
    """The one pass's ``(frames, frames)`` mask: block-causal; with a window, no frame of a chunk sees what the
    cache had evicted when that chunk started."""
    f = np.arange(frames)
    starts = np.cumsum([0, *chunks[:-1]])
    first = np.concatenate([np.full(n, kept_from(int(s), window, block)) for s, n in zip(starts, chunks)])
    return block_causal(f, f, block) & (f[None, :] >= first[:, None])


def token_mask(frame_mask: np.ndarray, tokens_per_frame: int) -> mx.array:
    return mx.array(np.repeat(np.repeat(frame_mask, tokens_per_frame, 0), tokens_per_frame, 1))


# --- caches ----------------------------------------------------------------------------------------
class LayerCache:
    """One self-attention's cached keys (after RoPE) and values: one entry per causal block, oldest first."""

    def __init__(self, window: int | None, block: int):
        self.window, self.block = window, block
        self.entries: list[tuple[np.ndarray, mx.array, mx.array]] = []

    def frames(self) -> np.ndarray:
        return np.concatenate([f for f, _, _ in self.entries]) if self.entries else np.zeros(0, np.int64)

    def with_own(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """The cached keys and values followed by ``k``, ``v`` (a chunk's own)."""
        return tuple(mx.concatenate([*(e[i] for e in self.entries), new], axis=1) for i, new in ((1, k), (2, v)))

    def append(self, frames: np.ndarray, k: mx.array, v: mx.array) -> None:
        """Add a chunk's keys/values, one entry per causal block, then evict beyond the window."""
        per_frame = k.shape[1] // len(frames)
        for i in range(0, len(frames), self.block):
            tokens = slice(i * per_frame, (i + self.block) * per_frame)
            self.entries.append((frames[i:i + self.block], k[:, tokens], v[:, tokens]))
        self.evict()

    def evict(self) -> None:
        while self.window is not None and len(self.frames()) > self.window:
            self.entries.pop(0)


class KVCache:
    """A cached run's self-attention caches, one per attention module (keyed by the module)."""

    def __init__(self, window: int | None, block: int):
        self.window, self.block = window, block
        self.layers: dict[int, LayerCache] = {}

    def layer(self, attention: mlx_block.Attention) -> LayerCache:
        return self.layers.setdefault(id(attention), LayerCache(self.window, self.block))

    def arrays(self) -> list[mx.array]:
        return [a for layer in self.layers.values() for _, k, v in layer.entries for a in (k, v)]


class Prompt:
    """One call's embedded text and, per cross-attention, its keys/values: computed at first use, then reused."""

    def __init__(self, tokens: mx.array):
        self.tokens = tokens
        self.kv: dict[int, tuple[mx.array, mx.array]] = {}

    def key_value(self, attention: mlx_block.Attention) -> tuple[mx.array, mx.array]:
        if id(attention) not in self.kv:
            self.kv[id(attention)] = attention.key_value(self.tokens)
        return self.kv[id(attention)]


@dataclass
class Frames:
    """The frames one forward covers, as each block's self-attention sees them (handed to blocks as their RoPE)."""

    rope: tuple[mx.array, mx.array]
    index: np.ndarray          # absolute index of each frame
    tokens_per_frame: int
    block: int
    mask: mx.array | None = None      # one pass: the token mask
    cache: KVCache | None = None      # cached: the keys/values of the frames before
    append: bool = False              # cached: add this forward's keys/values to the cache


# --- modules ---------------------------------------------------------------------------------------
class SelfAttention(mlx_block.Attention):
    """Block-causal self-attention: in one pass under ``frames.mask``; cached, over the cache and its own keys."""

    def __call__(self, x: mx.array, context=None, rope: Frames | None = None, history_len: int = 0) -> mx.array:
        frames = rope
        q, k, v = self.qkv(x, None)
        q, k = self.rotate(q, k, frames.rope)
        if frames.cache is None:
            return self.project_out(self.attend(q, k, v, frames.mask))
        layer = frames.cache.layer(self)
        keys, values = layer.with_own(k, v)
        tap("k_cache", keys)
        out = self.attend(q, keys, values, self.chunk_mask(frames, layer.frames()))
        if frames.append:
            layer.append(frames.index, k, v)
        return self.project_out(out)

    @staticmethod
    def chunk_mask(frames: Frames, cached: np.ndarray) -> mx.array:
        """A chunk's token mask over the cached frames and its own: block-causal on absolute frame indices."""
        visible = block_causal(frames.index, np.concatenate([cached, frames.index]), frames.block)
        return token_mask(visible, frames.tokens_per_frame)


class CrossAttention(mlx_block.Attention):
    """Cross-attention to a :class:`Prompt` (its keys/values computed once per prompt)."""

    def qkv(self, x: mx.array, context: Prompt) -> tuple[mx.array, mx.array, mx.array]:
        return (self.query(x), *context.key_value(self))


class DiffusionForcingEmbedding(TimeTextEmbedding):
    """Timesteps per frame ``(b, frames)``; the sinusoid in float64, then float32 (SkyReels-V2's)."""

    def sinusoid(self, timesteps: mx.array) -> mx.array:
        half = self.time_freq_dim // 2
        omega = 1.0 / 10000 ** (np.arange(half, dtype=np.float64) / half)
        angles = np.array(timesteps, dtype=np.float64)[..., None] * omega
        return mx.array(np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32))


class Chunk(NamedTuple):
    """One chunk of a cached run: its step's latents ``(b, n, H, W, c)`` and timesteps ``(b, n)``, and (optional)
    its final latents, whose keys/values at t = 0 fill the cache."""

    latents: mx.array
    timesteps: mx.array
    clean: mx.array | None = None


class CausalWanTransformer(WanTransformer):
    """diffusers' ``SkyReelsV2Transformer3DModel`` (diffusion forcing, block-causal), one pass or cached."""

    dims: CausalDims

    def __init__(self, dims: CausalDims):
        super().__init__(dims)
        self.condition_embedder = DiffusionForcingEmbedding(dims.dim, dims.freq_dim, 6 * dims.dim, dims.text_dim)

    def make_block(self) -> mlx_block.WanTransformerBlock:
        block, d = super().make_block(), self.dims
        block.attn1 = SelfAttention(d.dim, d.num_attention_heads, d.eps)
        block.attn2 = CrossAttention(d.dim, d.num_attention_heads, d.eps)
        return block

    def __call__(self, latents: mx.array, timesteps: mx.array, text: mx.array, chunks: Sequence[int] | None = None,
                 window: int | None = None) -> mx.array:
        """One pass: ``latents`` ``(b, F, H, W, in)``, ``timesteps`` ``(b, F)``, ``text`` ``(b, L, text_dim)`` ->
        ``(b, F, H, W, out)``; ``chunks`` and ``window``: a cached run's, whose evictions the mask repeats."""
        f, h, w = self.patch_grid(latents)
        mask = one_pass_mask(f, self.dims.num_frame_per_block, chunks or [f], window)
        return self.forward(latents, timesteps, Prompt(self.embed_text(text)), 0, mask=token_mask(mask, h * w))

    def forward(self, latents: mx.array, timesteps: mx.array, prompt: Prompt, start: int, mask: mx.array | None = None,
                cache: KVCache | None = None, append: bool = False) -> mx.array:
        """The frames from ``start`` on, attending under ``mask`` (one pass) or to ``cache`` (cached)."""
        grid = self.patch_grid(latents)
        tokens_per_frame = grid[1] * grid[2]
        frames = Frames(self.rope(grid, start), np.arange(start, start + grid[0]), tokens_per_frame,
                        self.dims.num_frame_per_block, mask, cache, append)
        x = tap("patch_embedding", self.patch_embedding(latents))
        x = tap("tokens", x.reshape(x.shape[0], -1, x.shape[-1]))
        temb, proj = self.embed_times(timesteps, x.dtype, tokens_per_frame)
        x = self.run_blocks(x, prompt, proj, frames)
        return self.output(x, temb, grid, self.scale_shift_table)

    def embed_times(self, timesteps: mx.array, dtype: mx.Dtype, tokens_per_frame: int) -> tuple[mx.array, mx.array]:
        """Per token: ``temb`` ``(b, tokens, dim)`` and the projection ``(b, tokens, 6, dim)`` of its frame's timestep."""
        with tap_scope("condition_embedder"), tap_scope("main"):
            temb, proj = self.condition_embedder.embed_time(timesteps, dtype)
        proj = proj.reshape(*proj.shape[:2], 6, -1)
        return mx.repeat(temb, tokens_per_frame, axis=1), mx.repeat(proj, tokens_per_frame, axis=1)

    def stream(self, chunks: Iterable[Chunk], text: mx.array, window: int | None = None) -> Iterator[mx.array]:
        """Each chunk's output, chunk by chunk with a fresh cache (see the module docstring); each chunk's
        output and the cache are evaluated before the next chunk."""
        cache = KVCache(window, self.dims.num_frame_per_block)
        with muted():
            prompt = Prompt(self.embed_text(text))
        start = 0
        for c, chunk in enumerate(chunks):
            with renamed(chunk_layer(c)):
                out = self.forward(chunk.latents, chunk.timesteps, prompt, start, cache=cache, append=chunk.clean is None)
            if chunk.clean is not None:
                with muted():
                    self.commit(cache, prompt, chunk.clean, start)
            mx.eval(out, cache.arrays(), list(prompt.kv.values()))
            yield out
            start += chunk.latents.shape[1]

    def commit(self, cache: KVCache, prompt: Prompt, clean: mx.array, start: int) -> None:
        """A finished chunk's keys/values into the cache: one forward over its final latents at t = 0."""
        self.forward(clean, mx.zeros(clean.shape[:2]), prompt, start, cache=cache, append=True)

    def rollout(self, latents: mx.array, timesteps: mx.array, text: mx.array, chunks: Sequence[int],
                window: int | None = None, clean: mx.array | None = None) -> mx.array:
        """The cached run over whole tensors cut into ``chunks`` (frames each): the one pass's output."""
        starts = np.cumsum([0, *chunks])
        parts = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        outputs = self.stream((Chunk(latents[:, p], timesteps[:, p], None if clean is None else clean[:, p])
                               for p in parts), text, window)
        return mx.concatenate(list(outputs), axis=1)


def chunk_layer(c: int) -> Callable[[str], str | None]:
    """The name chunk ``c``'s tap is recorded under (:data:`CHUNK_LAYERS`), or None."""
    def rename(name: str) -> str | None:
        for pattern, template in CHUNK_LAYERS:
            found = pattern.fullmatch(name)
            if found:
                return f"chunk{c}/{found.expand(template)}"
        return None
    return rename
