"""parity explain on real runs: every fault-injection twin whose fault is in the catalog, and an injected mistake for
each other entry, gets its mistake ranked first; faults outside the catalog get "no known mistake explains this"; a
clean run gets no explanation; the command, the HTML page, the JSON report and the pytest message show it; nothing
it does changes a verdict or a stored tensor.

One run per fault, with sections and the second call switched off (the explanation reads the layers only) unless
the fault is the second call's.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import parity.runner
from mlx_impl import block, rope, time_embedding, unipc, vae
from mlx_impl import scheduler as S
from parity import registry
from parity.commands import main
from parity.component import Component
from parity.runner import run_component

ROOT = Path(__file__).resolve().parent.parent
GLUE = ROOT / "examples" / "external_port_parity.py"
sys.path.insert(0, str(ROOT / "examples"))  # where the external port lives (the glue's folder)
from external_port import dit_block, embedding, wan_vae  # noqa: E402
from external_port import rope as port_rope  # noqa: E402
from test_scheduler import brief_formula, inverse_shift, scheduler_config  # noqa: E402
from test_vae import lose_cache  # noqa: E402

FAST_BLOCK = {"drift_steps": 1}
SMALL_VAE = {"frames": 5, "height": 16, "width": 16}


@pytest.fixture(autouse=True)
def glue():
    """The external port's components (the registry is reset after every test)."""
    registry.use_files([GLUE])


@pytest.fixture
def quick(monkeypatch):
    """No sections and no second call: the explanation reads the first call's layers only."""
    monkeypatch.setattr(parity.runner, "sections", lambda *args, **kwargs: [])
    monkeypatch.setattr(Component, "second_call", False)


def explanation(result):
    (entry,) = result.report["explanation"]["layers"]
    return entry


# --- the faults -------------------------------------------------------------------------------------
# Each returns (component, dtype, overrides). "twin": the fault of a fault-injection test elsewhere in tests/.

def gelu_exact(mp):  # twin: test_block.py::test_fault_gelu_exact_instead_of_tanh
    mp.setattr(block, "gelu_tanh", lambda x: block.nn.gelu(x.astype(mx.float32)).astype(x.dtype))
    return "block", "float32", FAST_BLOCK


def norm_eps(mp):  # twin: test_block.py::test_fault_norm_eps
    init = block.TransformerBlock.__init__
    mp.setattr(block.TransformerBlock, "__init__", lambda self, dim, ffn, heads, norm2=False, eps=1e-6, mode=None:
               init(self, dim, ffn, heads, norm2, 1e-5, mode))
    return "block", "float32", FAST_BLOCK


def attention_scale(mp):  # twin: test_block.py::test_fault_attention_scale_from_model_dim
    init = block.Attention.__init__

    def wrong_scale(self, dim, heads, eps, history_scale_mode=None):
        init(self, dim, heads, eps, history_scale_mode)
        self.scale = dim ** -0.5
    mp.setattr(block.Attention, "__init__", wrong_scale)
    return "block", "float32", FAST_BLOCK


def attention_scale_bf16(mp):  # twin: test_attention.py::test_fault_wrong_softmax_scale[bfloat16]
    attention_scale(mp)
    return "block", "bfloat16", FAST_BLOCK


def qk_norm_missing(mp):  # twin: test_block.py::test_fault_qk_norm_missing
    def qkv_without_norm(self, x, context):
        context = x if context is None else context
        q, k, v = (block.tap(n, f(i)) for n, f, i in (("q", self.to_q, x), ("k", self.to_k, context), ("v", self.to_v, context)))
        q, k = block.tap("q_norm", q), block.tap("k_norm", k)
        return tuple(t.reshape(*t.shape[:2], self.heads, -1) for t in (q, k, v))
    mp.setattr(block.Attention, "qkv", qkv_without_norm)
    return "wan_block", "float32", FAST_BLOCK


