"""A deterministic stand-in for the transformer in sampler trajectories (not part of any model).

``flow = tanh(proj(x) + time * t / 1000)`` over channels, with random weights drawn from the
seed. The MLX twin is ``mlx_impl.stand_in.StandInDenoiser`` (same function, same parameter
names); with the same weights on both sides a trajectory differs only where the schedulers do.
Used by the Helios DMD scheduler and the UniPC scheduler components.
"""
from __future__ import annotations

import math

import torch

from fixtures.inputs import normal
from parity.weights import load_torch_strict


class StandInDenoiser(torch.nn.Module):
    """``flow = tanh(W x + b + time * t / 1000)`` over channels (channels-first latents, timesteps per batch)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = torch.nn.Linear(channels, channels)
        self.time = torch.nn.Parameter(torch.zeros(channels))

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = latents.movedim(1, -1)
        t = (timestep.to(x.dtype) / 1000).view(-1, 1, 1, 1, 1)
        return torch.tanh(self.proj(x) + t * self.time).movedim(-1, 1)


def build(channels: int, seed: int, stream: str) -> StandInDenoiser:
    """A stand-in with weights drawn from ``seed`` under the input stream prefix ``stream`` (e.g. ``"unipc"``)."""
    denoiser = StandInDenoiser(channels)
    load_torch_strict(denoiser, {
        "proj.weight": normal(seed, f"{stream}/denoiser/proj.weight", (channels, channels), scale=1 / math.sqrt(channels)),
        "proj.bias": normal(seed, f"{stream}/denoiser/proj.bias", (channels,), scale=0.1),
        "time": normal(seed, f"{stream}/denoiser/time", (channels,)),
    })
    return denoiser
