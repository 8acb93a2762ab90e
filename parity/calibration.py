"""Per-layer limits calibrated on the noise of the correct implementation (``parity calibrate``).

One limit per dtype is loose where a layer's noise is small: over 20 seeds some bf16 layers never
pass a budget ratio of 1.14 while a fault there reaches 1.3, under the global limit of 2.
``parity calibrate COMPONENT --seeds N`` runs the component on seeds 1..N (the default run's seed
0 stays held out) in each dtype and writes ``calibration/<component>-<dtype>.json``: per layer
the statistics of its noise metric and the limit derived from them, with the config they hold
for. A run of that config then judges each calibrated layer on the tighter of the global and the
calibrated limit; a calibration never loosens a limit.

The rule, per layer over the calibration seeds (``mean``, ``std``, ``max`` of the metric):

- bfloat16, the precision budget ratio:  ``max(max, mean + 4 std, 1) + 0.1``
- float32, max abs / max|reference|:    ``2 * max(max, mean + 4 std)``, at least 4 float32 ulps

Four standard deviations above the mean is a one-sided normal tail of 3e-5 per layer and run,
and the limit is never below the largest value seen (the calibration runs pass their own
limits), nor, in bf16, below 1 (an error no larger than the reference's own is no fault). The headroom is for other machines: 0.1 on a ratio of two errors measured on the same
machine, a factor 2 on float32 errors whose BLAS kernels change with the CPU (the baseline
gate's factor). ``tests/test_calibration.py`` calibrates on some seeds and finds no false alarm
on a disjoint set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from parity.dumps import write_json
from parity.vocab import InputError, canonical_json, load_json

DEFAULT_DIR = Path("calibration")
SCHEMA = 1
#: Standard deviations above the mean; headroom on the bf16 budget ratio; float32 factor and floor.
SIGMAS = 4.0
BUDGET_HEADROOM = 0.1
FLOAT32_FACTOR = 2.0
FLOAT32_FLOOR = 4 * 2.0**-23
#: The noise metric of each dtype, and the Tolerance field its limit sets.
METRIC = {"bfloat16": ("budget_ratio", "calibrated_budget"), "float32": ("max_abs_rel", "calibrated_rel")}
RULE = {"bfloat16": f"max(max, mean + {SIGMAS:g} std, 1) + {BUDGET_HEADROOM:g}",
        "float32": f"{FLOAT32_FACTOR:g} * max(max, mean + {SIGMAS:g} std), at least {FLOAT32_FLOOR:.3g}"}


class CalibrationError(InputError):
    """A calibration file is unreadable or malformed."""


class CalibrationFailed(Exception):
    """A calibration seed did not pass: there is a parity failure to fix first (exit 1)."""


def noise(row: Mapping[str, Any], dtype: str) -> float | None:
    """A report row's noise metric in ``dtype`` (None where it has none: excluded, failing, no metrics)."""
    if row.get("verdict") != "PASS":
        return None
    if dtype == "float32":
        error, scale = row.get("max_abs"), row.get("ref_max_abs")
        if not isinstance(error, (int, float)) or not isinstance(scale, (int, float)) or scale <= 0:
            return None
        value = error / scale
    else:
        value = row.get("budget_ratio")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def limit(values: Sequence[float], dtype: str) -> float:
    """The calibrated limit of a layer whose noise took ``values`` over the calibration seeds (module rule)."""
    array = np.asarray(values, np.float64)
    spread = max(float(array.max()), float(array.mean() + SIGMAS * array.std()))
    if dtype == "float32":
        return max(FLOAT32_FACTOR * spread, FLOAT32_FLOOR)
    return max(spread, 1.0) + BUDGET_HEADROOM


def summarise(rows_per_seed: Iterable[Sequence[Mapping[str, Any]]], dtype: str) -> dict[str, dict[str, float]]:
    """Per layer: n, mean, std, max of its noise metric over the seeds, and the limit (layers seen in every seed)."""
    series: dict[str, list[float]] = {}
    runs = 0
    for rows in rows_per_seed:
        runs += 1
        for row in rows:
            value = noise(row, dtype)
            if value is not None:
                series.setdefault(row["layer"], []).append(value)
    out = {}
    for layer, values in series.items():
        if len(values) == runs:
            array = np.asarray(values)
            out[layer] = {"n": len(values), "mean": float(array.mean()), "std": float(array.std()),
                          "max": float(array.max()), "limit": limit(values, dtype)}
    return out