def modulation_bf16(mp):  # twin: test_block.py::test_fault_modulation_in_bf16_caught_by_budget_not_by_cosine
    def bf16_modulation(self, temb):
        mod = self.scale_shift_table.astype(temb.dtype) + temb
        parts = [mod[:, :, i] if temb.ndim == 4 else mod[:, i:i + 1] for i in range(6)]
        return [block.tap(f"modulation/{n}", part) for n, part in zip(block.MODULATION, parts)]
    mp.setattr(block.TransformerBlock, "modulation", bf16_modulation)
    return "block", "bfloat16", FAST_BLOCK


def residual_bf16(mp):  # twin: test_block.py::test_fault_bf16_residual_adds_in_mixed_precision
    from test_block import _bf16_residual_adds

    _bf16_residual_adds(mp)
    return "block_mixed", "bfloat16", FAST_BLOCK


def residual_not_cast_back(mp):  # twin: test_block.py::test_fault_residual_not_cast_back_caught_by_the_dtype_rule
    mp.setattr(block.TransformerBlock, "gated_residual",
               staticmethod(lambda x, u, g: x.astype(mx.float32) + u.astype(mx.float32) * g))
    return "block", "bfloat16", FAST_BLOCK


def t0_zeros(mp):  # twin: test_time_embedding.py::test_fault_t0_embedding_taken_as_zeros (catalog bug 5)
    def zeros_t0(self, dtype):
        sinusoid = time_embedding.tap("timesteps_proj", mx.zeros((1, self.time_freq_dim)))
        temb = time_embedding.tap("time_embedder", self.time_embedder(sinusoid)).astype(dtype)
        return temb, time_embedding.tap("time_proj", self.time_proj(time_embedding.nn.silu(temb)))
    mp.setattr(time_embedding.TimeTextEmbedding, "history_t0", zeros_t0)
    return "time_embedding", "float32", {}


