"""The Wan2.1 VAE encoder in MLX: diffusers' ``WanEncoder3d`` + ``quant_conv`` + the pipelines' latent normalisation,
and the building blocks the decoder (:mod:`mlx_impl.vae_decoder`) shares with it.

Channels-last throughout: videos are ``(N, T, H, W, C)``. Parameter names match the
``AutoencoderKLWan`` state dict (``encoder.*``, ``quant_conv.*``); ``convert`` maps its layouts.

Encoding is chunked exactly as ``AutoencoderKLWan._encode``: the first frame alone, then chunks
of 4 frames. Every causal conv carries the last ``CACHE_T`` frames of its input into the next
chunk (a :class:`FeatureCache`), so chunked encoding equals causal encoding of the whole video.
``downsample3d`` passes the first chunk's single frame through untouched (no ``time_conv``) and
from then on runs its stride-2 ``time_conv`` over the previous chunk's last frame + this chunk.
The one-shot path (``chunked=False``) computes the same thing in one call.

Taps (channels-first copies, made only while recording): ``chunk<i>/<block>`` after every
encoder block of every chunk, then ``quant_conv`` and ``latents``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_impl.taps import recording, tap

#: Frames of its input each causal conv carries into the next chunk (diffusers' ``CACHE_T``).
CACHE_T = 2
#: Frames per chunk after the first (single-frame) chunk.
CHUNK = 4

Record = Callable[[str, mx.array], mx.array]


def tap_cf(name: str, x: mx.array) -> mx.array:
    """Tap channels-last ``x`` (N, T, H, W, C) as the reference lays it out, (N, C, T, H, W); return ``x``."""
    if recording():
        tap(name, mx.transpose(x, (0, 4, 1, 2, 3)))
    return x


def chunk_ranges(frames: int, chunk: int | None = None) -> list[tuple[int, int]]:
    """The chunk rule of ``AutoencoderKLWan``: ``[0, 1)``, then ``chunk`` frames each (default :data:`CHUNK`).

    ``_encode`` feeds the encoder 1 + 4 + 4 ... input frames; ``_decode`` feeds the decoder one latent
    frame at a time (``chunk=1``). A whole-video tensor inside either splits the same way with its own
    frames per chunk (:class:`ChunkSlices`)."""
    chunk = CHUNK if chunk is None else chunk
    return [(0, 1)] + [(1 + chunk * i, 1 + chunk * (i + 1)) for i in range((frames - 1) // chunk)]


class FeatureCache:
    """The frames each causal layer carries from one chunk into the next, keyed by layer, and which
    layers have seen their first chunk (diffusers' ``"Rep"`` marker of ``upsample3d``)."""

    def __init__(self) -> None:
        self._frames: dict[int, mx.array] = {}
        self._seen: set[int] = set()

    def first_call(self, layer: nn.Module) -> bool:
        """True on ``layer``'s first call (the first chunk), False from then on."""
        if id(layer) in self._seen:
            return False
        self._seen.add(id(layer))
        return True

    def get(self, layer: nn.Module) -> mx.array | None:
        return self._frames.get(id(layer))

    def put(self, layer: nn.Module, frames: mx.array) -> None:
        self._frames[id(layer)] = frames


def carry(past: mx.array | None, x: mx.array) -> mx.array:
    """What a causal conv keeps for the next chunk: the last ``CACHE_T`` frames of its input ``x``,
    topped up with the previous chunk's last frame when ``x`` is shorter (diffusers' rule)."""
    kept = x[:, -CACHE_T:]
    if kept.shape[1] < CACHE_T and past is not None:
        kept = mx.concatenate([past[:, -1:], kept], axis=1)
    return kept


def causal_pad(x: mx.array, frames: int) -> mx.array:
    """Zero frames on the past side of the time axis."""
    return mx.pad(x, [(0, 0), (frames, 0), (0, 0), (0, 0), (0, 0)])


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class CausalConv3d(nn.Module):
    """``WanCausalConv3d``: time padding ``2 * padding`` on the past side only, or the cached frames."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0):
        super().__init__()
        kernel, self.stride, pad = _triple(kernel), _triple(stride), _triple(padding)
        self.weight = mx.zeros((out_dim, *kernel, in_dim))
        self.bias = mx.zeros((out_dim,))
        self.time_pad = 2 * pad[0]
        self.spatial_pad = (0, pad[1], pad[2])

    def __call__(self, x: mx.array, cache: FeatureCache | None = None) -> mx.array:
        past = None
        if cache is not None and self.time_pad:
            past = cache.get(self)
            cache.put(self, carry(past, x))
            if past is not None:
                x = mx.concatenate([past, x], axis=1)
        pad = self.time_pad - (0 if past is None else past.shape[1])
        if pad:
            x = causal_pad(x, pad)
        return mx.conv3d(x, self.weight, stride=self.stride, padding=self.spatial_pad) + self.bias


class RMSNorm(nn.Module):
    """``WanRMS_norm`` over channels: ``F.normalize(x) * sqrt(C) * gamma`` == ``x / rms(x) * gamma``."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))
        # F.normalize divides by max(||x||, 1e-12); rms_norm by sqrt(mean(x^2) + eps): equal floors at eps = 1e-24 / C.
        self.eps = 1e-24 / dim

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.gamma, self.eps)