@dataclass
class Calibration:
    component: str
    dtype: str
    config: dict[str, Any]
    seeds: list[int]
    layers: dict[str, dict[str, float]]
    path: Path

    def mismatch(self, config: Mapping[str, Any]) -> str | None:
        """Why these limits do not hold for a run of ``config`` (None: they do)."""
        if canonical_json(dict(config)) != canonical_json(self.config):
            return f"{self.path}: recorded for a different config (run `parity calibrate {self.component}` again)"
        return None

    def limits(self) -> dict[str, dict[str, float]]:
        """Layer -> the Tolerance field its calibrated limit sets (what :class:`parity.compare.Judge` takes)."""
        field = METRIC[self.dtype][1]
        return {layer: {field: entry["limit"]} for layer, entry in self.layers.items()}


def path_for(directory: str | Path, component: str, dtype: str) -> Path:
    return Path(directory) / f"{component}-{dtype}.json"


def calibrate(component: str, dtype: str, seeds: Sequence[int], run: Callable[[int], Mapping[str, Any]],
              directory: str | Path = DEFAULT_DIR, on_seed: Callable[[int, Mapping[str, Any]], None] | None = None
              ) -> Path:
    """Run ``run(seed)`` (a report dict of a passing run) for each seed and write the calibration file.

    A seed that does not pass stops it: limits are calibrated on the correct implementation only.
    """
    if dtype not in METRIC:
        raise InputError(f"calibrate: dtype {dtype!r} has no noise metric; expected one of {sorted(METRIC)}")
    reports = []
    for seed in seeds:
        report = run(seed)
        if on_seed is not None:
            on_seed(seed, report)
        if report.get("verdict") != "PASS":
            raise CalibrationFailed(f"{component} {dtype} seed {seed}: {report.get('verdict')} (first divergence "
                                    f"{report.get('first_divergence')}); calibrate the correct implementation only")
        reports.append(report)
    data = {
        "schema": SCHEMA, "component": component, "dtype": dtype, "config": reports[0].get("config", {}),
        "seeds": list(seeds), "metric": METRIC[dtype][0], "rule": RULE[dtype],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {k: v for k, v in (reports[0].get("versions") or {}).items()
                     if k in ("mlx", "torch", "diffusers", "numpy", "platform", "mlx_blas")},
        "layers": summarise((r["layers"] for r in reports), dtype),
    }
    path = path_for(directory, component, dtype)
    write_json(path, data)
    return path


def load(path: str | Path) -> Calibration:
    """Read and validate a calibration file; a malformed one raises :class:`CalibrationError` naming file and key."""
    path = Path(path)
    data = load_json(path, "calibration file")
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: expected a JSON object")
    for key, kind in (("schema", int), ("component", str), ("dtype", str), ("config", dict), ("seeds", list),
                      ("layers", dict)):
        if not isinstance(data.get(key), kind):
            raise CalibrationError(f"{path}: key {key!r}: expected {kind.__name__}")
    if data["schema"] != SCHEMA:
        raise CalibrationError(f"{path}: schema {data['schema']}, this harness reads schema {SCHEMA}")
    if data["dtype"] not in METRIC:
        raise CalibrationError(f"{path}: dtype {data['dtype']!r}: expected one of {sorted(METRIC)}")
    for layer, entry in data["layers"].items():
        value = entry.get("limit") if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CalibrationError(f"{path}: layers.{layer}.limit: expected a positive number")
    return Calibration(data["component"], data["dtype"], data["config"], data["seeds"], data["layers"], path)


def for_run(component: str, dtype: str, config: Mapping[str, Any],
            directory: str | Path | None = DEFAULT_DIR) -> tuple[Calibration | None, str | None]:
    """The calibration a run of ``component`` in ``dtype`` with ``config`` uses, and a note when one
    exists but does not apply (other config). ``(None, None)``: there is none."""
    if directory is None or dtype not in METRIC:
        return None, None
    path = path_for(directory, component, dtype)
    if not path.is_file():
        return None, None
    calibration = load(path)
    why = calibration.mismatch(config)
    return (None, why) if why else (calibration, None)