def sin_cos_flipped(mp):  # twin: test_time_embedding.py::test_fault_sin_cos_order_flipped
    correct = time_embedding.sinusoidal_embedding

    def flipped(timesteps, dim, max_period=10000.0):
        emb = correct(timesteps, dim, max_period)
        return mx.concatenate([emb[:, dim // 2:], emb[:, :dim // 2]], axis=-1)
    mp.setattr(time_embedding, "sinusoidal_embedding", flipped)
    return "time_embedding", "float32", {}


def time_embedder_bf16(mp):  # twin: test_time_embedding.py::test_fault_time_embedder_not_kept_in_float32
    from parity.components import time_embedding as component

    correct = component.strict_load
    mp.setattr(component, "strict_load", lambda model, weights, dtype=None, keep_float32=(): correct(model, weights, dtype=dtype))
    return "time_embedding", "bfloat16", {}


def shift_formula(mp):  # twin: test_scheduler.py::test_fault_dynamic_shift_formula[brief_formula] (catalog bug 7)
    mp.setattr(S, "time_shift", brief_formula)
    return "scheduler", "float32", {}


def inverse_time_shift(mp):  # twin: test_scheduler.py::test_fault_dynamic_shift_formula[inverse_shift]
    mp.setattr(S, "time_shift", inverse_shift)
    return "scheduler", "float32", {}


def shift_in_set_timesteps(mp):  # twin: test_scheduler.py::test_fault_dynamic_shift_in_set_timesteps_only
    mp.setattr(S.HeliosDMDScheduler, "time_shift", lambda self, mu, sigma, t, tensor_order=True: inverse_shift(mu, sigma, t, None))
    return "scheduler", "float32", {"scheduler": scheduler_config(1, use_dynamic_shifting=True), "steps": [3]}


def downsample_without_rescale(mp):  # twin: test_scheduler.py::test_fault_downsample_without_rescale
    mp.setattr(S, "downsample", lambda x: x.reshape(*x.shape[:2], x.shape[2] // 2, 2, x.shape[3] // 2, 2, x.shape[4])
               .mean(axis=(3, 5)))
    return "scheduler", "float32", {}


def flow_shift_twice(mp):  # twin: test_unipc.py::test_fault_flow_shift_applied_twice
    once = unipc.shift_sigmas
    mp.setattr(unipc, "shift_sigmas", lambda sigmas, shift: once(once(sigmas, shift), shift))
    return "unipc_scheduler", "float32", {}


def cache_dropped(mp):  # twin: test_vae.py::test_fault_feature_cache_dropped_between_chunks (catalog bug 3's cache)
    lose_cache(mp)
    return "vae", "float32", SMALL_VAE


def cache_keeps_one_frame(mp):  # twin: test_vae.py::test_fault_cache_keeps_one_frame
    mp.setattr(vae, "CACHE_T", 1)
    return "vae", "float32", {"height": 16, "width": 16}


def port_rotary_halves(mp):  # twin: test_external_port.py::test_fault_rotary_pairs_taken_as_halves
    correct = port_rope.rotate

    def halves(x, table):
        d = x.shape[-1] // 2
        interleaved = mx.stack([x[..., :d], x[..., d:]], axis=-1).reshape(x.shape)
        out = correct(interleaved, table).reshape(*x.shape[:-1], d, 2)
        return mx.concatenate([out[..., 0], out[..., 1]], axis=-1)
    mp.setattr(port_rope, "rotate", halves)
    return "port_rope", "float32", {}


def port_t0_zeros(mp):  # twin: test_external_port.py::test_fault_t0_embedding_taken_as_zeros
    correct = embedding.timestep_features
    mp.setattr(embedding, "timestep_features", lambda t, dim: mx.zeros((t.shape[0], dim)) if t.shape[0] == 1 else correct(t, dim))
    return "port_time_embedding", "float32", {}


def port_gelu_exact(mp):  # twin: test_external_port.py::test_fault_exact_gelu_where_the_reference_uses_tanh
    exact = nn.GELU
    mp.setattr(dit_block.nn, "GELU", lambda approx="none": exact())
    return "port_block", "float32", FAST_BLOCK


def port_k_v_swapped(mp):  # twin: test_external_port.py::test_fault_converter_swaps_k_and_v_in_the_fused_projection
    rules = [dit_block._weights.Rule(("attn1.to_q.{p}", "attn1.to_v.{p}", "attn1.to_k.{p}"), "self_attn.qkv.{p}")
             if r.target == "self_attn.qkv.{p}" else r for r in dit_block.RULES]
    mp.setattr(dit_block, "RULES", rules)
    return "port_block", "float32", FAST_BLOCK


def port_cache_dropped(mp):  # twin: test_external_port.py::test_fault_vae_cache_dropped_between_chunks
    mp.setattr(wan_vae.ChunkState, "carry", lambda self, x: (self._slot(), None)[1])
    return "port_vae", "float32", SMALL_VAE


def unpatchify_permuted(mp):  # twin: test_transformer.py::test_fault_unpatchify_wrong_permutation
    from mlx_impl import transformer as T

    def unpatchify(x, grid, patch):
        (f, h, w), (pt, ph, pw) = grid, patch
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1).transpose(0, 1, 4, 5, 2, 6, 3, 7)
        return x.reshape(x.shape[0], f * pt, h * ph, w * pw, -1)
    mp.setattr(T, "unpatchify", unpatchify)
    return "wan_transformer", "float32", {"teacher_forcing": False}


def embedding_memoised(mp):  # twin: test_second_call.py::test_an_embedding_memoised_at_the_first_call_fails_at_the_second
    forward, memo = time_embedding.TimestepEmbedding.__call__, {}
    mp.setattr(time_embedding.TimestepEmbedding, "__call__", lambda self, x: memo.setdefault((id(self), x.shape),
                                                                                          forward(self, x)))
    mp.setattr(Component, "second_call", True)  # the first call passes: the divergence is the second call's
    return "time_embedding", "float32", {}


# Injected for the other entries (no twin in the repository):

def attention_map_transposed(mp):
    """The port's attention map stored (keys, queries): the first divergence is the map, judged per head."""
    correct = block.attention_probs
    mp.setattr(block, "attention_probs", lambda q, k, scale, mask=None: np.ascontiguousarray(
        np.swapaxes(correct(q, k, scale, mask), -1, -2)))
    return "block", "float32", FAST_BLOCK


def _last_downsample(mp, mistake):
    """The mistake in the second (last) of the pyramid's two downsamplings, 8 x 8 -> (1, 2, 4, 4, 4)."""
    correct = S.downsample
    mp.setattr(S, "downsample", lambda x: mistake(correct(x)) if x.shape[2] == 8 else correct(x))
    return "scheduler", "float32", {}


def downsample_w_c_swapped(mp):
    return _last_downsample(mp, lambda x: x.swapaxes(3, 4))


def downsample_h_w_swapped(mp):
    return _last_downsample(mp, lambda x: x.transpose(0, 1, 3, 2, 4))


def downsample_negated(mp):
    return _last_downsample(mp, lambda x: -x)


def downsample_clipped(mp):
    return _last_downsample(mp, lambda x: mx.clip(x, -1.0, 1.0))


def downsample_offset(mp):
    return _last_downsample(mp, lambda x: x + 0.01)


def train_sigmas_in_float32(mp):
    correct = S.HeliosDMDScheduler._train_schedule
    mp.setattr(S.HeliosDMDScheduler, "_train_schedule",
               lambda self: tuple(np.asarray(a, np.float32).astype(np.float64) for a in correct(self)))
    return "scheduler", "float32", {}


def linspace_without_endpoint(mp):
    def flow_sigmas(num_inference_steps, num_train_timesteps=1000, flow_shift=1.0, final_sigmas_type="zero"):
        sigmas = unipc.shift_sigmas(np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1, endpoint=False)[:-1],
                                    flow_shift)
        if np.fabs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6
        return unipc.finish_schedule(sigmas, num_train_timesteps, final_sigmas_type)
    mp.setattr(unipc, "diffusers_flow_sigmas", flow_sigmas)
    return "unipc_scheduler", "float32", {}


def rotation_stored_as_halves(mp):
    correct = rope.apply_rotary_emb
    mp.setattr(rope, "apply_rotary_emb", lambda x, cos, sin: (lambda out: mx.concatenate(
        [out[..., 0::2], out[..., 1::2]], axis=-1))(correct(x, cos, sin)))
    return "rope", "float32", {}


def wan_positions_off_by_one(mp):
    mp.setattr(rope, "_axis_table", lambda dim, max_seq_len, theta: np.repeat(np.outer(
        np.arange(1, max_seq_len + 1, dtype=np.float64), 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)), 2, axis=1))
    return "rope", "float32", {}


def silu_as_gelu(mp):
    mp.setattr(time_embedding.nn, "silu", nn.gelu)
    return "time_embedding", "float32", {}


def text_embedding_rounded_to_bf16(mp):
    mp.setattr(time_embedding.TimeTextEmbedding, "embed_text", lambda self, text: time_embedding.tap(
        "text_embedder", self.text_embedder(text).astype(mx.bfloat16).astype(mx.float32)))
    return "time_embedding", "float32", {}


def _norm1(mp, normalise):
    correct = block.TransformerBlock.modulated_norm

    def modulated_norm(self, name, x, shift, scale):
        if name != "norm1":
            return correct(self, name, x, shift, scale)
        normed = block.tap(name, normalise(x.astype(mx.float32)))
        return block.tap(f"{name}/modulated", (normed * (1 + scale) + shift).astype(x.dtype))
    mp.setattr(block.TransformerBlock, "modulated_norm", modulated_norm)
    return "block", "float32", FAST_BLOCK


def norm1_as_rms_norm(mp):
    return _norm1(mp, lambda x: mx.fast.rms_norm(x, None, 1e-6))


def norm1_over_tokens(mp):
    return _norm1(mp, lambda x: (x - x.mean(axis=1, keepdims=True)) * mx.rsqrt(x.var(axis=1, keepdims=True) + 1e-6))


def qk_norm_without_weight(mp):
    mp.setattr(block, "rms_norm", lambda norm, x: mx.fast.rms_norm(x.astype(mx.float32), None, norm.eps).astype(x.dtype))
    return "block", "float32", FAST_BLOCK


def extra_norm_before_ffn(mp):
    correct = block.FeedForward.__call__
    mp.setattr(block.FeedForward, "__call__", lambda self, x: correct(self, mx.fast.layer_norm(x, None, None, 1e-6)))
    return "block", "float32", FAST_BLOCK


#: (fault, first divergence, the mistake ranked first)
EXPLAINED = [
    (gelu_exact, "ffn/hidden", "gelu_approximation"),
    (norm_eps, "attn2/q_norm", "norm_eps"),
    (attention_scale, "attn1/attention", "attention_scale"),
    (attention_scale_bf16, "attn1/attention", "attention_scale"),
    (qk_norm_missing, "attn1/q_norm", "missing_norm"),
    (modulation_bf16, "modulation/shift_msa", "bf16_arithmetic"),
    (residual_bf16, "residual1", "residual_bf16"),
    (residual_not_cast_back, "residual1", "cast_back_missing"),
    (t0_zeros, "t0/timesteps_proj", "zeroed_region"),
    (sin_cos_flipped, "t0/timesteps_proj", "chunk_order"),
    (time_embedder_bf16, "t0/time_embedder", "sublayer_bf16"),
    (shift_formula, "time_shift/linear", "time_shift_inverted"),
    (inverse_time_shift, "time_shift/linear", "time_shift_inverted"),
    (shift_in_set_timesteps, "stage0/timesteps", "time_shift_inverted"),
    (downsample_without_rescale, "stage0/downsample", "scale"),
    (flow_shift_twice, "sigmas", "shift_again"),
    (cache_dropped, "chunk1/conv_in", "missing_cache"),
    (cache_keeps_one_frame, "chunk2/conv_in", "missing_cache"),
    (port_rotary_halves, "helios/q_rot", "rotary_pairs"),
    (port_t0_zeros, "t0/timesteps_proj", "zeroed_region"),
    (port_gelu_exact, "ffn/hidden", "gelu_approximation"),
    (port_k_v_swapped, "attn1/k_norm", "fused_input_swap"),
    (port_cache_dropped, "chunk1/conv_in", "missing_cache"),
    (unpatchify_permuted, "unpatchify", "axis_order"),
    (downsample_w_c_swapped, "stage0/downsample", "transpose_last_two"),
    (attention_map_transposed, "attn1/probs", "transpose_last_two"),
    (embedding_memoised, "call2/main/time_embedder", "stale_state"),
    (downsample_h_w_swapped, "stage0/downsample", "axis_order"),
    (downsample_negated, "stage0/downsample", "sign_flip"),
    (downsample_clipped, "stage0/downsample", "clamp"),
    (downsample_offset, "stage0/downsample", "offset"),
    (train_sigmas_in_float32, "construction/sigmas", "float32_schedule"),
    (linspace_without_endpoint, "sigmas", "linspace_endpoint"),
    (rotation_stored_as_halves, "helios/q_rot", "rotary_layout"),
    (wan_positions_off_by_one, "wan/table_cos", "one_step_shift"),
    (silu_as_gelu, "t0/time_embedder", "silu_gelu"),
    (text_embedding_rounded_to_bf16, "main/text_embedder", "rounded_once"),
    (norm1_as_rms_norm, "norm1", "norm_kind"),
    (norm1_over_tokens, "norm1", "norm_axis"),
    (qk_norm_without_weight, "attn1/q_norm", "norm_affine"),
    (extra_norm_before_ffn, "ffn/hidden", "extra_norm"),
]


@pytest.mark.parametrize("fault,first,mistake", EXPLAINED, ids=[f[0].__name__ for f in EXPLAINED])
def test_the_mistake_is_ranked_first_for_its_own_fault(quick, monkeypatch, fault, first, mistake):
    component, dtype, overrides = fault(monkeypatch)
    result = run_component(component, dtype, out_dir=None, overrides=overrides or None)
    assert result.verdict == "FAIL" and result.first_divergence == first
    entry = explanation(result)
    assert entry["top"] == mistake, entry["summary"]
    assert entry["explained"] and entry["summary"].startswith(f"{first}: matches the reference with ")


def test_the_catalog_is_proved_entry_by_entry():
    """Every entry is ranked first for a fault of its own above (and at least 15 on an example port)."""
    from parity.explain.catalog import CATALOG

    proved = {mistake for _, _, mistake in EXPLAINED}
    assert proved == {h.name for h in CATALOG}
    assert len(proved) >= 15


# --- faults outside the catalog, a clean run ---------------------------------------------------------

def rope_sin_cos_swapped(mp):  # twin: test_rope.py::test_fault_sin_cos_flipped_in_rotation
    correct = rope.apply_rotary_emb
    mp.setattr(rope, "apply_rotary_emb", lambda x, cos, sin: correct(x, sin, cos))
    return "rope", "float32", {}


def frequency_shift(mp):  # twin: test_time_embedding.py::test_fault_frequency_shift_shows_only_for_nonzero_timesteps
    def shifted(timesteps, dim, max_period=10000.0):
        half = dim // 2
        freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / (half - 1))
        angles = timesteps.astype(mx.float32)[:, None] * freqs[None, :]
        return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)
    mp.setattr(time_embedding, "sinusoidal_embedding", shifted)
    return "time_embedding", "float32", {}