class ResidualBlock(nn.Module):
    """``WanResidualBlock``: norm, SiLU, causal conv, twice, plus a 1x1x1 shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        if in_dim != out_dim:
            self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1)

    def __call__(self, x: mx.array, cache: FeatureCache | None = None) -> mx.array:
        h = self.conv_shortcut(x) if "conv_shortcut" in self else x
        x = self.conv1(nn.silu(self.norm1(x)), cache)
        x = self.conv2(nn.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """``WanAttentionBlock``: single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        n, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x.reshape(n * t, h, w, c))).reshape(n * t, 1, h * w, 3 * c)
        q, k, v = mx.split(qkv, 3, axis=-1)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        return x + self.proj(y.reshape(n * t, h, w, c)).reshape(n, t, h, w, c)


class PadRightBottom(nn.Module):
    """``nn.ZeroPad2d((0, 1, 0, 1))`` on ``(B, H, W, C)``."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])


class Upsample2x(nn.Module):
    """``WanUpsample(scale_factor=2, mode="nearest-exact")`` on ``(B, H, W, C)``: every pixel repeated 2 x 2.

    nearest-exact reads source pixel ``floor((i + 0.5) / 2) = i // 2``, so at scale 2 it is an exact copy
    (diffusers upsamples in float32 and casts back: the same values in any dtype)."""

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        return mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def interleave_frames(x: mx.array) -> mx.array:
    """``upsample3d``'s frame doubling: ``(N, T, H, W, 2C)`` -> ``(N, 2T, H, W, C)``, frame ``t`` becoming
    frames ``2t`` (channels ``[0, C)``) and ``2t + 1`` (channels ``[C, 2C)``), as diffusers'
    ``reshape(b, 2, c, t, h, w)`` + ``stack(..., 3)``."""
    n, t, h, w, c2 = x.shape
    x = x.reshape(n, t, h, w, 2, c2 // 2)
    return mx.transpose(x, (0, 1, 4, 2, 3, 5)).reshape(n, 2 * t, h, w, c2 // 2)


class Resample(nn.Module):
    """``WanResample`` in ``upsample2d`` / ``upsample3d`` (decoder) or ``downsample2d`` / ``downsample3d`` (encoder) mode."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample: expected mode one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):  # diffusers' default upsample_out_dim = dim // 2
            self.resample = [Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1)]
        else:
            self.resample = [PadRightBottom(), nn.Conv2d(dim, dim, 3, stride=2)]
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def __call__(self, x: mx.array, cache: FeatureCache | None = None) -> mx.array:
        if self.mode == "upsample3d":  # in time first, then in space
            x = self.time_upsample(x, cache)
        n, t, h, w, c = x.shape
        y = x.reshape(n * t, h, w, c)
        for layer in self.resample:
            y = layer(y)
        y = y.reshape(n, t, *y.shape[1:])
        if self.mode != "downsample3d":
            return y
        if cache is None:
            return self.time_downsample_whole(y)
        past = cache.get(self)
        cache.put(self, y[:, -1:])
        if past is None:  # the first chunk: its single frame passes through
            return y
        return self.time_conv(mx.concatenate([past, y], axis=1))

    def time_downsample_whole(self, y: mx.array) -> mx.array:
        """The chunked rule over a whole video: frame 0 as is, then ``time_conv`` over frames 0.. (stride 2)."""
        if y.shape[1] == 1:
            return y
        return mx.concatenate([y[:, :1], self.time_conv(y)], axis=1)

    def time_upsample(self, x: mx.array, cache: FeatureCache | None) -> mx.array:
        """``upsample3d`` in time, chunked as diffusers: the first chunk passes through untouched (the
        ``"Rep"`` marker) and is *not* ``time_conv``'s context; from the next chunk on ``time_conv`` runs
        causally with its own cache, starting from zeros, and every frame becomes two."""
        if cache is None:
            return self.time_upsample_whole(x)
        if cache.first_call(self):
            return x
        return interleave_frames(self.time_conv(x, cache))

    def time_upsample_whole(self, x: mx.array) -> mx.array:
        """The chunked rule over a whole latent video: frame 0 as is, then ``time_conv`` over frames 1.. only."""
        if x.shape[1] == 1:
            return x
        return mx.concatenate([x[:, :1], interleave_frames(self.time_conv(x[:, 1:]))], axis=1)


