"""Parity glue for examples/external_port, a port written without the harness in mind.

The user's side of checking a port: each component takes the reference side (diffusers module,
inputs, config, thresholds) from the harness's component of the same kind and says how to build
and call the port, what to capture from it (module paths and functions; the port is not edited)
and how its layers line up with the reference's. ``MlxHooks(derive=True)`` reads most of that off
the port's own weight converter; the rest is declared. Run it with
``parity run --component-module examples/external_port_parity.py port_rope port_time_embedding port_block port_vae``.
"""
import mlx.core as mx
from external_port import dit_block, embedding, rope, wan_vae

from parity.api import (Alignment, BlockComponent, MlxHooks, RopeComponent, TimeEmbeddingComponent, VaeComponent,
                        encoder_weights, strict_load)

HEADS_FIRST = "transpose(0, 2, 1, 3)"  # the port's (B, H, L, D) as the reference's (B, L, H, D)


class PortRope(RopeComponent):
    name = "port_rope"
    mlx_hooks = MlxHooks(functions={"external_port.rope:rotary_table": "table", "external_port.rope:rotate": ["q", "k"],
                                    "external_port.rope:axis_frequencies": ["helios/freqs_t", "helios/freqs_y", "helios/freqs_x"]})
    alignment = Alignment.of({"helios/cos": ("table", "take(-1, 0) | repeat(2)"), "helios/sin": ("table", "take(-1, 1) | repeat(2)"),
                              "helios/*_rot": ("{0}", HEADS_FIRST)}, exclude={"wan/*": "the port has Helios RoPE only"})

    def run_mlx(self, config, inputs, dtype):
        table = rope.rotary_table(mx.array(inputs["frame_indices"]), config.height, config.width, config.rope_dim, config.theta)
        for name in ("q", "k"):
            rope.rotate(mx.array(inputs[f"helios_{name}"]).astype(getattr(mx, dtype)).transpose(0, 2, 1, 3), table)


class PortTimeEmbedding(TimeEmbeddingComponent):
    name = "port_time_embedding"
    convert_weights = staticmethod(embedding.convert_state_dict)
    mlx_hooks = MlxHooks(outputs={"time_mlp": ["main/time_embedder", "t0/time_embedder"], "text_mlp": "main/text_embedder",
                                  "time_proj": ["main/time_proj", "t0/time_proj"]},
                         functions={"external_port.embedding:timestep_features": ["main/timesteps_proj", "t0/timesteps_proj"]})
    alignment = Alignment.of({"*/timesteps_proj": ("{0}/timesteps_proj", "swap_halves")})

    def build_mlx(self, config, weights, dtype):
        t = config.transformer
        model = embedding.TimeTextEmbedder(t.num_attention_heads * t.attention_head_dim, t.freq_dim, t.text_dim)
        return strict_load(model, weights, dtype=getattr(mx, dtype), keep_float32=("time_mlp",))

    def run_mlx(self, model, inputs, dtype):
        model(mx.array(inputs["timesteps"]), mx.array(inputs["text"]).astype(getattr(mx, dtype)))


class PortBlock(BlockComponent):
    name = "port_block"
    convert_weights = staticmethod(dit_block.convert_state_dict)
    mlx_hooks = MlxHooks(derive=True, outputs={"pre_norm": "norm1", "ffn_norm": "norm3", "ffn.layers.1": "ffn/hidden"},
                         functions={"external_port.rope:rotate": ["attn1/q_rope", "attn1/k_rope"],
                                    "external_port.dit_block:attention": ["attn1/attention", "attn2/attention"]})
    alignment = Alignment.of({"*/*_rope": ("{0}/{1}_rope", HEADS_FIRST), "*/attention": ("{0}/attention", HEADS_FIRST)},
                             exclude={"modulation/*": "no module output in the port", "*/modulated": "not materialised",
                                      "residual*": "the port's residual sums are no module output"})

    def build_mlx(self, config, weights, dtype):
        t = config.transformer
        model = dit_block.HeliosBlock(self.dim(config), t.ffn_dim, t.num_attention_heads, t.cross_attn_norm, t.eps,
                                      t.guidance_cross_attn, t.is_amplify_history, t.history_scale_mode)
        return strict_load(model, weights, dtype=getattr(mx, dtype), keep_float32=dit_block.KEEP_FLOAT32), t

    def mlx_apply(self, model, inputs, dtype, x=None):
        (port, t), to = model, lambda key: mx.array(inputs[key]).astype(getattr(mx, dtype))
        batch, frames, height, width, dim = inputs["hidden"].shape
        x = mx.concatenate([to(k).reshape(batch, -1, dim) for k in ("history", "hidden")], axis=1) if x is None else x
        table = mx.concatenate([rope.rotary_table(mx.array(inputs[k]), height, width, t.rope_dim, t.rope_theta)
                                for k in ("history_indices", "frame_indices")], axis=1)
        return port(x, to("text"), to("timestep_proj").reshape(batch, 6, dim), to("timestep_proj_t0").reshape(1, 6, dim),
                    table, x.shape[1] - frames * height * width)


class PortVae(VaeComponent):
    name = "port_vae"
    convert_weights = staticmethod(lambda weights: wan_vae.convert_state_dict(encoder_weights(weights)))
    mlx_hooks = MlxHooks(derive=True, scopes={"encoder": "chunk{call}"},
                         functions={"external_port.wan_vae:normalize_latents": "latents"})

    def build_mlx(self, config, weights, dtype):
        return strict_load(wan_vae.WanVideoEncoder(**config.vae.to_dict()), weights, dtype=getattr(mx, dtype))

    def run_mlx(self, model, inputs, dtype):
        model.encode(mx.array(inputs["video"]).astype(getattr(mx, dtype)))


COMPONENTS = [PortRope(), PortTimeEmbedding(), PortBlock(), PortVae()]