def gamma_correction_skipped(mp):  # twin: test_scheduler.py::test_fault_gamma_correction_skipped
    mp.setattr(S, "corrected_start_sigma", lambda start_sigma, gamma: start_sigma)
    return "scheduler", "float32", {}


def sigma_index_off_by_one(mp):  # twin: test_scheduler.py::test_fault_sigma_index_off_by_one
    correct = S.timestep_index
    mp.setattr(S, "timestep_index", lambda timesteps, t: correct(timesteps, t) + 1)
    return "scheduler", "float32", {}


def rope_applied_to_v(mp):  # twin: test_block.py::test_fault_rope_applied_to_v
    def call(self, x, context=None, rope=None, history_len=0):
        q, k, v = self.qkv(x, context)
        if rope is not None:
            q, k = self.rotate(q, k, rope)
            v = block.apply_rotary_emb(v, *rope)
        return self.project_out(self.attend(q, k, v))
    mp.setattr(block.Attention, "__call__", call)
    return "block", "float32", FAST_BLOCK


def feature_cache_kept(mp):  # twin: test_second_call.py::test_a_feature_cache_kept_on_the_model_fails_at_the_second_encode
    """The second encode starts with the first one's past frames (not a value kept: a stale input)."""
    shared = vae.FeatureCache()
    mp.setattr(vae, "FeatureCache", lambda: shared)
    mp.setattr(Component, "second_call", True)
    return "vae", "float32", {"height": 16, "width": 16}