class MidBlock(nn.Module):
    """``WanMidBlock``: resnet, then (attention, resnet) pairs."""

    def __init__(self, dim: int, num_layers: int = 1):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim) for _ in range(num_layers + 1)]
        self.attentions = [AttentionBlock(dim) for _ in range(num_layers)]

    def __call__(self, x: mx.array, cache: FeatureCache | None, record: Record) -> mx.array:
        x = record("mid_block.resnets.0", self.resnets[0](x, cache))
        for i, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:])):
            x = record(f"mid_block.attentions.{i}", attn(x))
            x = record(f"mid_block.resnets.{i + 1}", resnet(x, cache))
        return x


class Encoder3d(nn.Module):
    """``WanEncoder3d`` (Wan2.1 layout: a flat list of residual and resample blocks)."""

    def __init__(self, in_channels: int, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_downsample: Sequence[bool]):
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1)
        self.down_blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                self.down_blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], z_dim, 3, padding=1)

    def __call__(self, x: mx.array, cache: FeatureCache | None = None, record: Record = tap_cf) -> mx.array:
        x = record("conv_in", self.conv_in(x, cache))
        for i, block in enumerate(self.down_blocks):
            x = record(f"down_blocks.{i}", block(x, cache))
        x = self.mid_block(x, cache, record)
        return head(self.norm_out, self.conv_out, x, cache, record)


def head(norm_out: RMSNorm, conv_out: CausalConv3d, x: mx.array, cache: FeatureCache | None, record: Record) -> mx.array:
    """The output head of ``WanEncoder3d`` and ``WanDecoder3d``: ``norm_out``, SiLU, causal ``conv_out``."""
    x = record("norm_out", norm_out(x))
    return record("conv_out", conv_out(nn.silu(x), cache))


