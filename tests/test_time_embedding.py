"""Time-embedding parity, and proof that it fails, localised, on realistic porting faults."""
import math

import mlx.core as mx
import pytest

from mlx_impl import time_embedding
from parity.runner import run_component


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_parity(seed):
    result = run_component("time_embedding", "float32", seed=seed, out_dir=None)
    assert result.verdict == "PASS", result.first_divergence
    first = ["t0/timesteps_proj", "t0/time_embedder", "t0/time_proj",
             "main/timesteps_proj", "main/time_embedder", "main/time_proj", "main/text_embedder"]
    assert [l.name for l in result.layers] == first + [f"call2/{name}" for name in first]


def test_float32_parity_odd_sizes():
    result = run_component("time_embedding", "float32", out_dir=None,
                           overrides={"timesteps": [1.0, 500.25, 999.0, 3.5, 0.0], "text_len": 5})
    assert result.verdict == "PASS", result.first_divergence


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_parity(seed):
    result = run_component("time_embedding", "bfloat16", seed=seed, out_dir=None)
    assert result.verdict == "PASS", result.first_divergence


def test_t0_embedding_is_the_sinusoid_of_zero():
    emb = time_embedding.sinusoidal_embedding(mx.zeros((1,)), 8)
    assert emb.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]


def test_fault_t0_embedding_taken_as_zeros(monkeypatch):
    model_cls = time_embedding.TimeTextEmbedding

    def zeros_t0(self, dtype):
        sinusoid = time_embedding.tap("timesteps_proj", mx.zeros((1, self.time_freq_dim)))
        temb = time_embedding.tap("time_embedder", self.time_embedder(sinusoid)).astype(dtype)
        return temb, time_embedding.tap("time_proj", self.time_proj(time_embedding.nn.silu(temb)))

    monkeypatch.setattr(model_cls, "history_t0", zeros_t0)
    result = run_component("time_embedding", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "t0/timesteps_proj"


def test_fault_t0_projection_cached_before_weights_loaded(monkeypatch):
    model_cls = time_embedding.TimeTextEmbedding
    init = model_cls.__init__

    def caching_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._t0 = self.embed_time(mx.zeros((1,)), mx.float32)  # with the random initial weights

    def cached_t0(self, dtype):
        time_embedding.tap("timesteps_proj", time_embedding.sinusoidal_embedding(mx.zeros((1,)), self.time_freq_dim))
        temb, proj = self._t0
        time_embedding.tap("time_embedder", temb)
        return temb.astype(dtype), time_embedding.tap("time_proj", proj)

    monkeypatch.setattr(model_cls, "__init__", caching_init)
    monkeypatch.setattr(model_cls, "history_t0", cached_t0)
    result = run_component("time_embedding", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "t0/time_embedder"
    assert result.layer("t0/timesteps_proj").verdict == "PASS"


def test_fault_sin_cos_order_flipped(monkeypatch):
    correct = time_embedding.sinusoidal_embedding

    def flipped(timesteps, dim, max_period=10000.0):
        emb = correct(timesteps, dim, max_period)
        return mx.concatenate([emb[:, dim // 2:], emb[:, :dim // 2]], axis=-1)

    monkeypatch.setattr(time_embedding, "sinusoidal_embedding", flipped)
    result = run_component("time_embedding", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "t0/timesteps_proj"


def test_fault_frequency_shift_shows_only_for_nonzero_timesteps(monkeypatch):
    """downscale_freq_shift=1 instead of 0: invisible at t=0, so the first divergence is the main call."""

    def shifted(timesteps, dim, max_period=10000.0):
        half = dim // 2
        freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / (half - 1))
        angles = timesteps.astype(mx.float32)[:, None] * freqs[None, :]
        return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)

    monkeypatch.setattr(time_embedding, "sinusoidal_embedding", shifted)
    result = run_component("time_embedding", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.layer("t0/timesteps_proj").verdict == "PASS"
    assert result.first_divergence == "main/timesteps_proj"


def test_fault_time_embedder_not_kept_in_float32(monkeypatch):
    """In a bf16 model the time MLP must stay float32; running it in bf16 breaks the precision budget."""
    from parity.components import time_embedding as component_module

    correct = component_module.strict_load
    monkeypatch.setattr(component_module, "strict_load",
                        lambda model, weights, dtype=None, keep_float32=(): correct(model, weights, dtype=dtype))
    result = run_component("time_embedding", "bfloat16", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "t0/time_embedder"
    assert "precision budget" in result.layer("t0/time_embedder").reasons[0]


def test_capture_does_not_change_results():
    from parity.capture import Capture
    from parity.capture_mlx import record_taps
    from parity.registry import get

    component = get("time_embedding")
    config = component.load_config()
    reference = component.build_reference(config, seed=0)
    model = component.build_mlx(config, component.reference_weights(reference), "float32")
    timesteps = mx.array([999.0, 0.0])
    plain = model.embed_time(timesteps, mx.float32)[1]
    with record_taps(Capture("mlx")):
        recorded = model.embed_time(timesteps, mx.float32)[1]
    assert mx.array_equal(plain, recorded).item()


def test_real_diffusers_checkpoint_and_config(tmp_path):
    """`--weights/--config` load a diffusers save_pretrained folder through the strict loader."""
    from parity.registry import get

    component = get("time_embedding")
    component.build_reference(component.load_config(), seed=7).save_pretrained(tmp_path)
    result = run_component("time_embedding", "float32", out_dir=None, weights_path=tmp_path, config_path=tmp_path)
    assert result.verdict == "PASS", result.first_divergence
    assert result.report["weights"] == str(tmp_path)


def test_checkpoint_missing_a_key_fails_loudly(tmp_path):
    from safetensors.torch import save_file

    from parity.registry import get
    from parity.weights import WeightLoadError

    component = get("time_embedding")
    state = component.build_reference(component.load_config(), seed=0).state_dict()
    del state["condition_embedder.time_proj.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"missing keys \['time_proj.bias'\]"):
        run_component("time_embedding", "float32", out_dir=None, weights_path=tmp_path / "model.safetensors")
