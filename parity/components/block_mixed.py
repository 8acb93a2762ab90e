"""The Helios block in bf16 as official Wan/Helios inference runs it: float32 residual stream, bf16 matmuls.

The reference is the same real diffusers block, float32 weights and inputs, under
``torch.autocast("cpu", bfloat16)``; our side keeps the stream in float32 and runs the
projections and attention in bf16 (config ``"stream": "float32"``, see ``parity.components.block``).
This is the mode in which residual adds done in bf16 are a real bug (the "zoom" bug), so the
gate runs it too. Its float32 run is the plain float32 block.
"""
from __future__ import annotations

from parity.components.block import BlockComponent


class MixedPrecisionBlockComponent(BlockComponent):
    name = "block_mixed"
    description = "HeliosTransformerBlock in mixed precision: float32 residual stream, bf16 matmuls (reference under autocast)"
    #: none: in float32 the mixed-precision block is the block, whose cells cover it
    coverage = ()


COMPONENT = MixedPrecisionBlockComponent()
