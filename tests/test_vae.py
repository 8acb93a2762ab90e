"""Wan VAE encoder parity per block and per chunk, and proof that it fails, localised, on realistic porting faults."""
import mlx.core as mx
import numpy as np
import pytest

from mlx_impl import vae
from parity.registry import get
from parity.runner import run_component
from parity.weights import WeightLoadError

BLOCKS = ["conv_in", *[f"down_blocks.{i}" for i in range(11)],
          "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1", "norm_out", "conv_out"]


def layer_names(chunks):
    """A float32 run's layers: the encoding, then the same again from the second call (``call2/``)."""
    first = [f"chunk{i}/{b}" for i in range(chunks) for b in BLOCKS] + ["quant_conv", "latents"]
    return first + [f"call2/{name}" for name in first]


def chunk_layers(result, chunk):
    return [l for l in result.layers if l.name.startswith(f"chunk{chunk}/")]


@pytest.fixture(scope="module")
def correct():
    return run_component("vae", "float32", out_dir=None)


def test_float32_parity_per_block_and_chunk(correct, tmp_path):
    assert correct.verdict == "PASS", correct.first_divergence
    assert [l.name for l in correct.layers] == layer_names(3)
    assert correct.layer("latents").shape_ref == (1, 4, 3, 4, 4)
    written = run_component("vae", "float32", out_dir=tmp_path)  # the report, sections included, serialises
    assert (written.report_dir / "report.json").exists()


@pytest.mark.parametrize("overrides, latent_shape", [
    ({"frames": 1, "kind": "random"}, (1, 4, 1, 4, 4)),
    ({"frames": 5, "kind": "checker", "height": 19, "width": 27}, (1, 4, 2, 2, 3)),  # odd: floor after the right/bottom pad
    ({"frames": 17, "kind": "gradient", "batch": 2}, (2, 4, 5, 4, 4)),
])
def test_float32_parity_frame_counts_and_sizes(overrides, latent_shape):
    result = run_component("vae", "float32", out_dir=None, overrides=overrides)
    assert result.verdict == "PASS", result.first_divergence
    assert [l.name for l in result.layers] == layer_names(latent_shape[2])
    assert result.layer("latents").shape_ref == latent_shape


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_parity(seed):
    result = run_component("vae", "bfloat16", seed=seed, out_dir=None)
    assert result.verdict == "PASS", result.first_divergence
    assert all("budget_ratio" in l.metrics for l in result.layers)


def test_one_shot_encoding_equals_the_chunked_reference():
    """Causal convs with a 2-frame cache and the first-frame rule of downsample3d make chunking exact."""
    result = run_component("vae", "float32", out_dir=None, overrides={"mlx_encoding": "one_shot"})
    assert result.verdict == "PASS", result.first_divergence
    assert [l.name for l in result.layers] == layer_names(3)


def test_capture_does_not_change_results():
    from parity.capture import Capture
    from parity.capture_mlx import record_taps

    component = get("vae")
    config = component.load_config()
    model = component.build_mlx(config, component.reference_weights(component.build_reference(config, 0)), "float32")
    video = mx.array(component.make_inputs(config, 0)["video"].transpose(0, 2, 3, 4, 1))
    plain = model.encode(video)
    with record_taps(Capture("mlx")):
        recorded = model.encode(video)
    assert mx.array_equal(plain, recorded).item()


# --- fault injection ---------------------------------------------------------------------------

def test_fault_temporal_downsample_order_reversed(monkeypatch):
    """Reading [False, True, True] as [True, True, False] puts time_conv on other blocks: the strict loader stops it."""
    build = vae.WanVAEEncoder.from_config.__func__

    def reversed_order(cls, config, chunked=True):
        return build(cls, {**config, "temperal_downsample": config["temperal_downsample"][::-1]}, chunked)

    monkeypatch.setattr(vae.WanVAEEncoder, "from_config", classmethod(reversed_order))
    with pytest.raises(WeightLoadError, match=r"missing keys \['encoder\.down_blocks\.2\.time_conv\.bias', "
                                              r"'encoder\.down_blocks\.2\.time_conv\.weight'\]; unused keys "
                                              r"\['encoder\.down_blocks\.8\.time_conv\.bias'"):
        run_component("vae", "float32", out_dir=None)


def test_fault_one_shot_like_uncached_diffusers_encoder(monkeypatch):
    """One-shot encoding as diffusers' ``encoder(x)`` without feat_cache: downsample3d skips time_conv."""
    monkeypatch.setattr(vae.Resample, "time_downsample_whole", lambda self, y: y)
    result = run_component("vae", "float32", out_dir=None, overrides={"mlx_encoding": "one_shot"})
    assert result.verdict == "FAIL"
    assert result.first_divergence == "chunk1/down_blocks.5"
    assert all(l.verdict == "PASS" for l in chunk_layers(result, 0))  # a single frame needs no temporal step
    assert result.layer("chunk1/down_blocks.4").verdict == "PASS"


