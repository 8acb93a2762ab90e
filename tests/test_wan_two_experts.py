"""Wan2.2 two experts with classifier-free guidance against the real diffusers WanPipeline, and its faults.

Every comparison goes through the harness (``parity.runner.run_component("wan_two_experts")``):
``WanPipeline.__call__`` compiled from the installed source, driving two tiny random
``WanTransformer3DModel``s (``transformer`` / ``transformer_2`` at ``boundary_ratio``), UniPC and
guidance, against :func:`mlx_impl.wan_experts.sample` on two of our MLX Wan transformers. Faults
are injected into the MLX side by monkeypatching; each must FAIL at the named first layer.
Layer lists are asserted on the first call (``call2/`` layers are the second call's).
"""
import html

import numpy as np
import pytest
import torch

from mlx_impl import time_embedding as TE
from mlx_impl import wan_experts as W
from parity.components.wan_two_experts import BATCHED_CFG, WanTwoExpertsComponent
from parity.config import ConfigError
from parity.html_report import render_report
from parity.runner import run_component
from reference_runners import wan_experts as R

#: The fixture's schedule (6 steps, flow shift 5): timesteps 999 961 909 833 714 501; boundary 0.9 -> 900.
SWITCH = 3


def run(dtype="float32", seed=0, component="wan_two_experts", **overrides):
    return run_component(component, dtype, seed=seed, out_dir=None, overrides=overrides)


def first_call(result):
    return [layer for layer in result.layers if not layer.name.startswith("call2/")]


def sections(result):
    return {section.name: section for section in result.sections}


def layer_names(steps=6, cfg=True):
    names = []
    for expert in W.EXPERTS:
        names += [f"{expert}/text_embedding"] + [f"{expert}/negative_text_embedding"] * cfg
    names += ["sigmas", "timesteps"]
    for k in range(steps):
        names += [f"step{k}/expert", f"step{k}/cond/temb", f"step{k}/cond"]
        names += [f"step{k}/uncond/temb", f"step{k}/uncond"] * cfg + [f"step{k}/guided"]
        names += [f"step{k}/corrector"] * (k > 0) + [f"step{k}/predictor", f"step{k}/sample"]
    return names


def experts(result, side="ref"):
    capture = getattr(result.context, side)
    return [int(capture[n][0]) for n in capture.order if n.endswith("/expert") and not n.startswith("call2/")]


def assert_first_divergence(result, layer, still_passing=()):
    assert result.verdict == "FAIL"
    assert result.first_divergence == layer
    for name in still_passing:
        assert result.layer(name).verdict == "PASS", name


# --- parity ----------------------------------------------------------------------------------------
def test_float32_matches_the_pipeline(tmp_path):
    result = run_component("wan_two_experts", "float32", out_dir=tmp_path, keep_tensors="none")
    assert result.verdict == "PASS", result.first_divergence
    assert [layer.name for layer in first_call(result)] == layer_names()
    assert [layer.name for layer in result.layers if layer.name.startswith("call2/")] == \
        ["call2/" + name for name in layer_names()]
    assert experts(result) == experts(result, "mlx") == [W.HIGH] * SWITCH + [W.LOW] * (6 - SWITCH)
    # the experts' weights differ: their embeddings of the same prompt are unrelated
    ref = result.context.ref
    high, low = ref["expert_high/text_embedding"], ref["expert_low/text_embedding"]
    assert np.sqrt(np.mean((high - low) ** 2)) > 0.5 * np.sqrt(np.mean(high ** 2))
    found = sections(result)
    assert found["experts"].passed is True and found["experts"].kind == "table"
    assert found["experts"].title == "Expert switch: high-noise -> low-noise expert at step 3 (t = 833 < boundary 900)"
    assert [row[2:5] for row in found["experts"].data["rows"]] == [["high", "high", 4.0]] * 3 + [["low", "low", 3.0]] * 3
    guidance = found["guidance"]
    assert guidance.kind == "curves" and guidance.data["x"] == [f"step{k}" for k in range(6)]
    np.testing.assert_allclose(guidance.data["series"]["MLX"], guidance.data["series"]["reference"], rtol=1e-4)
    assert min(guidance.data["series"]["reference"]) > 0.01  # the prompts differ: guidance has something to do
    assert found["teacher_forcing"].passed is True and found["drift"].kind == "curves"
    page = render_report(result.report_dir)
    for title in (found["experts"].title, guidance.title, found["drift"].title, found["teacher_forcing"].title):
        assert html.escape(title) in page


