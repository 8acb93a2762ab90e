"""Wan2.1 VAE encoder: diffusers' ``AutoencoderKLWan`` encode path up to the normalised latents.

Mirrors ``AutoencoderKLWan._encode`` (``WanEncoder3d`` over the first frame alone, then chunks of
4 frames, with each causal conv carrying the last 2 frames of its input into the next chunk),
``quant_conv``, the posterior mode (first ``z_dim`` channels) and the Wan pipelines'
normalisation ``(mode - latents_mean) * (1 / latents_std)``.

This port's own choices:

- videos are channels-first ``(N, C, T, H, W)`` between modules; convolutions transpose to
  channels-last around the MLX conv call only;
- the causal cache is a :class:`ChunkState` of slots taken in call order (each causal conv with a
  temporal kernel, and each temporal downsampler, takes the next slot every chunk);
- 1x1x1 convolutions (residual shortcuts, ``quant_conv``) are :class:`Pointwise` layers with a
  ``(out, in)`` weight; the mid attention's 1x1 convs are Linear layers over the pixels;
- names: ``encoder.stem`` (``conv_in``), ``encoder.stages.{i}`` (``down_blocks.{i}``, same
  indices), ``encoder.middle.{res1,attn,res2}`` (``mid_block.{resnets.0,attentions.0,resnets.1}``),
  ``encoder.head`` (``norm_out`` + SiLU + ``conv_out``, as ``head.norm`` / ``head.conv``), ``quant``
  (``quant_conv``); in residual stages ``norm_a, conv_a, norm_b, conv_b, shortcut``; in
  downsampling stages ``spatial`` (``resample.1``) and ``temporal`` (``time_conv``).
"""
from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import weights as _weights

#: Frames each causal conv carries into the next chunk (diffusers' ``CACHE_T``).
CARRY = 2


class ChunkState:
    """The frames carried between chunks, one slot per cached layer, taken in call order."""

    def __init__(self):
        self.slots: list[mx.array | None] = []
        self.cursor = 0

    def begin_chunk(self) -> None:
        self.cursor = 0

    def _slot(self) -> int:
        if self.cursor == len(self.slots):
            self.slots.append(None)
        self.cursor += 1
        return self.cursor - 1

    def carry(self, x: mx.array) -> mx.array | None:
        """Past frames for a causal conv whose input this chunk is ``x``; keeps the last ``CARRY``
        frames of ``x``, topped up with the previous past's last frame if ``x`` is shorter."""
        i = self._slot()
        past = self.slots[i]
        keep = x[:, :, -CARRY:]
        if keep.shape[2] < CARRY and past is not None:
            keep = mx.concatenate([past[:, :, -1:], keep], axis=2)
        self.slots[i] = keep
        return past

    def last_frame(self, x: mx.array) -> mx.array | None:
        """For a temporal downsampler: the previous chunk's last frame (None in the first chunk)."""
        i = self._slot()
        past = self.slots[i]
        self.slots[i] = x[:, :, -1:]
        return past


def _triple(v) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class CausalConv3d(nn.Module):
    """``WanCausalConv3d``: zero padding ``2 * pad_t`` frames on the past side (less the frames
    given as ``past``), symmetric spatial padding. Weight ``(out, kt, kh, kw, in)``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        kernel, self.stride, pad = _triple(kernel), _triple(stride), _triple(padding)
        self.weight = mx.zeros((cout, *kernel, cin))
        self.bias = mx.zeros((cout,))
        self.past_frames, self.pad_hw = 2 * pad[0], pad[1:]

    def __call__(self, x: mx.array, past: mx.array | None = None) -> mx.array:
        if past is not None and self.past_frames:
            x = mx.concatenate([past, x], axis=2)
        front = self.past_frames - (past.shape[2] if past is not None and self.past_frames else 0)
        (ph, pw) = self.pad_hw
        x = mx.pad(x, [(0, 0), (0, 0), (front, 0), (ph, ph), (pw, pw)])
        y = mx.conv3d(x.transpose(0, 2, 3, 4, 1), self.weight, stride=self.stride) + self.bias
        return y.transpose(0, 4, 1, 2, 3)


class Pointwise(nn.Module):
    """A 1x1x1 convolution over channels-first video: ``weight`` ``(out, in)``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = mx.zeros((cout, cin))
        self.bias = mx.zeros((cout,))

    def __call__(self, x: mx.array) -> mx.array:
        y = x.transpose(0, 2, 3, 4, 1) @ self.weight.T + self.bias
        return y.transpose(0, 4, 1, 2, 3)


