"""The second call: the same MLX model object called again on other inputs, judged as ``call2/...``.

Each fault keeps state between calls, the way real ports do (a result memoised on the module, a
feature cache that lives on the model): one call passes, the second names the stale layer.
"""
from __future__ import annotations

from mlx_impl import time_embedding, vae
from parity.components.time_embedding import COMPONENT as TIME_EMBEDDING
from parity.components.vae import COMPONENT as VAE
from parity.runner import run_component


def _run(component, monkeypatch, second_call: bool):
    monkeypatch.setattr(type(component), "second_call", second_call)
    return run_component(component, "float32", out_dir=None)


def test_a_clean_run_passes_both_calls_and_names_the_second_calls_layers(monkeypatch):
    result = _run(TIME_EMBEDDING, monkeypatch, True)
    assert result.verdict == "PASS"
    first = [l.name for l in result.layers if not l.name.startswith("call2/")]
    assert [l.name for l in result.layers] == first + [f"call2/{name}" for name in first]


def test_an_embedding_memoised_at_the_first_call_fails_at_the_second(monkeypatch):
    """The time MLP caches its output per input shape (the t=0 call has its own shape, so the
    first call is right); the second call's timesteps differ, its embedding is stale."""
    forward, memo = time_embedding.TimestepEmbedding.__call__, {}

    def memoised(self, x):
        return memo.setdefault((id(self), x.shape), forward(self, x))
    monkeypatch.setattr(time_embedding.TimestepEmbedding, "__call__", memoised)

    assert _run(TIME_EMBEDDING, monkeypatch, False).verdict == "PASS"  # one call cannot see it
    memo.clear()
    result = _run(TIME_EMBEDDING, monkeypatch, True)
    assert result.verdict == "FAIL" and result.first_divergence == "call2/main/time_embedder"
    assert result.layer("call2/main/timesteps_proj").verdict == "PASS"  # the sinusoid is computed anew


def test_a_feature_cache_kept_on_the_model_fails_at_the_second_encode(monkeypatch):
    """The causal convolutions' past frames must start empty at every encode."""
    shared = vae.FeatureCache()
    monkeypatch.setattr(vae, "FeatureCache", lambda: shared)

    assert _run(VAE, monkeypatch, False).verdict == "PASS"
    shared.__init__()
    result = _run(VAE, monkeypatch, True)
    assert result.verdict == "FAIL" and result.first_divergence == "call2/chunk0/conv_in"


def test_a_crash_in_the_second_call_names_it(monkeypatch):
    calls = []
    embed_text = time_embedding.TimeTextEmbedding.embed_text

    def second_time_fails(self, text):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("text cache already consumed")
        return embed_text(self, text)
    monkeypatch.setattr(time_embedding.TimeTextEmbedding, "embed_text", second_time_fails)
    result = _run(TIME_EMBEDDING, monkeypatch, True)
    assert result.verdict == "FAIL" and result.first_divergence == "call2/main/text_embedder"
    assert "MLX crashed after call2/main/time_proj" in result.layer("call2/main/text_embedder").reasons[0]
    assert [c["after"] for c in result.report["crashes"]] == ["call2/main/time_proj"]


def test_the_second_call_runs_in_float32_only():
    result = run_component(TIME_EMBEDDING, "bfloat16", out_dir=None)
    assert not any(l.name.startswith("call2/") for l in result.layers)
