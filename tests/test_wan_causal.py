"""``wan_causal``: SkyReels-V2 diffusion forcing, one pass and chunk by chunk with a key/value cache.

Parity in both precisions, the cache semantics the reference defines (each with a fault twin), and the faults of
a port's cached path, each failing at its layer (monkeypatching our MLX side)."""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_impl import causal as C
from mlx_impl.transformer import WanTransformer
from parity.assertions import explain
from parity.registry import get
from parity.runner import run_component
from parity.vocab import InputError
from reference_runners.pipeline_source import compile_functions

CHUNK = ["q_rope", "k_cache", "attn", "cross_attn"]
HEAD = ["rope/0", "rope/1", "patch_embedding", "condition_embedder/main/timesteps_proj",
        "condition_embedder/main/time_embedder", "condition_embedder/main/time_proj",
        "condition_embedder/main/text_embedder", "tokens"]
TAIL = ["norm_out", "norm_out/modulated", "proj_out", "unpatchify"]


def _run(dtype="float32", **overrides):
    return run_component("wan_causal", dtype, out_dir=None, overrides=overrides or None)


def _section(result, name):
    (found,) = [s for s in result.sections if s.name == name]
    return found


def chunk_layers(chunks=3, blocks=2):
    return [f"chunk{c}/{layer}" for c in range(chunks)
            for layer in [f"blocks.{i}/{n}" for i in range(blocks) for n in CHUNK] + ["output"]]


# --- parity ------------------------------------------------------------------------------------------
def test_float32_parity_one_pass_cached_and_self_consistent():
    result = _run()
    assert result.verdict == "PASS", explain(result)
    names = [l.name for l in result.layers if not l.name.startswith("call2/")]
    assert names[:len(HEAD)] == HEAD and names[-len(chunk_layers()):] == chunk_layers()
    assert names[-len(chunk_layers()) - len(TAIL):-len(chunk_layers())] == TAIL
    assert {s.name: s.passed for s in result.sections} == {"one_pass": True, "cached": True,
                                                           "self_consistency": True, "invariance": True}
    assert result.layer("chunk1/blocks.0/k_cache").shape_ref == (1, 16, 2, 18)  # chunk 0's and its own 2 frames x 4 tokens
    assert result.layer("call2/chunk2/output").verdict == "PASS"  # the second call starts from an empty cache


def test_bfloat16_parity_within_the_precision_budget():
    result = _run("bfloat16")
    assert result.verdict == "PASS", explain(result)
    assert _section(result, "cached").passed and not any(l.name.startswith("call2/") for l in result.layers)
    assert _section(result, "self_consistency").passed is None  # judged in float32 only


def test_each_chunk_of_the_step_cache_equals_the_frames_of_the_one_pass():
    """cache_from step: every pass is a prefix of the last one, so chunk c's output is frames [2c, 2c + 2) of the
    one-pass output, on the reference's side and ours."""
    result = _run(cache_from="step")
    assert result.verdict == "PASS", explain(result)
    ref, mlx = result.context.ref, result.context.mlx
    for c in range(3):
        assert np.allclose(ref[f"chunk{c}/output"], ref["unpatchify"][:, :, 2 * c:2 * c + 2], atol=1e-6)
        assert np.allclose(mlx[f"chunk{c}/output"], mlx["unpatchify"][:, 2 * c:2 * c + 2], atol=1e-6)


def test_bad_configs_are_named():
    with pytest.raises(InputError, match="num_frame_per_block 1: diffusers builds no causal mask"):
        _run(transformer={"num_frame_per_block": 1}, chunks=[1] * 6)
    with pytest.raises(InputError, match=r"chunks \[2, 3\]: expected whole causal blocks"):
        _run(chunks=[2, 3])
    with pytest.raises(InputError, match="window 1: expected at least one causal block"):
        _run(window=1)


