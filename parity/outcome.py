"""What the gate decided: one :class:`Finding` per failed check, one :class:`Outcome` per component run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Finding:
    """One failed check (or an improvement) of one layer."""

    component: str
    dtype: str
    layer: str
    metric: str
    value: Any
    threshold: str  # human-readable limit, e.g. "<= 5.3e-05" or ">= 0.99999"
    baseline: Any = None
    kind: str = "absolute"  # absolute | structure (from the run's verdict) | baseline | error
    message: str = ""


@dataclass
class Outcome:
    """The gate's verdict on one component in one dtype."""

    component: str
    dtype: str
    layers: list[str] = field(default_factory=list)
    failures: list[Finding] = field(default_factory=list)
    improvements: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report_dir: str | None = None
    seconds: float | None = None
    baseline_path: str | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures and self.error is None

    @property
    def first_divergence(self) -> str | None:
        return self.failures[0].layer if self.failures else None


@dataclass
class GateResult:
    outcomes: list[Outcome]
    run_dir: Path | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1
