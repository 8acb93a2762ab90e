"""Invariance under chunk plans: the same inputs, chunked differently, must give the same layers.

A component declares its chunk plans (:meth:`~parity.component.Component.chunk_plans`): config overrides that change
only *how* our MLX side splits the computation (chunks of a video, a cache, one shot), never what it computes. In
float32 runs the harness builds our model under each plan with the run's weights, runs it on the run's inputs,
maps each capture to names every plan shares (:meth:`~parity.component.Component.plan_layers`) and judges every
other plan against the first with the layers' float32 limits (:func:`agreement`): the section ``invariance``
names the first disagreeing layer. No reference is needed. Only float32: bf16 rounds a reordered sum differently.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from parity.capture import Capture
from parity.compare import compare
from parity.component import Component, Section
from parity.config import merge, validate
from parity.vocab import InputError

if TYPE_CHECKING:
    from parity.thresholds import Thresholds

NAME = "invariance"


def plans(component: Component, config: Any) -> list[tuple[str, Any]]:
    """``(label, config)`` of each of the component's chunk plans on ``config``; a plan that is no valid config is an input error."""
    found = []
    for overrides in component.chunk_plans(config):
        label = ",".join(f"{k}={v}" for k, v in sorted(overrides.items())).replace(" ", "")
        found.append((label, validate(component.config_model, merge(config.to_dict(), overrides),
                                      {f"{component.name} chunk plan {label}": overrides})))
    return found


def agreement(name: str, title: str, base: Capture, other: Capture, component: Component, thresholds: "Thresholds",
              note: str) -> Section:
    """A section judging ``other`` against ``base`` layer by layer with the component's float32 limits (a layer on
    one side only fails); ``failing``: ``<name>/<first disagreeing layer>``."""
    comparison = compare(component.name, "float32", base, other, thresholds, lineage=component.lineage(), partial=True)
    rows = [[l.name, l.verdict, l.metrics.get("max_abs"), l.limits.get("abs_limit"), "; ".join(l.reasons)]
            for l in comparison.layers]
    first = comparison.first_divergence if comparison.layers else "nothing compared"
    return Section(name, title, "table", {"columns": ["layer", "verdict", "max abs", "limit", "reasons"], "rows": rows},
                   passed=first is None, failing=f"{name}/{first}" if first else None,
                   note=note + (f" First disagreeing layer: {first}." if first else " Every layer agrees."))


def sections(component: Component, config: Any, seed: int, inputs: Mapping[str, np.ndarray],
             weights: dict[str, np.ndarray], hooks: Any, thresholds: "Thresholds") -> list[Section]:
    """The ``invariance`` section of a float32 run: every chunk plan against the first (see the module docstring)."""
    found = plans(component, config)
    if len(found) < 2:
        return []
    captures = []
    for label, plan in found:
        drawn = component.make_inputs(plan, seed)
        if drawn.keys() != inputs.keys() or not all(np.array_equal(drawn[k], inputs[k]) for k in inputs):
            raise InputError(f"{component.name} chunk plan {label} changes the inputs; a plan may only change how "
                             "they are chunked")
        model = component.build_mlx(plan, weights, "float32")
        capture = Capture("mlx")
        with component.mlx_capture(model, capture, hooks):
            component.run_mlx(model, inputs, "float32")
        captures.append((label, component.plan_layers(capture, plan)))
    (base_label, base), others = captures[0], captures[1:]
    return [agreement(NAME if i == 0 else f"{NAME}_{i + 1}", f"Invariance: chunk plan {label} against {base_label}",
                      base, capture, component, thresholds,
                      f"Our MLX side on the same inputs under chunk plan {label}, judged against plan {base_label} "
                      "with the float32 limits.")
            for i, (label, capture) in enumerate(others)]
