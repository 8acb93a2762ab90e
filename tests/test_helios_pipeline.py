"""Helios multi-chunk generation against the real diffusers HeliosPyramidPipeline, and its faults.

Every comparison goes through the harness (``parity.runner.run_component("helios_pipeline")``):
``HeliosPyramidPipeline.__call__`` from the installed source on a tiny real ``HeliosTransformer3DModel``,
``HeliosDMDScheduler`` and ``AutoencoderKLWan``, against :class:`mlx_impl.helios_pipeline.HeliosPipeline`.
Faults are injected into the MLX side by monkeypatching; each must FAIL at the named first layer, and
teacher forcing (each chunk of ours run on the reference's history) must tell a chunk's own error from
the one it inherits through the history. Layer lists are asserted on the first call (``call2/`` is the second's).
"""
import html
import inspect

import mlx.core as mx
import numpy as np
import pytest

from mlx_impl import scheduler as sched
from mlx_impl.helios_pipeline import HeliosPipeline
from parity import video
from parity.components.helios_pipeline import HeliosPipelineComponent
from parity.config import ConfigError
from parity.html_report import render_report
from parity.runner import run_component
from reference_runners import helios_pipeline as R
from reference_runners.pipeline_source import source_path

CHUNKS, STAGES, STEPS = 3, 3, 2


def run(dtype="float32", **overrides):
    return run_component("helios_pipeline", dtype, out_dir=None, overrides=overrides)


def first_call(result):
    return [layer for layer in result.layers if not layer.name.startswith("call2/")]


def sections(result):
    return {section.name: section for section in result.sections}


def layer_names(chunks=CHUNKS, steps=(STEPS,) * STAGES, amplified=False):
    """The first call's layers; ``amplified``: the first chunk runs twice the steps per stage."""
    names = []
    for c in range(chunks):
        for s, n in enumerate(steps):
            n *= 2 if amplified and c == 0 else 1
            names += [f"chunk{c}/stage{s}/timesteps", f"chunk{c}/stage{s}/sigmas"]
            if s == 0:
                names += [f"chunk{c}/history/{t}" for t in ("long", "mid", "short")] + [f"chunk{c}/stage0/downsample"]
            else:
                names += [f"chunk{c}/stage{s}/transition"]
            names += [f"chunk{c}/stage{s}/step{k}" for k in range(n)]
        names += [f"chunk{c}/latents", f"chunk{c}/frames"]
    return names + ["video"]


def tf_rows(result):
    """Teacher forcing per chunk: (free-running, teacher-forced) verdicts."""
    return [tuple(row[1:3]) for row in sections(result)["teacher_forcing_chunks"].data["rows"]]


# --- parity ----------------------------------------------------------------------------------------
def test_float32_matches_the_pipeline(tmp_path):
    result = run_component("helios_pipeline", "float32", out_dir=tmp_path, keep_tensors="all")
    assert result.verdict == "PASS", result.first_divergence
    assert [layer.name for layer in first_call(result)] == layer_names()
    assert result.layer("call2/video").verdict == "PASS"
    ref = result.context.ref
    # chunk 0 sees zeros; chunk 1 sees chunk 0's latents as its newest history (the 1x term) and mid term
    assert not np.any(ref["chunk0/history/long"]) and not np.any(ref["chunk0/history/short"])
    np.testing.assert_array_equal(ref["chunk1/history/short"][:, 1:], ref["chunk0/latents"][:, -1:])
    np.testing.assert_array_equal(ref["chunk1/history/short"][:, :1], ref["chunk0/latents"][:, :1])  # the prefix
    assert ref.shapes["video"] == (1, 3, 13, 64, 64)  # 3 chunks x 5 frames, trimmed to 1 + 4k
    found = sections(result)
    assert tf_rows(result) == [("PASS", "PASS")] * CHUNKS and found["teacher_forcing"].passed is True
    assert found["chunks"].data["x"] == [f"chunk{c}" for c in range(CHUNKS)]
    assert found["chunks"].note.startswith("From the first chunk to the last: relative error (latents)")
    seams = found["seams"].data["rows"]
    assert [row[0] for row in seams] == ["video (pixel space)"]
    assert seams[0][1] == pytest.approx(seams[0][2], rel=1e-3)  # mean jump at seams / inside: ours as the reference's
    assert {"periodicity", "frame_stats"} <= set(found)
    page = render_report(result.report_dir)
    for section in found.values():
        assert html.escape(section.title) in page
    # the decoded video is written for `parity video`: seams at 5 and 10
    run_dir = result.report_dir
    loaded = [video.load(run_dir / side / "video.npy").frames for side in ("ref", "mlx")]
    assert loaded[0].shape[0] == 13 and video.chunk_boundaries(13, 5) == [0, 5, 10]


