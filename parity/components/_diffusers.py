"""The diffusers model configs the components embed: the keys the harness reads, typed, with diffusers' defaults.

Any other key the diffusers class's constructor takes is accepted (a real ``config.json`` has
them all); a key it does not take is an error (see :class:`parity.config.DiffusersConfig`).
``tests/test_config.py`` checks these defaults against the installed diffusers signatures.
"""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from parity.config import Bool, DiffusersConfig, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Triple

NOT_PORTED = "not ported: the harness's MLX implementation does not have it"


class HeliosTransformerConfig(DiffusersConfig):
    diffusers_class = "diffusers:HeliosTransformer3DModel"
    patch_size: Triple = (1, 2, 2)
    num_attention_heads: PositiveInt = 40
    attention_head_dim: PositiveInt = 128
    in_channels: PositiveInt = 16
    out_channels: PositiveInt = 16
    text_dim: PositiveInt = 4096
    freq_dim: PositiveInt = 256
    ffn_dim: PositiveInt = 13824
    num_layers: PositiveInt = 40
    cross_attn_norm: Bool = True
    qk_norm: Literal["rms_norm_across_heads"] = "rms_norm_across_heads"
    eps: PositiveFloat = 1e-6
    added_kv_proj_dim: None = None  # image cross-attention: not ported
    rope_dim: Triple = (44, 42, 42)
    rope_theta: PositiveFloat = 10000.0
    guidance_cross_attn: Bool = True
    zero_history_timestep: Bool = True
    has_multi_term_memory_patch: Bool = True
    is_amplify_history: Bool = False
    history_scale_mode: Literal["scalar", "per_head"] = "per_head"


class WanTransformerConfig(DiffusersConfig):
    diffusers_class = "diffusers:WanTransformer3DModel"
    patch_size: Triple = (1, 2, 2)
    num_attention_heads: PositiveInt = 40
    attention_head_dim: PositiveInt = 128
    in_channels: PositiveInt = 16
    out_channels: PositiveInt = 16
    text_dim: PositiveInt = 4096
    freq_dim: PositiveInt = 256
    ffn_dim: PositiveInt = 13824
    num_layers: PositiveInt = 40
    cross_attn_norm: Bool = True
    qk_norm: Literal["rms_norm_across_heads"] = "rms_norm_across_heads"
    eps: PositiveFloat = 1e-6
    image_dim: None = None  # image embedding: not ported
    added_kv_proj_dim: None = None  # image cross-attention: not ported
    rope_max_seq_len: PositiveInt = 1024
    pos_embed_seq_len: None = None


class WanVaeConfig(DiffusersConfig):
    diffusers_class = "diffusers:AutoencoderKLWan"
    base_dim: PositiveInt = 96
    decoder_base_dim: PositiveInt | None = None
    z_dim: PositiveInt = 16
    dim_mult: list[PositiveInt] = [1, 2, 4, 4]
    num_res_blocks: PositiveInt = 2
    attn_scales: list[float] = []
    temperal_downsample: list[Bool] = [False, True, True]
    dropout: NonNegativeFloat = 0.0
    latents_mean: list[float] = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
    latents_std: list[PositiveFloat] = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                                        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]
    is_residual: Literal[False] = False  # Wan2.2 VAE: not ported
    in_channels: PositiveInt = 3
    out_channels: PositiveInt = 3
    patch_size: None = None  # Wan2.2 VAE: not ported
    scale_factor_temporal: PositiveInt = 4
    scale_factor_spatial: PositiveInt = 8

    @model_validator(mode="after")
    def _consistent(self) -> "WanVaeConfig":
        if self.attn_scales:
            raise ValueError(f"attn_scales {self.attn_scales}: attention in the down blocks is {NOT_PORTED}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample: expected {len(self.dim_mult) - 1} flags (one per downsampling), "
                             f"got {self.temperal_downsample}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name}: expected z_dim = {self.z_dim} values, got {len(getattr(self, name))}")
        return self


class HeliosDMDSchedulerConfig(DiffusersConfig):
    diffusers_class = "diffusers:HeliosDMDScheduler"
    num_train_timesteps: PositiveInt = 1000
    shift: PositiveFloat = 1.0
    stages: PositiveInt = 3
    stage_range: list[NonNegativeFloat] = [0, 1 / 3, 2 / 3, 1]
    gamma: PositiveFloat = 1 / 3
    prediction_type: Literal["flow_prediction"] = "flow_prediction"
    use_flow_sigmas: Literal[True] = True
    use_dynamic_shifting: Bool = False
    time_shift_type: Literal["linear", "exponential"] = "linear"

    @model_validator(mode="after")
    def _consistent(self) -> "HeliosDMDSchedulerConfig":
        if len(self.stage_range) < self.stages + 1:
            raise ValueError(f"stage_range: expected {self.stages + 1} boundaries for {self.stages} stages, "
                             f"got {self.stage_range}")
        if self.use_dynamic_shifting and self.shift != 1.0:
            raise ValueError(f"use_dynamic_shifting needs shift 1.0, got {self.shift}")
        return self


class UniPCSchedulerConfig(DiffusersConfig):
    """diffusers' ``UniPCMultistepScheduler`` on the flow-matching path the Wan pipelines use (the only one ported).

    ``prediction_type`` and ``use_flow_sigmas`` have no default: diffusers' defaults ("epsilon",
    False: the VP schedule) are not ported, so a config must say flow matching. The VP keys
    (betas, thresholding values, ``steps_offset``, ``time_shift_type``) are accepted and unused.
    """

    diffusers_class = "diffusers:UniPCMultistepScheduler"
    num_train_timesteps: PositiveInt = 1000
    solver_order: PositiveInt = 2
    prediction_type: Literal["flow_prediction"]
    use_flow_sigmas: Literal[True]
    flow_shift: PositiveFloat = 1.0
    predict_x0: Literal[True] = True
    solver_type: Literal["bh1", "bh2"] = "bh2"
    lower_order_final: Bool = True
    disable_corrector: list[NonNegativeInt] = []
    timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace"
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    thresholding: Literal[False] = False  # not ported
    use_karras_sigmas: Literal[False] = False  # not ported
    use_exponential_sigmas: Literal[False] = False  # not ported
    use_beta_sigmas: Literal[False] = False  # not ported
    use_dynamic_shifting: Literal[False] = False  # not ported
    solver_p: None = None  # not ported
    sigma_min: None = None  # only read by the Karras/exponential/beta sigmas
    sigma_max: None = None
    shift_terminal: None = None  # not ported