def one_head_scaled(mp):  # twin: test_attention.py::test_fault_one_head_scale_localised_to_that_head[float32...]
    from test_attention import _head_scale

    _head_scale(mp, 1.1)
    return "block", "float32", FAST_BLOCK


def key_mask_off_by_one(mp):  # twin: test_attention.py::test_fault_key_mask_off_by_one[float32]
    mp.setattr(block.Attention, "key_mask",
               lambda self, h, tokens: block.history_mask(h + 1, tokens) if self.restrict_history and h else None)
    return "block", "float32", {**FAST_BLOCK, "history_attention": "restricted"}


def expert_switch_late(mp):  # twin: test_wan_two_experts.py::test_fault_expert_switch_one_step_late
    from mlx_impl import wan_experts as W

    correct = W.expert_schedule
    mp.setattr(W, "expert_schedule", lambda timesteps, boundary: [W.HIGH] + correct(timesteps, boundary)[:-1])
    return "wan_two_experts", "float32", {}


OUTSIDE = [(rope_sin_cos_swapped, "helios/q_rot"), (frequency_shift, "main/timesteps_proj"),
           (gamma_correction_skipped, "construction/start_sigmas"), (sigma_index_off_by_one, "stage0/step0"),
           (rope_applied_to_v, "attn1/attention"), (feature_cache_kept, "call2/chunk0/conv_in"),
           (one_head_scaled, "attn1/attention"), (key_mask_off_by_one, "attn1/attention"),
           (expert_switch_late, "step3/expert")]


