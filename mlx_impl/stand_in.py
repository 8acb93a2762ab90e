"""A deterministic stand-in for the transformer in sampler trajectories (not part of any model).

Same function and parameter names as ``reference_runners.stand_in.StandInDenoiser`` (torch):
``flow = tanh(proj(x) + time * t / 1000)`` over channels. With the same weights on both sides,
a sampling trajectory differs only where the schedulers differ.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class StandInDenoiser(nn.Module):
    """``flow = tanh(W x + b + time * t / 1000)`` over channels (channels-last)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Linear(channels, channels)
        self.time = mx.zeros((channels,))

    def __call__(self, latents: mx.array, timestep: int) -> mx.array:
        t = mx.array(timestep).astype(latents.dtype) / 1000
        return mx.tanh(self.proj(latents) + t * self.time)