def test_bfloat16_within_precision_budget():
    """Experts in bf16 (the predictions and guidance in bf16 on both sides), latents float32 as the pipeline's:
    every layer within 2x the reference's own bf16 error against its float64 run."""
    result = run("bfloat16")
    assert result.verdict == "PASS", result.first_divergence
    dtypes = {layer.name.split("/")[-1]: layer.dtype_ref for layer in result.layers}
    assert dtypes["cond"] == dtypes["uncond"] == dtypes["guided"] == dtypes["text_embedding"] == "bfloat16"
    assert dtypes["temb"] == "bfloat16"  # the time embedder computes in float32, its output is cast back
    assert dtypes["sample"] == dtypes["predictor"] == "float32"
    assert all(layer.dtype_ref == layer.dtype_mlx for layer in result.layers)
    ratios = [l.metrics["budget_ratio"] for l in result.layers if l.metrics.get("budget_ratio") is not None]
    assert len(ratios) >= 30 and max(ratios) <= 2
    assert sections(result)["teacher_forcing"].passed is True


@pytest.mark.parametrize("cell,expected,cfg", [
    ({"boundary_ratio": 0.0}, [W.HIGH] * 6, True),
    ({"boundary_ratio": 1.0}, [W.LOW] * 6, True),
    ({"guidance_scale": 1.0}, [W.HIGH] * SWITCH + [W.LOW] * 3, False),
])
def test_coverage_cells(cell, expected, cfg):
    """One expert only (each of them), and guidance off: ``guidance_scale`` 1 switches the unconditional prediction
    off for the whole loop, also for the low-noise expert whose ``guidance_scale_2`` is 3 (diffusers'
    ``do_classifier_free_guidance`` reads ``guidance_scale`` alone)."""
    assert cell in WanTwoExpertsComponent.coverage
    result = run(**cell)
    assert result.verdict == "PASS", result.first_divergence
    assert [layer.name for layer in first_call(result)] == layer_names(cfg=cfg)
    assert experts(result) == experts(result, "mlx") == expected
    found = sections(result)
    assert found["experts"].title.startswith("No expert switch" if len(set(expected)) == 1 else "Expert switch")
    assert found["guidance"].title == ("Classifier-free guidance: cond - uncond per step" if cfg else
                                       "Classifier-free guidance: off")


def test_boundary_is_compared_in_float32_as_torch_does():
    """diffusers compares an int64 0-d timestep with a Python float boundary: torch promotes both to float32."""
    timesteps = torch.tensor([900, 901, 899])
    for boundary in (900.0, 900.00001, 899.99999, 900.5):
        expected = [W.HIGH if bool(t >= boundary) else W.LOW for t in timesteps]
        assert W.expert_schedule(timesteps.numpy(), boundary) == expected, boundary
    assert W.expert_schedule([900], 900.00001) == [W.HIGH]  # float64 would say LOW


# --- faults ----------------------------------------------------------------------------------------
def test_fault_low_noise_text_embedding_reused_for_the_high_noise_expert(monkeypatch):
    """Catalog bug 9: the prompt embedded once, by the low-noise expert, for both."""
    correct = W.text_contexts
    monkeypatch.setattr(W, "text_contexts", lambda experts, *args: correct([experts[1], experts[1]], *args))
    result = run()
    assert_first_divergence(result, "expert_high/text_embedding", ["expert_low/text_embedding"])
    assert result.layer("step0/cond").verdict == "FAIL"
    assert result.layer(f"step{SWITCH}/cond").verdict == "FAIL"  # inherited: the latents differ by then


def test_fault_time_embedding_kept_in_float32_caught_by_the_dtype_rule(monkeypatch):
    """The experts' time embedding not cast back to the model dtype (diffusers' ``type_as``): more precise than the
    reference, so the predictions stay within the budget; the dtype rule fails it at the first ``temb``."""
    def embed_time(self, timesteps, dtype):
        temb = TE.tap("temb", self.time_embedder(self.sinusoid(timesteps)))  # float32 (time_embedder kept float32)
        return temb, TE.linear(self.time_proj, TE.nn.silu(temb))

    monkeypatch.setattr(TE.TimeTextEmbedding, "embed_time", embed_time)
    result = run("bfloat16")
    assert_first_divergence(result, "step0/cond/temb", ["step0/expert"])
    temb = result.layer("step0/cond/temb")
    assert (temb.dtype_ref, temb.dtype_mlx) == ("bfloat16", "float32")
    assert [f.metric for f in temb.failures] == ["dtype"]


def test_fault_expert_switch_one_step_late(monkeypatch):
    correct = W.expert_schedule
    monkeypatch.setattr(W, "expert_schedule", lambda timesteps, boundary: [W.HIGH] + correct(timesteps, boundary)[:-1])
    result = run()
    assert_first_divergence(result, f"step{SWITCH}/expert", [f"step{SWITCH - 1}/sample"])
    found = sections(result)
    assert found["experts"].passed is False and found["experts"].failing == f"step{SWITCH}/expert"
    assert found["experts"].note.startswith(f"the reference switches at step {SWITCH}, MLX at step {SWITCH + 1}")


def test_fault_guidance_formula_reversed(monkeypatch):
    """``cond + s * (uncond - cond)``: both predictions right, their combination wrong from the first step."""
    monkeypatch.setattr(W, "guide", lambda cond, uncond, scale: cond + scale * (uncond - cond))
    assert_first_divergence(run(), "step0/guided", ["step0/cond", "step0/uncond"])