# --- what the reference defines about the cache ------------------------------------------------------
def test_the_pipeline_feeds_a_finished_block_clean_at_t0_beside_the_next():
    """diffusers' diffusion-forcing schedule (its own source): once block 0 is done it is no longer updated but
    stays in the model's input at timestep 0 while block 1 is denoised: a cache of it holds its clean keys/values."""
    pipeline = compile_functions("diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing", (),
                                 {"SkyReelsV2DiffusionForcingPipeline": ["generate_timestep_matrix"]},
                                 {"torch": torch, "math": math})
    steps, _, update, intervals = pipeline.generate_timestep_matrix(
        None, 6, torch.tensor([999, 666, 333]), 6, ar_step=3, causal_block_size=2)
    finished = [i for i in range(len(steps)) if steps[i, 0] == 0 and not update[i, 0]]
    assert finished and all(intervals[i][0] == 0 and update[i, 2] and steps[i, 2] > 0 for i in finished[:1])


def _forward_appending(forward):
    def appending(self, latents, timesteps, prompt, start, mask=None, cache=None, append=False):
        return forward(self, latents, timesteps, prompt, start, mask, cache, cache is not None)
    return appending


def test_fault_cache_filled_from_the_noisy_step(monkeypatch):
    monkeypatch.setattr(C.CausalWanTransformer, "forward", _forward_appending(C.CausalWanTransformer.forward))
    monkeypatch.setattr(C.CausalWanTransformer, "commit", lambda *args: None)
    result = _run()
    assert result.verdict == "FAIL" and result.first_divergence == "chunk1/blocks.0/k_cache", explain(result)
    assert result.layer("blocks.1/residual3").verdict == "PASS"  # the one pass is right


def test_fault_cache_filled_at_the_steps_timestep(monkeypatch):
    """The clean latents, but at the chunk's last step's timestep instead of t = 0."""
    def commit(self, cache, prompt, clean, start):
        self.forward(clean, mx.full(clean.shape[:2], 500.0), prompt, start, cache=cache, append=True)
    monkeypatch.setattr(C.CausalWanTransformer, "commit", commit)
    result = _run()
    assert result.verdict == "FAIL" and result.first_divergence == "chunk1/blocks.0/k_cache", explain(result)


def test_a_window_evicts_the_oldest_block_and_positions_count_from_the_start():
    result = _run(window=2)
    assert result.verdict == "PASS", explain(result)
    assert result.layer("chunk2/blocks.0/k_cache").shape_mlx == (1, 16, 2, 18)  # chunk 1's frames and its own


def test_fault_window_evicts_the_newest_block(monkeypatch):
    def evict(self):
        while self.window is not None and len(self.frames()) > self.window:
            self.entries.pop()
    monkeypatch.setattr(C.LayerCache, "evict", evict)
    result = _run(window=2)
    assert result.verdict == "FAIL" and result.first_divergence == "chunk2/blocks.0/k_cache", explain(result)


def test_fault_positions_recounted_from_the_window(monkeypatch):
    def rope(self, grid, start=0, rope=C.CausalWanTransformer.rope):
        return rope(self, grid, min(start, 2))  # the window's first frame taken as position 0
    monkeypatch.setattr(C.CausalWanTransformer, "rope", rope)
    result = _run(window=2)
    assert result.verdict == "FAIL" and result.first_divergence == "chunk2/blocks.0/q_rope", explain(result)


# --- faults of a cached path ----------------------------------------------------------------------------
def test_fault_rope_without_the_start_frame_offset(monkeypatch):
    monkeypatch.setattr(C.CausalWanTransformer, "rope", lambda self, grid, start=0: WanTransformer.rope(self, grid))
    result = _run()
    assert result.verdict == "FAIL" and result.first_divergence == "chunk1/blocks.0/q_rope", explain(result)
    assert result.layer("chunk0/blocks.0/q_rope").verdict == "PASS"
    assert _section(result, "self_consistency").failing == "self_consistency/chunk1/blocks.0/q_rope"