class ChannelRMSNorm(nn.Module):
    """``WanRMS_norm``: ``F.normalize`` over channels (axis 1) times ``sqrt(C)`` times ``weight``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.scale = dim ** 0.5

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        norm = mx.sqrt(mx.sum(xf * xf, axis=1, keepdims=True))
        normalized = (xf / mx.maximum(norm, 1e-12)).astype(x.dtype)
        shape = (-1,) + (1,) * (x.ndim - 2)
        return normalized * self.scale * self.weight.reshape(shape)


class ResidualStage(nn.Module):
    """``WanResidualBlock`` (dropout 0)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm_a = ChannelRMSNorm(cin)
        self.conv_a = CausalConv3d(cin, cout, 3, padding=1)
        self.norm_b = ChannelRMSNorm(cout)
        self.conv_b = CausalConv3d(cout, cout, 3, padding=1)
        if cin != cout:
            self.shortcut = Pointwise(cin, cout)

    def __call__(self, x: mx.array, state: ChunkState) -> mx.array:
        skip = self.shortcut(x) if "shortcut" in self else x
        h = nn.silu(self.norm_a(x))
        h = self.conv_a(h, state.carry(h))
        h = nn.silu(self.norm_b(h))
        h = self.conv_b(h, state.carry(h))
        return h + skip


class DownStage(nn.Module):
    """``WanResample`` in ``downsample2d`` (``temporal=False``) or ``downsample3d`` mode: zero pad
    right/bottom, 3x3 stride-2 conv per frame; in 3d mode the first chunk's frame passes through
    and later chunks get a stride-2 temporal conv over the previous chunk's last frame + theirs."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv2d(dim, dim, 3, stride=2)
        if temporal:
            self.temporal = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def __call__(self, x: mx.array, state: ChunkState) -> mx.array:
        n, c, t, h, w = x.shape
        frames = mx.pad(x, [(0, 0), (0, 0), (0, 0), (0, 1), (0, 1)]).transpose(0, 2, 3, 4, 1)
        y = self.spatial(frames.reshape(n * t, h + 1, w + 1, c))
        y = y.reshape(n, t, *y.shape[1:]).transpose(0, 4, 1, 2, 3)
        if "temporal" not in self:
            return y
        past = state.last_frame(y)
        return y if past is None else self.temporal(mx.concatenate([past, y], axis=2))


class FrameAttention(nn.Module):
    """``WanAttentionBlock``: single-head self-attention over the pixels of each frame, plus identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        n, c, t, h, w = x.shape
        tokens = self.norm(x).transpose(0, 2, 3, 4, 1).reshape(n * t, 1, h * w, c)
        q, k, v = mx.split(self.qkv(tokens), 3, axis=-1)
        y = self.out(mx.fast.scaled_dot_product_attention(q, k, v, scale=c ** -0.5))
        return x + y.reshape(n, t, h, w, c).transpose(0, 4, 1, 2, 3)