@pytest.mark.parametrize("fault,first", OUTSIDE, ids=[f[0].__name__ for f in OUTSIDE])
def test_a_fault_outside_the_catalog_is_no_wrong_guess(quick, monkeypatch, fault, first):
    component, dtype, overrides = fault(monkeypatch)
    result = run_component(component, dtype, out_dir=None, overrides=overrides or None)
    assert result.first_divergence == first
    entry = explanation(result)
    assert entry["top"] is None and entry["summary"] == f"{first}: no known mistake explains this"
    assert not any(h["explained"] for h in entry["hypotheses"])
    assert "no known mistake explains this" in result.report["explanation"]["layers"][0]["summary"]


def test_a_clean_run_has_no_explanation():
    result = run_component("rope", "float32", out_dir=None)  # its second call and sections too
    assert any(l.name.startswith("call2/") for l in result.layers)
    assert result.verdict == "PASS" and result.report["explanation"] is None


def test_explaining_changes_no_verdict(quick, monkeypatch):
    norm_eps(monkeypatch)
    plain = run_component("block", "float32", out_dir=None, overrides=FAST_BLOCK, explain=False)
    explained = run_component("block", "float32", out_dir=None, overrides=FAST_BLOCK)
    assert plain.report["explanation"] is None and explained.report["explanation"]["layers"][0]["top"] == "norm_eps"
    assert [l.row() for l in plain.layers] == [l.row() for l in explained.layers]