def test_fault_causal_mask_aligned_top_left(monkeypatch):
    """Queries (2 frames) shorter than keys (4): the chunk sees the cache but not itself."""
    monkeypatch.setattr(C, "block_causal", lambda q, k, block: np.arange(len(k))[None] // block
                        <= np.arange(len(q))[:, None] // block)
    result = _run()
    assert result.verdict == "FAIL" and result.first_divergence == "chunk1/blocks.0/attn", explain(result)
    assert result.layer("chunk1/blocks.0/k_cache").verdict == "PASS"


def test_fault_cache_appended_twice(monkeypatch):
    append = C.LayerCache.append
    monkeypatch.setattr(C.LayerCache, "append", lambda self, f, k, v: (append(self, f, k, v), append(self, f, k, v)))
    result = _run()
    assert result.verdict == "FAIL" and result.first_divergence == "chunk1/blocks.0/k_cache", explain(result)


def test_fault_cross_attention_cache_rebuilt_from_the_wrong_prompt(monkeypatch):
    """From chunk 1 on the cross-attention keys/values come from the empty prompt."""
    forward = C.CausalWanTransformer.forward

    def rebuilt(self, latents, timesteps, prompt, start, mask=None, cache=None, append=False):
        if start and not getattr(prompt, "rebuilt", False):
            prompt.tokens, prompt.kv, prompt.rebuilt = self.embed_text(mx.zeros((1, 7, 24))), {}, True
        return forward(self, latents, timesteps, prompt, start, mask, cache, append)
    monkeypatch.setattr(C.CausalWanTransformer, "forward", rebuilt)
    result = _run()
    assert result.verdict == "FAIL" and result.first_divergence == "chunk1/blocks.0/cross_attn", explain(result)
    assert result.layer("chunk1/blocks.0/attn").verdict == "PASS"


def test_fault_cache_window_off_by_one_frame(monkeypatch):
    """A window of 3 frames holds one 2-frame block; keeping 4 shows at chunk 2, the first past the window."""
    def evict(self):
        while self.window is not None and len(self.frames()) > self.window + 1:
            self.entries.pop(0)
    monkeypatch.setattr(C.LayerCache, "evict", evict)
    result = _run(window=3)
    assert result.verdict == "FAIL" and result.first_divergence == "chunk2/blocks.0/k_cache", explain(result)
    assert result.layer("chunk1/output").verdict == "PASS"


def test_fault_one_pass_mask_causal_per_frame(monkeypatch):
    """(a)'s twin: frames of one causal block no longer see each other in the one pass."""
    monkeypatch.setattr(C, "one_pass_mask", lambda frames, block, chunks, window=None: np.tri(frames, dtype=bool))
    result = _run()
    assert result.verdict == "FAIL" and result.first_divergence == "blocks.0/attn1/attention", explain(result)
    assert _section(result, "one_pass").failing == "blocks.0/attn1/attention"


def test_fault_chunk_attends_to_all_its_frames_fails_the_chunk_plans(monkeypatch):
    """The invariance check's twin: a chunk of several causal blocks ignores causality inside it. One block per
    chunk (the default run) cannot show it; one chunk of every frame, the first chunk plan, does."""
    monkeypatch.setattr(C.SelfAttention, "chunk_mask", staticmethod(lambda frames, cached: None))
    result = _run()
    assert all(l.verdict == "PASS" for l in result.layers)
    assert result.verdict == "FAIL" and result.first_divergence == "invariance/cached/blocks.0/attn", explain(result)


def test_fault_cache_kept_on_the_model_fails_the_second_call(monkeypatch):
    """One cache per model instead of per call: the first call passes, the second attends to its leftovers."""
    caches = {}
    make = C.KVCache.__init__

    def per_model(self, window, block):
        make(self, window, block)
        self.layers = caches.setdefault("layers", {})
    monkeypatch.setattr(C.KVCache, "__init__", per_model)
    result = _run()
    assert result.verdict == "FAIL" and result.first_divergence == "call2/chunk0/blocks.0/k_cache", explain(result)


def test_a_rollout_starts_from_an_empty_cache_every_call():
    component = get("wan_causal")
    config = component.load_config()
    reference = component.build_reference(config, 0)
    model = component.build_mlx(config, component.reference_weights(reference), "float32").model
    inputs = component.make_inputs(config, 0)
    args = [mx.array(np.moveaxis(inputs["latents"], 1, -1)), mx.array(inputs["timestep"]), mx.array(inputs["text"]),
            config.chunks]
    assert np.array_equal(np.array(model.rollout(*args)), np.array(model.rollout(*args)))
