"""Wan transformer: the whole ``WanTransformer3DModel``, text-to-video or image-to-video.

See :mod:`parity.components.transformer` for the layers, sections and precision modes. With
``in_channels > out_channels`` the input is Wan's image-to-video layout (Wan2.2 I2V: 36 = 16 + 4
+ 16): noise latents (``out_channels``), the first-frame mask (the rest: ones on latent frame 0,
zeros after) and the image latents (``out_channels``), concatenated along channels as the
pipeline does (``mlx_impl/wan_i2v.py`` is that conditioning's own comparison).
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from pydantic import model_validator

from mlx_impl import transformer as mlx_transformer
from parity.component import RunContext
from parity.components._diffusers import WanTransformerConfig
from parity.components.transformer import MlxTransformer, TransformerComponent, TransformerConfig


class WanTransformerComponentConfig(TransformerConfig):
    transformer: WanTransformerConfig

    @model_validator(mode="after")
    def _layout(self) -> "WanTransformerComponentConfig":
        t = self.transformer
        if t.in_channels != t.out_channels and t.in_channels <= 2 * t.out_channels:
            raise ValueError(f"in_channels {t.in_channels}: expected out_channels ({t.out_channels}) for text-to-video, "
                             f"or noise + mask + image latents (more than 2 x out_channels) for image-to-video")
        pt, ph, pw = t.patch_size
        if self.frames % pt or self.height % ph or self.width % pw:
            raise ValueError(f"latent grid {self.frames}x{self.height}x{self.width}: expected multiples of the patch "
                             f"size {tuple(t.patch_size)}")
        return self


class WanTransformerComponent(TransformerComponent):
    name = "wan_transformer"
    description = ("WanTransformer3DModel (T2V, or I2V with conditioning channels): patchify, RoPE, condition "
                   "embedder, N blocks, norm_out, proj_out, unpatchify; teacher forcing per block")
    #: one latent frame; odd token grids (3 x 5 patches)
    coverage = ({"frames": 1}, {"height": 6, "width": 10})
    config_model = WanTransformerComponentConfig
    kind = "wan"
    keep_fp32 = mlx_transformer.WAN_KEEP_FP32
    alignment = {**TransformerComponent.alignment, "rope/0": ("rope/cos", "reshape"), "rope/1": ("rope/sin", "reshape")}

    def dims(self, config: Any) -> mlx_transformer.WanDims:
        return mlx_transformer.WanDims.of(config.transformer.to_dict())

    def mlx_model(self, dims: Any) -> Any:
        return mlx_transformer.WanTransformer(dims)

    def make_inputs(self, config: Any, seed: int) -> dict[str, np.ndarray]:
        """Latents (I2V: noise, mask, image latents along channels), timestep, text; bf16-exact."""
        inputs = self.common_inputs(config, seed)
        latents = self.latents(config, seed, "wan_transformer/latents", config.frames)
        t = config.transformer
        if t.in_channels > t.out_channels:
            mask = latents[:, t.out_channels:t.in_channels - t.out_channels]
            mask[...] = 0.0
            mask[:, :, 0] = 1.0
        inputs["latents"] = latents
        return inputs

    def run_mlx(self, model: MlxTransformer, inputs: dict, dtype: str) -> None:
        config = model.config
        out = model.model(self.mlx_array(inputs["latents"], dtype, config, True), mx.array(inputs["timestep"]),
                          self.mlx_array(inputs["text"], dtype, config))
        mx.eval(out)

    def forced_args(self, run: RunContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """Text, the ``(b, 6, dim)`` timestep projection and the RoPE tables, from the reference's tensors."""
        import torch

        ref = run.ref
        text = np.asarray(ref["condition_embedder/main/text_embedder"])
        proj = np.asarray(ref["condition_embedder/main/time_proj"])
        proj = proj.reshape(proj.shape[0], 6, -1)
        cos, sin = (np.asarray(ref[f"rope/{i}"]) for i in (0, 1))
        temb_dtype, text_dtype = ref.dtypes["condition_embedder/main/time_proj"], ref.dtypes["condition_embedder/main/text_embedder"]
        ours = {"context": mx.array(text).astype(getattr(mx, text_dtype)), "temb": mx.array(proj).astype(getattr(mx, temb_dtype)),
                "rope": tuple(mx.array(t.reshape(t.shape[0], t.shape[1], -1)) for t in (cos, sin)), "history_len": 0}
        theirs = {"encoder_hidden_states": torch.from_numpy(text).to(getattr(torch, text_dtype)),
                  "temb": torch.from_numpy(proj).to(getattr(torch, temb_dtype)),
                  "rotary_emb": (torch.from_numpy(cos), torch.from_numpy(sin))}
        return ours, theirs


COMPONENT = WanTransformerComponent()
