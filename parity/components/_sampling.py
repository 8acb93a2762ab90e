"""What the sampler components share (Helios DMD scheduler, UniPC): schedule vs solver math, and their sections.

A sampler's layers are of two kinds: the **schedule** (timesteps, sigmas, and what they are built
from: host-side arrays, the same in every model dtype) and the **solver math** (the latents each
step produces). A port can get one right and the other wrong, and a port may follow another
*convention* of the schedule than diffusers' (Wan's original code: :mod:`reference_runners.unipc`).
Two config keys keep them apart:

- ``reference_schedule``: what the schedule layers are judged against: a named convention
  (``"diffusers"``; for UniPC also ``"original"``), or ``"port"``: the reference runs the port's
  own schedule, so the schedule is not judged (its layers are equal by construction);
- ``schedule_forcing`` (teacher forcing of the schedule): the reference's solver runs on the
  port's own schedule (an input of the reference: :meth:`port_schedule` of the component), so
  the step layers judge the solver math alone. Off, the reference runs its convention's schedule
  throughout and a schedule difference also fails every step.

The verdict stays in the layers: a schedule that differs from ``reference_schedule`` fails at its
first schedule layer, and a wrong solver at its step. The sections say what that means:
:func:`schedule_section` compares the port's schedule with every named convention ("schedule
differs: convention 'original'", and how far it is from the judged one), :func:`solver_section`
reads the verdict of the step layers from the comparison (never re-judging them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from parity import teacher_forcing
from parity.alignment import Alignment, Exclusion, merged
from parity.capture import Capture
from parity.compare import EXCLUDED, FAIL, PASS, LayerResult, compare
from parity.component import RunContext, Section
from parity.metrics import rmse_and_rms, tensor_metrics
from parity.vocab import fmt

OTHER = "judged in another comparison of this run"


@dataclass
class Sampler:
    """Our side of a sampler component: the MLX scheduler, the denoiser and the component's config."""

    scheduler: Any
    denoiser: Any
    config: Any


def zero_flow(latents: Any, timestep: int) -> Any:
    """A denoiser predicting no flow: runs a port's sampling loop for its schedule alone (:meth:`port_schedule`)."""
    import mlx.core as mx

    return mx.zeros_like(latents)


def judge_subset(run: RunContext, ref: Capture, mlx: Capture, names: Sequence[str], dtype: str,
                 truth: Capture | None = None) -> list[LayerResult]:
    """The verdicts of layers ``names`` of two captures (the one verdict, :func:`parity.compare.compare`);
    every other layer of either side is left out."""
    others = tuple(Exclusion(name, OTHER, side) for side, capture in (("ref", ref), ("mlx", mlx))
                   for name in capture.order if name not in names)
    alignment = merged(run.component.aligned(), Alignment((), others))
    comparison = compare(run.component.name, dtype, ref, mlx, run.thresholds, alignment, truth,
                         lineage=run.component.lineage(), partial=True)
    return [layer for layer in comparison.layers if layer.verdict != EXCLUDED]


def _distance(layers: Sequence[LayerResult]) -> str:
    """How far the port's schedule is from a reference schedule: each differing layer's max abs."""
    differing = [l for l in layers if l.metrics.get("max_abs") != 0.0]
    if not differing:
        return "identical"
    shown = [f"{l.name} {fmt(l.metrics['max_abs'])}" if l.metrics.get("max_abs") is not None else
             f"{l.name} ({'; '.join(l.reasons)})" for l in differing[:3]]
    return "max abs " + ", ".join(shown) + (f", ... ({len(differing)} layers)" if len(differing) > 3 else "")


def schedule_section(run: RunContext, names: Sequence[str], chosen: str, others: Mapping[str, Capture]) -> Section:
    """The port's schedule against the judged convention ``chosen`` (the comparison's verdicts of layers
    ``names``) and against each of ``others`` (convention -> its reference schedule), judged with the float32
    limits (schedules are host-side arrays, the same in every model dtype)."""
    judged = [l for l in run.comparison.layers if l.name in names]
    results = {c: judge_subset(run, capture, run.mlx, names, "float32") for c, capture in others.items()}
    matching = [c for c, layers in results.items() if all(l.verdict == PASS for l in layers)]
    rows = []
    if chosen != "port":
        rows += [[f"{chosen} (reference_schedule)", l.name, l.verdict, l.metrics.get("max_abs"), "; ".join(l.reasons)]
                 for l in judged]
    for convention, layers in results.items():
        rows += [[convention, l.name, "same" if l.verdict == PASS else "differs", l.metrics.get("max_abs"),
                  "; ".join(l.reasons)] for l in layers]
    distances = "; ".join(f"from '{c}': {_distance(layers)}" for c, layers in results.items())
    if chosen == "port":
        passed, failing = None, None
        title = "Schedule: not judged (reference_schedule = 'port')"
        note = ("The reference runs the port's own schedule, so only the solver math is judged. "
                + (f"The port's schedule is convention '{matching[0]}'. " if matching else
                   "The port's schedule is none of the named conventions. ") + f"Distance {distances}.")
    else:
        failed = [l for l in judged if l.verdict == FAIL]
        passed, failing = not failed, failed[0].name if failed else None
        title = f"Schedule vs convention '{chosen}'"
        if passed:
            note = f"schedule = convention '{chosen}'." + (f" Other conventions differ {distances}." if results else "")
        elif not others:
            note = f"schedule differs from convention '{chosen}' ({_distance(judged)})."
        else:
            which = f"convention '{matching[0]}'" if matching else f"none of the named conventions ({', '.join(others)})"
            note = f"schedule differs: {which}, not '{chosen}' (from '{chosen}': {_distance(judged)}; {distances})."
    return Section("schedule", title, "table",
                   {"columns": ["convention", "layer", "verdict", "max abs", "why"], "rows": rows},
                   passed=passed, failing=failing, note=note)


