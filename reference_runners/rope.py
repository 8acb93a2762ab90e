"""RoPE references: diffusers' ``HeliosRotaryPosEmbed`` and ``WanRotaryPosEmbed``.

The rotation itself is diffusers' too: Helios' ``apply_rotary_emb_transposed``, and for Wan
``diffusers.models.embeddings.apply_rotary_emb`` (interleaved pairs, the same math as the
function nested inside ``WanAttnProcessor``, which cannot be imported on its own).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_helios import HeliosRotaryPosEmbed, apply_rotary_emb_transposed
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from parity.capture import Capture


def build(config) -> dict:
    """Both RoPE modules, with the config that fixes the position grid."""
    head_dim = sum(config.rope_dim)
    return {
        "config": config,
        "helios": HeliosRotaryPosEmbed(rope_dim=tuple(config.rope_dim), theta=config.theta),
        "wan": WanRotaryPosEmbed(head_dim, tuple(config.wan_patch_size), config.wan_max_seq_len, config.theta),
    }


def run(modules: dict, inputs: dict[str, np.ndarray], dtype: torch.dtype, capture: Capture) -> None:
    config = modules["config"]
    helios = modules["helios"]
    for axis in "tyx":
        capture.add(f"helios/freqs_{axis}", getattr(helios, f"freqs_base_{axis}"))
    emb = helios(frame_indices=torch.from_numpy(inputs["frame_indices"]), height=config.height,
                 width=config.width, device="cpu")
    emb = emb.flatten(2).transpose(1, 2)  # (batch, tokens, 2*head_dim), as the transformer does
    cos, sin = emb.chunk(2, dim=-1)
    capture.add("helios/cos", cos)
    capture.add("helios/sin", sin)
    for name in ("q", "k"):
        x = torch.from_numpy(inputs[f"helios_{name}"]).to(dtype)
        capture.add(f"helios/{name}_rot", apply_rotary_emb_transposed(x, emb))

    wan = modules["wan"]
    capture.add("wan/table_cos", wan.freqs_cos)
    capture.add("wan/table_sin", wan.freqs_sin)
    pt, ph, pw = config.wan_patch_size
    latent = torch.zeros(config.batch, 1, config.num_frames * pt, config.height * ph, config.width * pw)
    cos, sin = wan(latent)  # (1, tokens, 1, head_dim)
    capture.add("wan/cos", cos[:, :, 0])
    capture.add("wan/sin", sin[:, :, 0])
    for name in ("q", "k"):
        x = torch.from_numpy(inputs[f"wan_{name}"]).to(dtype)
        capture.add(f"wan/{name}_rot", apply_rotary_emb(x, (cos[0, :, 0], sin[0, :, 0]), use_real=True,
                                                         use_real_unbind_dim=-1, sequence_dim=1))