def test_bfloat16_within_precision_budget():
    """The transformer in bf16 (diffusers' bf16 model), the pipeline's latents and the VAE float32 on both sides."""
    result = run("bfloat16")
    assert result.verdict == "PASS", result.first_divergence
    dtypes = {layer.name: (layer.dtype_ref, layer.dtype_mlx) for layer in result.layers}
    assert dtypes["chunk1/history/mid"] == dtypes["chunk1/latents"] == ("bfloat16", "bfloat16")
    assert dtypes["chunk1/frames"] == dtypes["video"] == ("float32", "float32")
    assert all(ref == mlx for ref, mlx in dtypes.values())
    ratios = [layer.metrics["budget_ratio"] for layer in result.layers if layer.metrics.get("budget_ratio") is not None]
    assert len(ratios) >= 30 and max(ratios) <= 2
    assert tf_rows(result) == [("PASS", "PASS")] * CHUNKS
    assert "budget ratio (latents)" in sections(result)["chunks"].data["series"]


@pytest.mark.parametrize("cell", HeliosPipelineComponent.coverage)
def test_coverage_cells(cell):
    """One chunk (history all zeros); one step per stage with the amplified first chunk."""
    result = run(**cell)
    assert result.verdict == "PASS", result.first_divergence
    assert [layer.name for layer in first_call(result)] == layer_names(
        cell.get("chunks", CHUNKS), cell.get("steps", (STEPS,) * STAGES), cell.get("is_amplify_first_chunk", False))


# --- faults ----------------------------------------------------------------------------------------
def test_fault_history_one_chunk_late(monkeypatch):
    """Each chunk gets the history window the chunk before it saw (the newest chunk not yet appended): chunk 0 is
    right, chunk 1 fails at the first history term holding chunk 0's latents (mid; long is zeros on both sides).
    Teacher-forced on the reference's history every chunk passes: the error is the hand-over's, inherited."""
    correct, seen = HeliosPipeline.window, {}

    def stale(self, history):
        window = seen.get("window", correct(self, history))
        seen["window"] = correct(self, history)
        return window

    monkeypatch.setattr(HeliosPipeline, "window", stale)
    result = run(teacher_forcing=True)
    assert result.verdict == "FAIL" and result.first_divergence == "chunk1/history/mid"
    assert all(layer.verdict == "PASS" for layer in result.layers if layer.name.startswith("chunk0/"))
    assert result.layer("chunk1/history/long").verdict == "PASS"
    assert result.layer("chunk2/latents").verdict == "FAIL"
    assert tf_rows(result) == [("PASS", "PASS"), ("FAIL", "PASS"), ("FAIL", "PASS")]
    assert sections(result)["teacher_forcing"].data["first_free_running"] == "chunk1"
    assert result.comparison.culprit is None


def test_fault_dmd_start_normalised_per_channel(monkeypatch):
    """A real port's bug (later reverted): each stage's re-noised start point normalised per channel. Every chunk
    fails at its first stage transition, teacher-forced too: chunk 0 is the culprit."""
    correct = sched.stage_transition

    def normalised(*args, **kwargs):
        x = correct(*args, **kwargs)
        axes = (0, 1, 2, 3)
        return (x - x.mean(axis=axes, keepdims=True)) / mx.sqrt(x.var(axis=axes, keepdims=True))

    monkeypatch.setattr(sched, "stage_transition", normalised)
    result = run()
    assert result.verdict == "FAIL" and result.first_divergence == "chunk0/stage1/transition"
    assert result.layer("chunk0/stage0/step1").verdict == "PASS"
    assert tf_rows(result) == [("FAIL", "FAIL")] * CHUNKS
    assert result.comparison.culprit == "chunk0" == sections(result)["teacher_forcing"].culprit


# --- configuration and the reference ---------------------------------------------------------------
@pytest.mark.parametrize("bad,key", [
    ({"steps": [2, 2]}, "one step count per stage"),
    ({"height": 6}, "multiples of 8"),
    ({"transformer": {"in_channels": 8, "out_channels": 8}}, "z_dim"),
    ({"history_sizes": [4, 2]}, "history_sizes"),
    ({"no_such_key": 1}, "no_such_key"),
])
def test_bad_configs_are_input_errors_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        run(**bad)


def test_reference_is_the_installed_pipeline_source():
    """The reference's pipeline is diffusers' own HeliosPyramidPipeline, compiled from the installed source file."""
    cls = R.pipeline_class()
    path = str(source_path(R.PIPELINE_MODULE))
    assert cls.__name__ == "HeliosPyramidPipeline" and cls.__module__ == R.PIPELINE_MODULE
    assert inspect.unwrap(cls.__call__).__code__.co_filename == path == inspect.getsourcefile(cls.sample_block_noise)