def solver_section(run: RunContext, names: Sequence[str], forcing: bool, chosen: str) -> Section:
    """The verdict of the solver-math layers (all but the schedule layers ``names``), read from the comparison."""
    layers = [l for l in run.comparison.layers if l.name not in names and l.verdict != EXCLUDED]
    failed = [l for l in layers if l.verdict == FAIL]
    ported = forcing or chosen == "port"
    on = "the port's schedule" if ported else f"the reference's schedule ('{chosen}')"
    how = ("teacher forcing of the schedule: the reference's solver ran on the port's sigmas/timesteps" if ported else
           "schedule_forcing off: the reference ran its own schedule, a schedule difference fails these layers too")
    first = f"; first failing: {failed[0].name} ({'; '.join(failed[0].reasons)})" if failed else ""
    return Section("solver", f"Solver math on {on}", "table",
                   {"columns": ["schedule the solver ran on", "layers", "pass", "first failing"],
                    "rows": [[on, len(layers), len(layers) - len(failed), failed[0].name if failed else None]]},
                   passed=bool(layers) and not failed, failing=failed[0].name if failed else None,
                   note=f"{len(layers) - len(failed)}/{len(layers)} layers pass{first} ({how}).")


def trajectory_section(run: RunContext, labels: Sequence[str], xlabel: str) -> Section:
    """Per trajectory layer, the error of the MLX side against the reference (and in reduced precision both
    sides' against the float64 truth): how it grows along the trajectory. Information only."""
    series: dict[str, list[float]] = {"max abs (MLX vs ref)": [], "rmse (MLX vs ref)": []}
    if run.truth is not None:
        series.update({"rmse (ref vs float64)": [], "rmse (MLX vs float64)": []})
    for name in labels:
        ok = name in run.mlx and run.mlx.shapes[name] == run.ref.shapes[name]
        metrics = tensor_metrics(run.ref[name], run.mlx[name]) if ok else {}
        series["max abs (MLX vs ref)"].append(metrics.get("max_abs", math.nan))
        series["rmse (MLX vs ref)"].append(metrics.get("rmse", math.nan))
        if run.truth is not None:
            series["rmse (ref vs float64)"].append(rmse_and_rms(run.truth[name], run.ref[name])[0])
            series["rmse (MLX vs float64)"].append(rmse_and_rms(run.truth[name], run.mlx[name])[0] if ok else math.nan)
    return Section(
        name="drift", title="Trajectory drift per step", kind="curves",
        data={"x": list(labels), "series": series, "xlabel": xlabel, "ylabel": "error", "log": True},
        note="Information only: each step is judged as a layer; this shows how the error grows along "
             "the trajectory (in bf16 next to the reference's own drift from the float64 run).",
    )


def port_inputs(schedule: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The port's schedule layers as reference inputs (``schedule/<layer>``): teacher forcing of the schedule."""
    return {f"schedule/{name}": np.asarray(value) for name, value in schedule.items()}


def teacher_states(ref: Capture, latents: np.ndarray, steps: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per UniPC step, the reference's state entering it: (latents, last_sample), channels-last.

    The latents entering step k are ``step{k-1}/sample``; ``last_sample`` is the corrected sample of
    step k - 1 (its ``step{k-1}/corrector``, or the latents entering step k - 1 when none ran).
    """
    x = [np.ascontiguousarray(latents.transpose(0, 2, 3, 4, 1))] + [ref[f"step{k}/sample"] for k in range(steps - 1)]
    last = [None] + [ref[f"step{k}/corrector"] if f"step{k}/corrector" in ref else x[k] for k in range(steps - 1)]
    return list(zip(x, last))


def teacher_forced_steps(run: RunContext, reference: Callable[[str, Capture], None], mlx: Callable[[Capture], None],
                         judged: Callable[[str], bool]) -> list[Section]:
    """Teacher forcing per step (:func:`parity.teacher_forcing.sections`): ``reference(dtype, capture)`` and
    ``mlx(capture)`` run the loop again, each step from the reference's state entering it (in bf16 the
    reference also in float64); their layers for which ``judged(name)`` holds are judged as layers are.
    Per step ``step{k}``: the local result is its first failing layer (else its last), the inherited one
    the free-running ``step{k}/sample``."""
    sides = {"ref": Capture("ref"), "truth": Capture("truth") if run.truth is not None else None}
    reference(run.dtype, sides["ref"])
    if sides["truth"] is not None:
        reference("float64", sides["truth"])
    ours = Capture("mlx")
    mlx(ours)
    steps = [name for name in sides["ref"].order if judged(name)]
    forced = judge_subset(run, sides["ref"], ours, steps, run.dtype, sides["truth"])
    free = {layer.name: layer for layer in run.comparison.layers}
    labels = list(dict.fromkeys(layer.name.split("/")[0] for layer in forced))
    local, inherited, diverged = [], [], []
    for label in labels:
        own = [layer for layer in forced if layer.name.startswith(f"{label}/")]
        local.append(next((layer for layer in own if layer.verdict == FAIL), own[-1]))
        inherited.append(free.get(f"{label}/sample"))
        diverged.append(any(free[l.name].verdict == FAIL if l.name in free else True for l in own))
    return teacher_forcing.sections(labels, local, inherited, diverged, run.dtype, "step")