def test_fault_time_conv_on_the_first_chunk(monkeypatch):
    """downsample3d without the first-chunk rule: the lone first frame goes through time_conv with zero padding."""
    correct = vae.Resample.__call__

    def zero_past_on_first_chunk(self, x, cache=None):
        if self.mode == "downsample3d" and cache is not None and cache.get(self) is None:
            n, _, h, w, c = x.shape
            cache.put(self, mx.zeros((n, 2, (h - 2) // 2 + 1, (w - 2) // 2 + 1, c), x.dtype))
        return correct(self, x, cache)

    monkeypatch.setattr(vae.Resample, "__call__", zero_past_on_first_chunk)
    result = run_component("vae", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "chunk0/down_blocks.5"
    assert result.layer("chunk0/down_blocks.4").verdict == "PASS"


def lose_cache(monkeypatch):
    """Cached frames replaced by zeros: every chunk starts from zero causal context."""
    def zeros(self, layer):
        frames = self._frames.get(id(layer))
        return None if frames is None else mx.zeros_like(frames)

    monkeypatch.setattr(vae.FeatureCache, "get", zeros)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_feature_cache_dropped_between_chunks(monkeypatch, dtype):
    lose_cache(monkeypatch)
    result = run_component("vae", dtype, out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "chunk1/conv_in"
    assert all(l.verdict == "PASS" for l in chunk_layers(result, 0))


def test_fault_cache_keeps_one_frame(monkeypatch):
    """CACHE_T = 1 cannot show in chunk 1 (chunk 0 is one frame anyway); chunk 2's first conv misses a frame."""
    monkeypatch.setattr(vae, "CACHE_T", 1)
    result = run_component("vae", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "chunk2/conv_in"
    assert all(l.verdict == "PASS" for chunk in (0, 1) for l in chunk_layers(result, chunk))


def test_fault_causal_padding_on_the_future_side(monkeypatch):
    monkeypatch.setattr(vae, "causal_pad", lambda x, frames: mx.pad(x, [(0, 0), (0, frames), (0, 0), (0, 0), (0, 0)]))
    result = run_component("vae", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "chunk0/conv_in"


def test_boundary_sections_show_the_lost_cache(correct, monkeypatch):
    """Per-chunk error and the error at chunk starts separate a lost cache from the correct port."""
    def read(result):
        sections = {s.name: s for s in result.sections}
        growth = sections["chunk_error"].data["rows"][-1]
        seams = {row[0]: row[-1] for row in sections["seams"].data["rows"]}
        heat = sections["block_chunk_error"].data
        return growth[2], seams["conv_in"], np.array(heat["values"])

    assert {s.name for s in correct.sections} == {"block_chunk_error", "latent_frame_error", "chunk_error",
                                                 "seams", "periodicity", "latent_frame_stats"}
    ok_growth, ok_seam, ok_heat = read(correct)
    lose_cache(monkeypatch)
    bad_growth, bad_seam, bad_heat = read(run_component("vae", "float32", out_dir=None))
    assert bad_growth > 1e4 * ok_growth  # chunk 0 is exact, later chunks are not
    assert bad_seam > 2 * ok_seam  # conv_in: the error sits on the first frames of each chunk
    assert np.allclose(bad_heat[:, 0], ok_heat[:, 0]) and (bad_heat[:, 1:] > 1e4 * ok_heat[:, 1:]).all()


# --- bad input ---------------------------------------------------------------------------------

def test_frame_count_not_one_plus_four_k_is_an_error():
    """diffusers' _encode silently drops frames past the last full chunk; we refuse them instead."""
    import torch

    component = get("vae")
    config = component.load_config()
    reference = component.build_reference(config, seed=0)
    video = torch.from_numpy(component.make_inputs(config.model_copy(update={"frames": 7}), seed=0)["video"])
    with torch.no_grad():
        assert torch.equal(reference.encode(video).latent_dist.mode(), reference.encode(video[:, :, :5]).latent_dist.mode())
    with pytest.raises(ValueError, match=r"config key 'frames': expected 1 \+ 4k frames \(1, 5, 9, 13, \.\.\.\), got 7; .* drop the last 2"):
        run_component("vae", "float32", out_dir=None, overrides={"frames": 7})


def test_wrong_channel_count_is_an_error():
    component = get("vae")
    config = component.load_config()
    model = component.build_mlx(config, component.reference_weights(component.build_reference(config, 0)), "float32")
    with pytest.raises(ValueError, match=r"expected a channels-last video \(N, T, H, W, 3\), got shape \(1, 5, 32, 32, 4\)"):
        model.encode(mx.zeros((1, 5, 32, 32, 4)))
    with pytest.raises(ValueError, match=r"expected a channels-last video .* got shape \(1, 3, 5, 32, 32\)"):
        model.encode(mx.zeros((1, 3, 5, 32, 32)))  # channels-first by mistake


def test_real_checkpoint_with_decoder_keys(tmp_path):
    """A full AutoencoderKLWan folder: encoder + quant_conv load strictly, decoder keys are set aside by name."""
    from parity.weights import read_checkpoint

    component = get("vae")
    component.build_reference(component.load_config(), seed=3).save_pretrained(tmp_path)
    assert any(k.startswith("decoder.") for k in read_checkpoint(tmp_path))
    result = run_component("vae", "float32", out_dir=None, weights_path=tmp_path, config_path=tmp_path)
    assert result.verdict == "PASS", result.first_divergence


def test_checkpoint_missing_an_encoder_key_fails_loudly(tmp_path):
    from safetensors.torch import save_file

    component = get("vae")
    state = component.build_reference(component.load_config(), seed=0).state_dict()
    del state["encoder.mid_block.attentions.0.proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(WeightLoadError, match=r"missing keys \['encoder\.mid_block\.attentions\.0\.proj\.weight'\]"):
        run_component("vae", "float32", out_dir=None, weights_path=tmp_path / "vae.safetensors")


def test_mlx_strict_loader_names_missing_and_stray_keys():
    component = get("vae")
    config = component.load_config()
    weights = component.reference_weights(component.build_reference(config, 0))
    missing = {k: v for k, v in weights.items() if k != "quant_conv.bias"}
    with pytest.raises(WeightLoadError, match=r"missing keys \['quant_conv\.bias'\]; unused keys none"):
        component.build_mlx(config, missing, "float32")
    stray = {**weights, "encoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(WeightLoadError, match=r"missing keys none; unused keys \['encoder\.extra\.weight'\]"):
        component.build_mlx(config, stray, "float32")