class ChunkSlices:
    """Records a whole-video block output as the per-chunk tensors the chunked path would tap
    (chunk 0 is the first frame, every later chunk the same number of frames: :func:`chunk_ranges`)."""

    def __init__(self, chunks: int):
        self.chunks = chunks

    def __call__(self, name: str, x: mx.array) -> mx.array:
        if recording():
            step = max((x.shape[1] - 1) // (self.chunks - 1), 1) if self.chunks > 1 else 1
            for i, (start, stop) in enumerate(chunk_ranges(x.shape[1], step)[: self.chunks]):
                tap_cf(f"chunk{i}/{name}", x[:, start:stop])
        return x


def check_wan21(config: dict, who: str) -> None:
    """Refuse ``AutoencoderKLWan`` configs outside the Wan2.1 layout."""
    unsupported = {k: config[k] for k in ("attn_scales", "is_residual", "patch_size") if config.get(k)}
    if unsupported:
        raise ValueError(f"{who} supports the Wan2.1 VAE (no attn_scales, is_residual, patch_size); "
                         f"config sets {unsupported}")


def check_temporal_flags(flags: Sequence[bool], dim_mult: Sequence[int]) -> None:
    if len(flags) != len(dim_mult) - 1:
        raise ValueError(f"temperal_downsample: expected {len(dim_mult) - 1} flags (one per downsampling), "
                         f"got {list(flags)}")


def latent_stats(z_dim: int, latents_mean: Sequence[float], latents_std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``latents_mean`` and ``1 / latents_std`` as the Wan pipelines build them: float32 tensors, the
    reciprocal taken in float32 (cast to the latents' dtype only when used)."""
    for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
        if len(values) != z_dim:
            raise ValueError(f"{name}: expected z_dim = {z_dim} values, got {len(values)}")
    return np.asarray(latents_mean, np.float32), np.float32(1.0) / np.asarray(latents_std, np.float32)


class WanVAEEncoder(nn.Module):
    """``AutoencoderKLWan`` encode path up to the normalised latents the Wan pipelines use."""

    def __init__(self, base_dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temperal_downsample: Sequence[bool], latents_mean: Sequence[float], latents_std: Sequence[float],
                 in_channels: int = 3, chunked: bool = True):
        super().__init__()
        check_temporal_flags(temperal_downsample, dim_mult)
        self.latents_mean, self.latents_inv_std = latent_stats(z_dim, latents_mean, latents_std)
        self.z_dim = z_dim
        self.in_channels = in_channels
        self.chunked = chunked
        self.encoder = Encoder3d(in_channels, base_dim, 2 * z_dim, dim_mult, num_res_blocks, temperal_downsample)
        self.quant_conv = CausalConv3d(2 * z_dim, 2 * z_dim, 1)

    @classmethod
    def from_config(cls, config: dict, chunked: bool = True) -> "WanVAEEncoder":
        """Build from an ``AutoencoderKLWan`` config (Wan2.1 layout only)."""
        check_wan21(config, cls.__name__)
        return cls(config["base_dim"], config["z_dim"], config["dim_mult"], config["num_res_blocks"],
                   config["temperal_downsample"], config["latents_mean"], config["latents_std"],
                   config.get("in_channels", 3), chunked)

    def encode(self, video: mx.array, chunked: bool | None = None) -> mx.array:
        """Normalised latent means ``(N, 1 + (T - 1) / 4, H / 8, W / 8, z_dim)`` of ``video`` ``(N, T, H, W, C)``.

        ``chunked`` (default: the model's setting) chooses chunked or one-shot encoding."""
        self.check_video(video)
        chunked = self.chunked if chunked is None else chunked
        ranges = chunk_ranges(video.shape[1])
        if chunked:
            cache, outputs = FeatureCache(), []
            for i, (start, stop) in enumerate(ranges):
                outputs.append(self.encoder(video[:, start:stop], cache, record=scoped(f"chunk{i}")))
            h = mx.concatenate(outputs, axis=1)
        else:
            h = self.encoder(video, record=ChunkSlices(len(ranges)))
        h = tap_cf("quant_conv", self.quant_conv(h))
        return tap_cf("latents", self.normalise(h[..., : self.z_dim]))

    def normalise(self, mu: mx.array) -> mx.array:
        """``(mu - latents_mean) * (1 / latents_std)`` in ``mu``'s dtype, as the Wan pipelines do."""
        return (mu - mx.array(self.latents_mean).astype(mu.dtype)) * mx.array(self.latents_inv_std).astype(mu.dtype)

    def check_video(self, video: mx.array) -> None:
        if video.ndim != 5 or video.shape[-1] != self.in_channels:
            raise ValueError(f"expected a channels-last video (N, T, H, W, {self.in_channels}), got shape {tuple(video.shape)}")
        frames = video.shape[1]
        if (frames - 1) % CHUNK:
            raise ValueError(f"expected 1 + 4k frames (1, 5, 9, 13, ...), got {frames}; diffusers' _encode would "
                             f"silently drop the last {(frames - 1) % CHUNK}")


def scoped(prefix: str) -> Record:
    return lambda name, x: tap_cf(f"{prefix}/{name}", x)


def convert(key: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """A diffusers ``AutoencoderKLWan`` weight in MLX layout.

    Conv3d ``(O, I, T, H, W)`` -> ``(O, T, H, W, I)``; Conv2d ``(O, I, H, W)`` -> ``(O, H, W, I)``;
    RMS-norm ``gamma`` ``(C, 1, 1[, 1])`` -> ``(C,)``.
    """
    if key.endswith(".gamma"):
        return key, array.reshape(-1)
    if array.ndim == 5:
        return key, array.transpose(0, 2, 3, 4, 1)
    if array.ndim == 4:
        return key, array.transpose(0, 2, 3, 1)
    return key, array
