"""The catalog of porting mistakes ``parity explain`` knows, one entry each, from specific to generic.

An entry (:class:`Hypothesis`) names a mistake, says it in one line, says what it applies to
(layer name globs, the least tensor rank) and how it is tested: ``test(evidence)`` yields the
candidate tensors the port would hold if it made the mistake (:mod:`parity.explain.evidence`).
Families, by what a test needs:

- ``tensor``: the captured tensors alone (:mod:`.layout`, :mod:`.values`, :mod:`.precision`);
- ``reference``: the reference sublayer re-run on the port's own inputs with one change
  (:mod:`.reference`; the layer must come out of a module or function call);
- ``schedule``: the component's reference re-run with a patch (:mod:`.schedule`).

When several entries explain a divergence the earlier one ranks first, so the order matters: exact
rearrangements, then mechanisms, then precision, then fitted constants.

A project adds entries through the entry-point group ``parity.hypotheses`` or ``--hypotheses-module
FILE`` (or ``PARITY_HYPOTHESES_MODULES``): a module defining ``HYPOTHESIS`` or a list ``HYPOTHESES``,
loaded as components are (:mod:`parity.registry`). They rank after the built-in entries.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterable

from parity.explain import layout, precision, reference, schedule, values
from parity.explain.evidence import Candidate, Evidence
from parity.vocab import SECOND_CALL, InputError

TENSOR, REFERENCE, SCHEDULE = "tensor", "reference", "schedule"
FAMILIES = (TENSOR, REFERENCE, SCHEDULE)
ENTRY_POINT_GROUP = "parity.hypotheses"
ENV_MODULES = "PARITY_HYPOTHESES_MODULES"
#: Layers a schedule is made of (what the schedule family applies to).
SCHEDULE_LAYERS = ("*sigma*", "*timestep*", "*time_shift*")


@dataclass(frozen=True)
class Hypothesis:
    """One known mistake (see the module docstring)."""

    name: str
    description: str
    test: Callable[[Evidence], Iterable[Candidate]]
    family: str = TENSOR
    layers: tuple[str, ...] = ("*",)
    rank: int = 0

    def __post_init__(self) -> None:
        if not self.name or not self.description or not callable(self.test) or self.family not in FAMILIES:
            raise InputError(f"hypothesis {self.name!r}: needs a name, a description, a callable test and a family "
                             f"in {FAMILIES}")

    def applies(self, evidence: Evidence) -> bool:
        return evidence.ref.ndim >= self.rank and any(fnmatch.fnmatchcase(evidence.layer, g) for g in self.layers)


H = Hypothesis
CATALOG: tuple[Hypothesis, ...] = (
    # where values go: exact rearrangements
    H("transpose_last_two", "the last two axes transposed", layout.transpose_last_two, rank=2),
    H("chunk_order", "chunks of the last axis in another order (fused q/k/v, gate/up, shift/scale, sin/cos)",
      layout.chunk_order, rank=1),
    H("rotary_layout", "rotary pairs stored as halves where the reference interleaves them, or the reverse",
      layout.rotary_layout, rank=1),
    H("one_step_shift", "off by one along an axis (time, frame or token)", layout.one_step_shift, rank=1),
    H("axis_order", "axes in another order (a permutation, a reshape where a transpose belongs, a flatten order)",
      layout.axis_order),
    H("zeroed_region", "zeros where the reference has values (a missing cache, dropped history, zeros for t = 0)",
      values.zeroed_region),
    H("sign_flip", "the sign flipped", values.sign_flip),
    H("stale_state", "a value kept from the first call (a memo, a cache on the model not reset between calls)",
      values.first_call_value, layers=(SECOND_CALL + "*",)),
    # mechanisms: the reference sublayer on the port's inputs, with one change
    H("gelu_approximation", "GELU exact (erf) where the reference uses tanh, or the reverse",
      reference.gelu_approximation, REFERENCE),
    H("silu_gelu", "SiLU where the reference uses GELU, or the reverse", reference.silu_gelu, REFERENCE),
    H("norm_eps", "a norm's eps 1e-5 / 1e-6 swapped", reference.norm_eps, REFERENCE),
    H("norm_kind", "LayerNorm where the reference uses RMSNorm, or the reverse", reference.norm_kind, REFERENCE),
    H("norm_axis", "normalised over the wrong axis", reference.norm_axis, REFERENCE),
    H("norm_affine", "a norm's affine (weight, bias) left out", reference.norm_affine, REFERENCE),
    H("missing_norm", "a norm skipped", reference.missing_norm, REFERENCE),
    H("extra_norm", "an extra norm before the layer", reference.extra_norm, REFERENCE),
    H("attention_scale", "softmax scale 1/sqrt(d) over the wrong d", reference.attention_scale, REFERENCE),
    H("rotary_pairs", "rotation pairs taken as halves where the reference interleaves them, or the reverse",
      reference.rotary_pairs, REFERENCE),
    H("missing_cache", "an extra input (a cache, history) missing or zeroed", reference.zeroed_input, REFERENCE),
    H("fused_input_swap", "fed the wrong part of a fused projection (q/k/v, gate/up chunks reordered)",
      reference.fused_input_swap, REFERENCE),
    H("time_shift_inverted", "the time-shift formula inverted", schedule.time_shift_inverted, SCHEDULE,
      SCHEDULE_LAYERS),
    H("linspace_endpoint", "linspace endpoint included where the reference excludes it, or the reverse",
      schedule.linspace_endpoint, SCHEDULE, SCHEDULE_LAYERS),
    # precision
    H("float32_schedule", "computed in float32 where the reference computes in float64", precision.float32_schedule),
    H("cast_back_missing", "a cast back to the reference's dtype left out (a wider dtype kept)", precision.cast_back_missing),
    H("rounded_once", "rounded once to bf16 / fp16 where the reference keeps more precision", precision.rounded_once),
    H("sublayer_bf16", "computed in bf16 where the reference keeps float32 (softmax, accumulation)",
      reference.sublayer_bf16, REFERENCE),
    H("residual_bf16", "a residual add in bf16 (the stream rounded)", precision.computed_narrow,
      layers=("residual*", "*/residual*")),
    H("bf16_arithmetic", "an add or product in bf16 where the reference computes in float32", precision.computed_narrow),
    # fitted constants
    H("shift_again", "a schedule time-shifted twice (or by another factor)", values.shift_again, layers=SCHEDULE_LAYERS),
    H("clamp", "clamped to a range, or a clamp left out", values.clamp),
    H("scale", "off by a constant factor", values.scale),
    H("offset", "off by a constant", values.offset),
)


# --- a project's own entries -----------------------------------------------------------------------

_files: list[Path] = []


#: What a hypotheses module defines.
_NAMES = ("HYPOTHESIS", "HYPOTHESES")


def _found_in(obj: Any) -> list[Hypothesis]:
    from parity.registry import provided

    return provided(obj, Hypothesis, _NAMES)


def _load(path: Path) -> list[Hypothesis]:
    from parity.registry import load_provided

    return load_provided(path, "--hypotheses-module", Hypothesis, _NAMES)


def use_files(paths: Iterable[str | Path]) -> None:
    """Add hypothesis files (``--hypotheses-module``); each is checked when added."""
    for path in paths:
        resolved = Path(path).resolve()
        if resolved not in _files:
            _load(resolved)
            _files.append(resolved)


def hypotheses() -> list[Hypothesis]:
    """The catalog, then the entry points' entries, then the files' (``--hypotheses-module``, the environment)."""
    found = list(CATALOG)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found += _found_in(entry.load())
        except Exception as err:  # noqa: BLE001 - a broken plugin package: name it
            raise InputError(f"entry point {entry.name!r} ({entry.value}) of group {ENTRY_POINT_GROUP} failed to load: "
                             f"{type(err).__name__}: {err}") from err
    env = [Path(p).resolve() for p in os.environ.get(ENV_MODULES, "").split(os.pathsep) if p]
    for path in [*_files, *(p for p in env if p not in _files)]:
        found += _load(path)
    names = [h.name for h in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"hypotheses defined twice: {', '.join(twice)}")
    return found
