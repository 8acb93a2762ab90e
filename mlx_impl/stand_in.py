"""A deterministic stand-in for the transformer in scheduler trajectories (not part of any model).

Same function and parameter names as ``reference_runners.scheduler.StandInDenoiser`` (torch):
``flow = tanh(proj(x) + time * t / 1000)`` over channels. With the same weights on both sides,
a sampling trajectory differs only where the schedulers differ.
"""
from __future__ import annotations

from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

PARAMETERS = ("proj.weight", "proj.bias", "time")


class StandInDenoiser(nn.Module):
    """``flow = tanh(W x + b + time * t / 1000)`` over channels (channels-last)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Linear(channels, channels)
        self.time = mx.zeros((channels,))

    @classmethod
    def from_weights(cls, weights: Mapping[str, np.ndarray], dtype: mx.Dtype = mx.float32) -> "StandInDenoiser":
        """From the torch module's state dict (numpy), every parameter filled, nothing left over."""
        if sorted(weights) != sorted(PARAMETERS):
            raise KeyError(f"stand-in denoiser: expected weights {list(PARAMETERS)}, got {sorted(weights)}")
        model = cls(weights["time"].shape[0])
        model.load_weights([(k, mx.array(np.asarray(v)).astype(dtype)) for k, v in weights.items()], strict=True)
        return model

    def __call__(self, latents: mx.array, timestep: int) -> mx.array:
        t = mx.array(timestep).astype(latents.dtype) / 1000
        return mx.tanh(self.proj(latents) + t * self.time)
