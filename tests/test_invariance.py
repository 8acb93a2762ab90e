"""Invariance under chunk plans (:mod:`parity.invariance`): our MLX side on the same inputs, chunked two ways.

The VAE encoder's plans are the reference's chunking (1 + 4 + 4 frames, feature cache) and one shot over the
video: a bug on the one-shot path only passes the default run (which encodes in chunks) and fails the check,
which names the first disagreeing layer."""
from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_impl import vae
from parity import invariance, registry
from parity.components.vae import COMPONENT as VAE
from parity.runner import run_component
from parity.vocab import InputError


def _section(result):
    (found,) = [s for s in result.sections if s.name == "invariance"]
    return found


def test_the_vae_agrees_with_itself_chunked_and_in_one_shot():
    result = run_component("vae", "float32", out_dir=None)
    assert result.verdict == "PASS"
    section = _section(result)
    assert section.passed and section.title == "Invariance: chunk plan mlx_encoding=one_shot against mlx_encoding=chunked"
    assert {row[0] for row in section.data["rows"]} >= {"chunk0/conv_in", "chunk2/down_blocks.5", "latents"}


def test_fault_one_shot_downsampling_context_off_by_one_frame(monkeypatch):
    """One shot, ``time_conv`` runs over frames 1.. instead of 0..: chunk 1 (the first whose frames it mixes) gets
    one latent frame short at the temporal downsample ``down_blocks.5``."""
    def whole(self, y):
        return y if y.shape[1] == 1 else mx.concatenate([y[:, :1], self.time_conv(y[:, 1:])], axis=1)
    monkeypatch.setattr(vae.Resample, "time_downsample_whole", whole)
    result = run_component("vae", "float32", out_dir=None)
    assert all(l.verdict == "PASS" for l in result.layers)  # the default run encodes in chunks
    assert result.verdict == "FAIL" and result.first_divergence == "invariance/chunk1/down_blocks.5"
    assert "shape mismatch" in next(row[4] for row in _section(result).data["rows"] if row[1] == "FAIL")


def test_a_plan_that_changes_the_inputs_is_an_input_error(monkeypatch):
    monkeypatch.setattr(type(VAE), "chunk_plans", lambda self, config: ({}, {"frames": 5}))
    with pytest.raises(InputError, match="chunk plan frames=5 changes the inputs"):
        run_component("vae", "float32", out_dir=None)


def test_every_declared_plan_is_a_valid_config_and_bf16_runs_none():
    for name in registry.available():
        component = registry.get(name)
        invariance.plans(component, component.load_config())  # raises on a bad plan
    assert not any(s.name == "invariance" for s in run_component("vae", "bfloat16", out_dir=None).sections)
