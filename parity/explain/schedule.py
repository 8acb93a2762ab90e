"""Schedule hypotheses: the component's reference re-run with a patch, for host-side schedules (timesteps, sigmas,
time-shift curves) that no sublayer produces. The run is the component's own; nothing else changes.

The patches target diffusers' own functions by name: the time shift of the flow-matching schedulers
(:data:`TIME_SHIFT_CLASSES`) and ``numpy.linspace`` / ``torch.linspace``.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, ContextManager, Iterator

from parity.explain.evidence import Candidate, Evidence

#: diffusers schedulers whose ``_time_shift_linear`` / ``_time_shift_exponential`` the time-shift hypotheses patch.
TIME_SHIFT_CLASSES = ("HeliosDMDScheduler", "FlowMatchEulerDiscreteScheduler")


@contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _rerun(evidence: Evidence, detail: str, patch: Callable[[], ContextManager]) -> Iterator[Candidate]:
    if evidence.rerun is None:
        return
    ref, truth = evidence.rerun(patch)
    if ref is not None:
        yield Candidate(detail, evidence.window(ref), evidence.window(truth) if truth is not None else None)


def _time_shift(inverted: Callable[[float, Any], Any]) -> Callable[[], ContextManager]:
    """Patch every known scheduler's time shift: ``inverted(m, t)``, m = mu (linear) or exp(mu) (exponential)."""
    @contextmanager
    def patch() -> Iterator[None]:
        import diffusers

        with ExitStack() as stack:
            for cls in (getattr(diffusers, name, None) for name in TIME_SHIFT_CLASSES):
                for kind, m in (("linear", lambda mu: mu), ("exponential", math.exp)):
                    if cls is not None and f"_time_shift_{kind}" in cls.__dict__:
                        stack.enter_context(_replaced(cls, f"_time_shift_{kind}",
                                                      lambda self, mu, sigma, t, m=m: inverted(m(mu), t)))
            yield
    return patch


def time_shift_inverted(evidence: Evidence) -> Iterator[Candidate]:
    yield from _rerun(evidence, "the time shift m t / (m + (1 - m) t) instead of m t / (1 + (m - 1) t)",
                      _time_shift(lambda m, t: m * t / (m + (1 - m) * t)))
    yield from _rerun(evidence, "the inverse time shift t / (m + (1 - m) t) (by 1/m)",
                      _time_shift(lambda m, t: t / (m + (1 - m) * t)))


def _linspace(flip_numpy: bool) -> Callable[[], ContextManager]:
    @contextmanager
    def patch() -> Iterator[None]:
        import numpy as np
        import torch

        np_linspace, torch_linspace = np.linspace, torch.linspace

        def numpy_linspace(start, stop, num=50, endpoint=True, *args, **kwargs):
            return np_linspace(start, stop, num, not endpoint, *args, **kwargs)

        def torch_excluded(start, end, steps, *args, **kwargs):
            return torch_linspace(start, end, steps + 1, *args, **kwargs)[:-1]
        with ExitStack() as stack:
            stack.enter_context(_replaced(np, "linspace", numpy_linspace) if flip_numpy else
                                _replaced(torch, "linspace", torch_excluded))
            yield
    return patch


def linspace_endpoint(evidence: Evidence) -> Iterator[Candidate]:
    yield from _rerun(evidence, "numpy.linspace with its endpoint flipped", _linspace(True))
    yield from _rerun(evidence, "torch.linspace without its endpoint", _linspace(False))