class Middle(nn.Module):
    """``WanMidBlock`` with one attention layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.res1 = ResidualStage(dim, dim)
        self.attn = FrameAttention(dim)
        self.res2 = ResidualStage(dim, dim)

    def __call__(self, x: mx.array, state: ChunkState) -> mx.array:
        return self.res2(self.attn(self.res1(x, state)), state)


class Head(nn.Module):
    """``norm_out`` -> SiLU -> ``conv_out`` of ``WanEncoder3d``."""

    def __init__(self, dim: int, cout: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim)
        self.conv = CausalConv3d(dim, cout, 3, padding=1)

    def __call__(self, x: mx.array, state: ChunkState) -> mx.array:
        h = nn.silu(self.norm(x))
        return self.conv(h, state.carry(h))


class Encoder(nn.Module):
    """``WanEncoder3d`` (Wan2.1: no attention in the stages, not residual); one chunk per call."""

    def __init__(self, cin: int, base: int, cout: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal: Sequence[bool]):
        super().__init__()
        dims = [base * m for m in (1, *dim_mult)]
        self.stem = CausalConv3d(cin, dims[0], 3, padding=1)
        self.stages = []
        for level, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                self.stages.append(ResidualStage(c_in, c_out))
                c_in = c_out
            if level != len(dim_mult) - 1:
                self.stages.append(DownStage(c_out, temporal[level]))
        self.middle = Middle(dims[-1])
        self.head = Head(dims[-1], cout)

    def __call__(self, x: mx.array, state: ChunkState) -> mx.array:
        x = self.stem(x, state.carry(x))
        for stage in self.stages:
            x = stage(x, state)
        return self.head(self.middle(x, state), state)


def chunk_bounds(frames: int) -> list[tuple[int, int]]:
    """``[0, 1)``, then 4 frames per chunk (``AutoencoderKLWan._encode``; trailing frames dropped as there)."""
    return [(0, 1)] + [(1 + 4 * i, 5 + 4 * i) for i in range((frames - 1) // 4)]


def normalize_latents(moments: mx.array, mean: mx.array, inv_std: mx.array) -> mx.array:
    """The posterior mode (first half of the channels) as the Wan pipelines normalise it:
    ``(mode - mean) * inv_std``, with ``mean`` / ``inv_std`` ``(z_dim,)``; channels-first."""
    z = mean.shape[0]
    shape = (1, z, 1, 1, 1)
    return (moments[:, :z] - mean.reshape(shape).astype(moments.dtype)) * inv_std.reshape(shape).astype(moments.dtype)


class WanVideoEncoder(nn.Module):
    """``AutoencoderKLWan`` encoder side: ``encoder`` (called once per chunk) and ``quant``."""

    def __init__(self, base_dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temperal_downsample: Sequence[bool] = (False, True, True),
                 latents_mean: Sequence[float] = (), latents_std: Sequence[float] = (), in_channels: int = 3,
                 attn_scales: Sequence[float] = (), is_residual: bool = False, patch_size=None, **_ignored):
        super().__init__()
        if attn_scales or is_residual or patch_size:
            raise ValueError("WanVideoEncoder ports the Wan2.1 VAE only (no attn_scales, is_residual, patch_size)")
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean / latents_std need z_dim = {z_dim} values each")
        self.encoder = Encoder(in_channels, base_dim, 2 * z_dim, dim_mult, num_res_blocks, temperal_downsample)
        self.quant = Pointwise(2 * z_dim, 2 * z_dim)
        self._mean = np.asarray(latents_mean, np.float32)
        self._inv_std = 1.0 / np.asarray(latents_std, np.float32)

    def encode(self, video: mx.array) -> mx.array:
        """Normalised latents ``(N, z_dim, 1 + (T - 1) // 4, H // 8, W // 8)`` of ``video`` ``(N, C, T, H, W)``."""
        state, outputs = ChunkState(), []
        for start, stop in chunk_bounds(video.shape[2]):
            state.begin_chunk()
            outputs.append(self.encoder(video[:, :, start:stop], state))
        moments = self.quant(mx.concatenate(outputs, axis=2))
        return normalize_latents(moments, mx.array(self._mean), mx.array(self._inv_std))


def _conv(w: np.ndarray) -> np.ndarray:
    """torch conv weight ``(out, in, *k)`` -> channels-last ``(out, *k, in)``; biases unchanged."""
    return np.moveaxis(w, 1, -1) if w.ndim > 1 else w


def _flat(w: np.ndarray) -> np.ndarray:
    """A 1x1(x1) conv weight ``(out, in, 1, ...)`` -> ``(out, in)``; biases unchanged."""
    return w.reshape(w.shape[0], -1) if w.ndim > 1 else w


def _vector(w: np.ndarray) -> np.ndarray:
    return w.reshape(-1)


def _residual_rules(src: str, dst: str) -> list[_weights.Rule]:
    return [
        _weights.Rule(src + "norm1.gamma", dst + "norm_a.weight", _vector),
        _weights.Rule(src + "conv1.{p}", dst + "conv_a.{p}", _conv),
        _weights.Rule(src + "norm2.gamma", dst + "norm_b.weight", _vector),
        _weights.Rule(src + "conv2.{p}", dst + "conv_b.{p}", _conv),
        _weights.Rule(src + "conv_shortcut.{p}", dst + "shortcut.{p}", _flat),
    ]


#: diffusers ``AutoencoderKLWan`` keys -> port keys (decoder keys are dropped: see :data:`DECODER`).
RULES = [
    _weights.Rule("encoder.conv_in.{p}", "encoder.stem.{p}", _conv),
    *_residual_rules("encoder.down_blocks.{i}.", "encoder.stages.{i}."),
    _weights.Rule("encoder.down_blocks.{i}.resample.1.{p}", "encoder.stages.{i}.spatial.{p}", _conv),
    _weights.Rule("encoder.down_blocks.{i}.time_conv.{p}", "encoder.stages.{i}.temporal.{p}", _conv),
    *_residual_rules("encoder.mid_block.resnets.0.", "encoder.middle.res1."),
    _weights.Rule("encoder.mid_block.attentions.0.norm.gamma", "encoder.middle.attn.norm.weight", _vector),
    _weights.Rule("encoder.mid_block.attentions.0.to_qkv.{p}", "encoder.middle.attn.qkv.{p}", _flat),
    _weights.Rule("encoder.mid_block.attentions.0.proj.{p}", "encoder.middle.attn.out.{p}", _flat),
    *_residual_rules("encoder.mid_block.resnets.1.", "encoder.middle.res2."),
    _weights.Rule("encoder.norm_out.gamma", "encoder.head.norm.weight", _vector),
    _weights.Rule("encoder.conv_out.{p}", "encoder.head.conv.{p}", _conv),
    _weights.Rule("quant_conv.{p}", "quant.{p}", _flat),
]
#: Key prefixes of a full ``AutoencoderKLWan`` checkpoint the encoder does not use.
DECODER = ("decoder.", "post_quant_conv.")


def convert_state_dict(diffusers_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A full ``AutoencoderKLWan`` state dict -> this port's encoder weights (decoder keys dropped,
    any other unknown key an error)."""
    return _weights.convert(diffusers_state, RULES, ignore=DECODER, model="WanVideoEncoder")


def load(model: WanVideoEncoder, converted: dict[str, np.ndarray], dtype: mx.Dtype | None = None) -> WanVideoEncoder:
    """Strict load of converted weights (``dtype``: cast every parameter)."""
    return _weights.load(model, converted, RULES, dtype)
