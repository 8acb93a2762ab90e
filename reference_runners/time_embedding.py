"""Time-embedding reference: the condition embedder inside a real ``HeliosTransformer3DModel``.

The whole (tiny) transformer runs, so the t = 0 history embedding is computed exactly where and
how diffusers computes it; forward hooks on ``condition_embedder`` record each call.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import HeliosTransformer3DModel

from parity.capture import Capture
from parity.capture_torch import hook_modules

PREFIX = "condition_embedder."
#: The transformer calls its condition embedder twice: for the t = 0 history embedding, then for the timestep.
HOOKS = {
    "condition_embedder.timesteps_proj": ["t0/timesteps_proj", "main/timesteps_proj"],
    "condition_embedder.time_embedder": ["t0/time_embedder", "main/time_embedder"],
    "condition_embedder.time_proj": ["t0/time_proj", "main/time_proj"],
    "condition_embedder.text_embedder": ["main/text_embedder"],
}


def build(transformer_config: dict, seed: int) -> HeliosTransformer3DModel:
    torch.manual_seed(seed)
    return HeliosTransformer3DModel.from_config(transformer_config).eval()


def run(model: HeliosTransformer3DModel, inputs: dict[str, np.ndarray], dtype: torch.dtype, capture: Capture) -> None:
    with hook_modules(model, capture, HOOKS):
        model(
            hidden_states=torch.from_numpy(inputs["latents"]).to(dtype),
            timestep=torch.from_numpy(inputs["timesteps"]),
            encoder_hidden_states=torch.from_numpy(inputs["text"]).to(dtype),
        )