def test_fault_guidance_scales_swapped(monkeypatch):
    """The high-noise expert guided with guidance_scale_2 (3) instead of guidance_scale (4)."""
    monkeypatch.setattr(W, "guidance_scale", lambda expert, high, low: low if expert == W.HIGH else high)
    assert_first_divergence(run(), "step0/guided", ["step0/cond", "step0/uncond"])


def test_fault_guidance_collapsed_shows_in_the_guidance_section(monkeypatch):
    """The prompt given for the negative prompt too: uncond = cond, so guidance does nothing on our side."""
    correct = W.text_contexts
    monkeypatch.setattr(W, "text_contexts", lambda experts, text, negative, batch: correct(experts, text, text, batch))
    result = run()
    assert_first_divergence(result, "expert_high/negative_text_embedding", ["expert_high/text_embedding"])
    series = sections(result)["guidance"].data["series"]
    assert max(series["MLX"]) == 0 and min(series["reference"]) > 0.01


def test_fault_text_embedding_cached_across_calls(monkeypatch):
    """A port that embeds the prompts at its first call and keeps them: the first call passes, the second (other
    prompts, ``second_inputs``) embeds nothing and fails at the first embedding, then at its first prediction."""
    correct, cache = W.text_contexts, {}

    def cached(experts, *args):
        key = tuple(map(id, experts))
        if key not in cache:
            cache[key] = correct(experts, *args)
        return cache[key]

    monkeypatch.setattr(W, "text_contexts", cached)
    result = run()
    assert all(layer.verdict == "PASS" for layer in first_call(result))
    assert_first_divergence(result, "call2/expert_high/text_embedding")
    assert result.layer("call2/expert_high/text_embedding").reasons == ["missing on the MLX side"]
    assert result.layer("call2/step0/cond").verdict == "FAIL"


# --- a port that batches cond and uncond -----------------------------------------------------------
class BatchedCfg(WanTwoExpertsComponent):
    """Our loop with cond and uncond as one call of batch 2, aligned per half by ``BATCHED_CFG``."""

    name = "wan_two_experts_batched"
    alignment = BATCHED_CFG

    def build_mlx(self, config, weights, dtype):
        model = super().build_mlx(config, weights, dtype)
        model.denoiser.batch_cfg = True
        return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_cfg_port_is_compared_per_half(dtype):
    result = run(dtype, component=BatchedCfg())
    assert result.verdict == "PASS", result.first_divergence
    assert [layer.name for layer in first_call(result)] == layer_names()
    cond, uncond = result.layer("step0/cond"), result.layer("step0/uncond")
    assert (cond.mlx_name, cond.adapter) == ("step0/noise_pred", "split(2, 0, 0)")
    assert (uncond.mlx_name, uncond.adapter) == ("step0/noise_pred", "split(2, 1, 0)")
    assert result.layer("step0/uncond/temb").mlx_name == "step0/noise_pred/temb"
    assert result.context.mlx.shapes["step0/noise_pred"] == (2, 2, 8, 8, 4)
    assert result.layer("expert_low/negative_text_embedding").mlx_name == "expert_low/text_embedding"
    series = sections(result)["guidance"].data["series"]
    np.testing.assert_allclose(series["MLX"], series["reference"], rtol=1e-2)


def test_fault_batched_cfg_port_with_the_halves_swapped(monkeypatch):
    """A batched port that stacks [negative; prompt] while its alignment says [prompt; negative]."""
    correct = W.text_contexts
    monkeypatch.setattr(W, "text_contexts", lambda experts, text, negative, batch: correct(experts, negative, text, batch))
    result = run(component=BatchedCfg())
    assert_first_divergence(result, "expert_high/text_embedding")
    assert result.layer("step0/cond").verdict == "FAIL" and result.layer("step0/uncond").verdict == "FAIL"


# --- configuration and the reference ---------------------------------------------------------------
@pytest.mark.parametrize("bad,key", [
    ({"boundary_ratio": 1.5}, "boundary_ratio"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"transformer": {"in_channels": 12}}, "image-to-video"),
    ({"transformer": {"patch_size": [1, 1, 1]}, "height": 5}, "multiples of 16"),
    ({"height": 5}, "patch size"),
    ({"no_such_key": 1}, "no_such_key"),
])
def test_bad_configs_are_input_errors_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        run(**bad)


def test_reference_is_the_installed_pipeline_source():
    """The reference's pipeline is diffusers' own WanPipeline class, compiled from the installed source file."""
    import inspect

    from reference_runners.pipeline_source import source_path

    cls = R.pipeline_class()
    path = str(source_path(R.PIPELINE_MODULE))
    assert cls.__name__ == "WanPipeline" and cls.__module__ == R.PIPELINE_MODULE
    assert inspect.unwrap(cls.__call__).__code__.co_filename == path == inspect.getsourcefile(cls.check_inputs)
    assert {"transformer_2", "boundary_ratio"} <= set(inspect.signature(cls.__init__).parameters)