def test_the_explanation_is_of_the_first_divergence_with_maps_and_the_second_call(monkeypatch):
    """A full run (attention maps, the second call, sections): later maps and call2/ layers fail too; the
    explanation is of the first divergence only."""
    gelu_exact(monkeypatch)
    result = run_component("block", "float32", out_dir=None, overrides=FAST_BLOCK)
    failing = [l.name for l in result.layers if l.verdict == "FAIL"]
    assert result.first_divergence == "ffn/hidden" and "call2/ffn/hidden" in failing
    assert any(layer.name.endswith("/probs") for layer in result.layers)
    (entry,) = result.report["explanation"]["layers"]
    assert entry["layer"] == "ffn/hidden" and entry["top"] == "gelu_approximation"


def test_the_command_explains_a_second_call_divergence(tmp_path, monkeypatch, capsys):
    """From the report folder: the first call's reference tensor from its dump, the reference rebuilt and re-run on
    the second call's inputs."""
    embedding_memoised(monkeypatch)
    assert main(["run", "time_embedding", "--dtype", "float32", "--out", str(tmp_path), "--quiet"]) == 1
    capsys.readouterr()
    assert main(["explain", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "call2/main/time_embedder: matches the reference with the first call's value of this layer [stale_state]" in out
    assert "0 <- call2/main/timesteps_proj" in out  # the sublayer fed the port's second-call tensor


# --- where it shows: report.json, terminal, HTML, the command, pytest ---------------------------------

def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def faulty_run(tmp_path, monkeypatch, capsys):
    """A run folder of time_embedding float32 with the sin/cos halves swapped, written by ``parity run``."""
    sin_cos_flipped(monkeypatch)
    assert main(["run", "time_embedding", "--dtype", "float32", "--out", str(tmp_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    (report_dir,) = tmp_path.glob("*/time_embedding-float32")
    return report_dir, out


def test_report_json_terminal_and_html_show_it(faulty_run):
    report_dir, out = faulty_run
    text = (report_dir / "report.json").read_text()
    report = json.loads(text)  # strict JSON
    entry = report["explanation"]["layers"][0]
    assert entry["top"] == "chunk_order" and report["explanation"]["advice"].startswith("advice only")
    assert "parity explain (advice): t0/timesteps_proj: matches the reference with the 2 chunks" in out
    page = (report_dir / "report.html").read_text()
    assert 'id="explanation"' in page and "Likely mistake (advice)" in page and "chunk_order" in page
    assert page.index('id="explanation"') < page.index("<h2>Layers</h2>")


def test_the_command_explains_a_run_folder_and_changes_nothing(faulty_run, capsys):
    report_dir, _ = faulty_run
    before = _hashes(report_dir.parent)
    assert main(["explain", str(report_dir.parent)]) == 0
    out = capsys.readouterr().out
    assert "[time_embedding float32] FAIL, first divergence: t0/timesteps_proj" in out
    assert "t0/timesteps_proj: matches the reference with the 2 chunks of the last axis in order (1, 0)" in out
    assert "advice only" in out
    assert main(["explain", str(report_dir), "--all", "--json", "--no-rerun"]) == 1  # later layers inherit, unexplained
    data = json.loads(capsys.readouterr().out)
    assert [e["layer"] for e in data["layers"]] == [r["layer"] for r in json.loads(
        (report_dir / "report.json").read_text())["layers"] if r["verdict"] == "FAIL"]
    assert main(["explain", str(report_dir), "--layer", "main/text_embedder"]) == 0
    assert "main/text_embedder: passes: nothing to explain" in capsys.readouterr().out
    assert _hashes(report_dir.parent) == before


def test_the_command_exit_codes(faulty_run, tmp_path, capsys, monkeypatch):
    report_dir, _ = faulty_run
    assert main(["explain", str(report_dir), "--layer", "nope"]) == 2
    assert "no layer 'nope'" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setattr("parity.explain.catalog.CATALOG", ())  # nothing known: the divergence is not explained
    assert main(["explain", str(report_dir)]) == 1
    assert "t0/timesteps_proj: no known mistake explains this" in capsys.readouterr().out


def test_the_pytest_failure_message_names_the_top_mistake(pytester):
    pytester.makeconftest("""
        import mlx.core as mx
        import pytest
        from mlx_impl import time_embedding

        @pytest.fixture(autouse=True)
        def fault(monkeypatch):
            correct = time_embedding.sinusoidal_embedding
            def flipped(t, dim, max_period=10000.0):
                emb = correct(t, dim, max_period)
                return mx.concatenate([emb[:, dim // 2:], emb[:, :dim // 2]], axis=-1)
            monkeypatch.setattr(time_embedding, "sinusoidal_embedding", flipped)
    """)
    pytester.makepyfile("""
        def test_embedding(parity_run, assert_parity):
            assert_parity(parity_run("time_embedding"))
    """)
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*parity explain (advice): t0/timesteps_proj: matches the reference with the 2 "
                                 "chunks of the last axis in order (1, 0)*[chunk_order]*"])
