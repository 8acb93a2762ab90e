"""Every committed baseline is gated by pytest alone: each component in each dtype has one, and
the gate over all of them (``--require-baselines``, the harness's thresholds) passes."""
from __future__ import annotations

from pathlib import Path

from parity import gate, registry, thresholds
from parity.vocab import DTYPES

BASELINES = Path(__file__).resolve().parent.parent / "baselines"


def expected() -> list[str]:
    return sorted(f"{name}-{dtype}.json" for name in registry.available() for dtype in DTYPES)


def test_each_component_has_a_baseline_per_dtype_and_none_is_stale():
    assert sorted(p.name for p in BASELINES.glob("*.json")) == expected()


def test_the_gate_passes_every_committed_baseline(tmp_path):
    result = gate.run_gate(None, DTYPES, thresholds.load(), BASELINES, out=tmp_path, require_baselines=True)
    checked = sorted(Path(o.baseline_path).name for o in result.outcomes if o.baseline_path)
    assert checked == expected()
    assert result.passed, gate.summary(result)
