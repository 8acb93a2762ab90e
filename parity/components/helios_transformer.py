"""Helios transformer: the whole ``HeliosTransformer3DModel`` with short / mid / long history (multi-term memory).

See :mod:`parity.components.transformer` for the layers, sections and precision modes. Inputs:
latents, a timestep, text, and history latents with frame indices: the history precedes the
chunk in time (long oldest, then mid, then short, then the main frames).
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from pydantic import model_validator

from mlx_impl import transformer as mlx_transformer
from parity.component import RunContext
from parity.components._diffusers import HeliosTransformerConfig
from parity.components.transformer import MlxTransformer, TransformerComponent, TransformerConfig
from parity.config import NonNegativeInt


class HeliosTransformerComponentConfig(TransformerConfig):
    transformer: HeliosTransformerConfig
    #: Latent frames of each history term (0: the term is not given).
    history_short: NonNegativeInt = 1
    history_mid: NonNegativeInt = 2
    history_long: NonNegativeInt = 4

    @model_validator(mode="after")
    def _history(self) -> "HeliosTransformerComponentConfig":
        if (self.history_mid or self.history_long) and not self.history_short:
            raise ValueError("history_mid / history_long need history_short (their RoPE grid is the short history's)")
        if (self.history_short or self.history_mid or self.history_long) and not self.transformer.has_multi_term_memory_patch:
            raise ValueError("history frames need transformer.has_multi_term_memory_patch true")
        pt, ph, pw = self.transformer.patch_size
        if self.frames % pt or self.height % ph or self.width % pw:
            raise ValueError(f"latent grid {self.frames}x{self.height}x{self.width}: expected multiples of the patch "
                             f"size {tuple(self.transformer.patch_size)}")
        return self


class HeliosTransformerComponent(TransformerComponent):
    name = "helios_transformer"
    description = ("HeliosTransformer3DModel: patchify, short/mid/long history with multi-term memory, RoPE, "
                   "t=0 history embedding, N blocks, norm_out, proj_out, unpatchify; teacher forcing per block")
    #: no history at all; odd token grids (3 x 5 patches)
    coverage = ({"history_short": 0, "history_mid": 0, "history_long": 0}, {"height": 6, "width": 10})
    config_model = HeliosTransformerComponentConfig
    kind = "helios"
    keep_fp32 = mlx_transformer.HELIOS_KEEP_FP32

    def dims(self, config: Any) -> mlx_transformer.HeliosDims:
        return mlx_transformer.HeliosDims.of(config.transformer.to_dict())

    def mlx_model(self, dims: Any) -> Any:
        return mlx_transformer.HeliosTransformer(dims)

    def terms(self, config: Any) -> list[tuple[str, int]]:
        """History terms given, oldest first, with their frame counts."""
        return [(t, getattr(config, f"history_{t}")) for t in ("long", "mid", "short") if getattr(config, f"history_{t}")]

    def make_inputs(self, config: Any, seed: int) -> dict[str, np.ndarray]:
        """Latents, history latents and frame indices (history first in time), timestep, text; bf16-exact."""
        inputs = self.common_inputs(config, seed)
        inputs["latents"] = self.latents(config, seed, "helios_transformer/latents", config.frames)
        start = 0
        for term, frames in self.terms(config):
            inputs[f"history_{term}"] = self.latents(config, seed, f"helios_transformer/history_{term}", frames)
            inputs[f"history_{term}_indices"] = np.tile(np.arange(start, start + frames, dtype=np.int64), (config.batch, 1))
            start += frames
        main = config.frames // config.transformer.patch_size[0]
        inputs["frame_indices"] = np.tile(np.arange(start, start + main, dtype=np.int64), (config.batch, 1))
        return inputs

    def run_mlx(self, model: MlxTransformer, inputs: dict, dtype: str) -> None:
        config = model.config
        history = {term: mlx_transformer.History(self.mlx_array(inputs[f"history_{term}"], dtype, config, True),
                                                 mx.array(inputs[f"history_{term}_indices"]))
                   for term, _ in self.terms(config)}
        out = model.model(self.mlx_array(inputs["latents"], dtype, config, True), mx.array(inputs["timestep"]),
                          self.mlx_array(inputs["text"], dtype, config), mx.array(inputs["frame_indices"]), history)
        mx.eval(out)

    def forced_args(self, run: RunContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """Text, per-token timestep projection (t = 0 for history), RoPE of all tokens, from the reference's tensors."""
        import torch

        ref = run.ref
        text = np.asarray(ref["condition_embedder/main/text_embedder"])
        proj = np.asarray(ref["condition_embedder/main/time_proj"])
        batch, dim = proj.shape[0], proj.shape[1] // 6
        ropes = [np.asarray(ref[f"history/{t}/rope"]) for t, _ in self.terms(run.config) if f"history/{t}/rope" in ref]
        rope = np.concatenate([*ropes, np.asarray(ref["rope"])], axis=1)
        tokens, main = ref.shapes["tokens"][1], ref.shapes["rope"][1]
        history = tokens - main
        temb = np.broadcast_to(proj.reshape(batch, 1, 6, dim), (batch, tokens if history and not
                               "condition_embedder/t0/time_proj" in ref else main, 6, dim))
        if "condition_embedder/t0/time_proj" in ref:
            t0 = np.asarray(ref["condition_embedder/t0/time_proj"]).reshape(1, 1, 6, dim)
            temb = np.concatenate([np.broadcast_to(t0, (batch, history, 6, dim)), temb], axis=1)
        temb_dtype, text_dtype = ref.dtypes["condition_embedder/main/time_proj"], ref.dtypes["condition_embedder/main/text_embedder"]
        cos, sin = np.split(rope, 2, axis=-1)
        ours = {"context": mx.array(text).astype(getattr(mx, text_dtype)), "temb": mx.array(np.ascontiguousarray(temb)).astype(getattr(mx, temb_dtype)),
                "rope": (mx.array(cos), mx.array(sin)), "history_len": history}
        theirs = {"encoder_hidden_states": torch.from_numpy(text).to(getattr(torch, text_dtype)),
                  "temb": torch.from_numpy(np.ascontiguousarray(temb)).to(getattr(torch, temb_dtype)),
                  "rotary_emb": torch.from_numpy(rope), "original_context_length": main}
        return ours, theirs


COMPONENT = HeliosTransformerComponent()
