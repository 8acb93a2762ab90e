"""Wan DiT transformer block: per-sublayer parity, precision budget, and drift over recurrent application."""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from fixtures.inputs import normal
from mlx_impl import block as mlx_block
from mlx_impl import rope as mlx_rope
from parity.components._diffusers import WanTransformerConfig
from parity.components.block import BlockComponent, GridConfig, MlxBlock, bf16_exact


class WanBlockConfig(GridConfig):
    transformer: WanTransformerConfig


class WanBlockComponent(BlockComponent):
    name = "wan_block"
    description = "WanTransformerBlock: modulation, self-attention with RoPE, text cross-attention, FFN"
    #: one frame; an odd grid
    coverage = ({"frames": 1}, {"height": 5, "width": 7})
    config_model = WanBlockConfig
    keep_fp32 = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    autocast_fp32 = (*keep_fp32, "norm_q", "norm_k")

    def make_inputs(self, config: WanBlockConfig, seed: int) -> dict[str, np.ndarray]:
        """A token grid with smooth and near-Nyquist content, text tokens, one timestep projection per sample; bf16-exact."""
        dim, batch = self.dim(config), config.batch
        shape = (batch, config.frames, config.height, config.width, dim)
        return {
            "hidden": self.stream_grid(config, seed, "wan_block/hidden", shape),
            "text": bf16_exact(normal(seed, "wan_block/text", (batch, config.text_len, dim))),
            "timestep_proj": bf16_exact(normal(seed, "wan_block/timestep_proj", (batch, 6 * dim), config.temb_scale)),
        }

    def build_reference(self, config: WanBlockConfig, seed: int) -> Any:
        from reference_runners import block as reference

        return reference.Reference(reference.build_wan(config.transformer, seed), config)

    def reference_inputs(self, reference: Any, inputs: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
        import torch

        from reference_runners import block as ref_runner

        stream = self.stream_dtype(reference.config, dtype)
        return ref_runner.wan_block_inputs(reference.config, inputs, getattr(torch, stream))

    def run_reference(self, reference: Any, inputs: dict, dtype: str, capture) -> None:
        import torch

        from reference_runners import block as ref_runner

        ref_runner.run_wan(reference, inputs, getattr(torch, self.stream_dtype(reference.config, dtype)), capture,
                           maps=self.maps_on(reference.config))

    def build_mlx(self, config: WanBlockConfig, weights: dict[str, np.ndarray], dtype: str) -> Any:
        t = config.transformer
        block = mlx_block.WanTransformerBlock(self.dim(config), t.ffn_dim, t.num_attention_heads, t.cross_attn_norm, t.eps)
        return self.load_mlx(block, config, weights, dtype)

    def mlx_inputs(self, model: MlxBlock, inputs: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
        """The block's arguments: tokens, the ``(batch, 6, dim)`` timestep projection, RoPE cos/sin."""
        t, mx_dtype = model.config.transformer, getattr(mx, self.stream_dtype(model.config, dtype))
        batch, frames, height, width, dim = inputs["hidden"].shape
        tables = mlx_rope.wan_rope_tables(t.attention_head_dim, t.rope_max_seq_len)
        return {"x": mx.array(inputs["hidden"]).reshape(batch, -1, dim).astype(mx_dtype),
                "context": mx.array(inputs["text"]).astype(mx_dtype),
                "temb": mx.array(inputs["timestep_proj"]).astype(mx_dtype).reshape(batch, 6, dim),
                "rope": mlx_rope.wan_rotary_emb(tables, frames, height, width)}


COMPONENT = WanBlockComponent()
