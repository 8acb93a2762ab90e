"""Per-layer metric baselines of known-good runs, and the regression check ``parity gate`` makes with them.

A baseline is a small JSON file, ``baselines/<component>-<dtype>.json``, committed with the code:
for every layer of a passing run, its ``max_abs``, ``rmse``, ``cosine`` and (bf16) ``budget_ratio``
and ``err_vs_truth``, plus what the numbers depend on (config, seed, MLX device).
``parity baseline save`` writes them::

    parity baseline save [--component C ...] [--dtype float32|bfloat16|all] [--baselines DIR]

Only a run that passes is saved (a baseline is a known-good state); a failing component is
reported and not written (exit 1).

The gate then fails a layer whose error grew past ``baseline_factor`` (``parity/thresholds.toml``) times
its baseline, even when it is still within the absolute thresholds: parity that silently
erodes is caught while it is small. The growth is measured against ``max(baseline, floor)``:

- ``max_abs`` / ``rmse``: the floor is ``FLOOR_ULPS`` units in the last place of the layer's
  (coarser) dtype at the tensor's own scale (``max|ref|`` / ``rms(ref)``). Many baselines are
  exactly 0 (both sides bit-identical); without a floor any later rounding difference -- a fused
  kernel, a reordered reduction, a new MLX release -- would be an "infinite" regression. One
  correctly rounded operation done differently moves a value by up to one ulp; a few chained ones
  by a few. Below ``FLOOR_ULPS`` ulps an error is rounding noise, not a measurement of the port.
  In float32 the floor (4 ulps = 4.8e-7 relative) times the default factor 2 is still 10x
  below the absolute tolerance (1e-5 relative), so drift is caught long before it fails outright.
- ``budget_ratio``: the floor is 1.0 -- losing exactly as much precision as the reference does.
  Ratios below 1 are luck of rounding; 0.3 becoming 0.9 is not a regression, 1.2 becoming 3 is.
- ``err_vs_truth`` (bf16 runs: our RMSE against the float64 truth): the floor is ``FLOOR_ULPS``
  *float32* ulps at the tensor's scale. In bf16 the floors above are inert for errors that stay
  within a few bf16 ulps of the reference (4 bf16 ulps x 2 is more than a bf16 run ever shows),
  so an error that doubled inside the tolerance would pass them; against the truth it does not.

A metric that shrank below ``baseline / factor`` (with the baseline above its floor) is
reported as an improvement: information, never a failure -- re-save the baseline to lock it in.

A baseline is only used for the run it describes: same config, same seed, same MLX device
(``cpu`` / ``gpu``: Metal kernels round differently from the CPU ones, so a Linux CPU baseline
says nothing about a Metal run). Otherwise, or when there is no file, the component is gated on
its absolute thresholds alone and the gate says "no baseline" (``--require-baselines``: an error).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from parity.dumps import write_json
from parity.vocab import InputError, canonical_json, load_json

#: Baselines belong to the project being checked: ``baselines/`` in the folder the harness runs from.
DEFAULT_DIR = Path("baselines")
SCHEMA = 1
#: Metrics stored per layer; the first three are gated, cosine is kept for information.
STORED = ("max_abs", "rmse", "budget_ratio", "err_vs_truth", "cosine")
GATED = ("max_abs", "rmse", "budget_ratio", "err_vs_truth")
#: The reference-scale column each error metric's floor is measured in.
SCALE = {"max_abs": "ref_max_abs", "rmse": "ref_rms", "err_vs_truth": "ref_rms"}
#: Errors below this many ulps of the layer's dtype (at the tensor's scale) are rounding noise.
FLOOR_ULPS = 4.0
#: A precision-budget ratio up to 1 (no more loss than the reference's own) is never a regression.
BUDGET_FLOOR = 1.0
#: Machine epsilon (one ulp at 1.0) per dtype name; unknown (integer) dtypes count as float32.
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


class BaselineError(InputError):
    """A baseline file is unreadable or malformed."""


@dataclass
class Baseline:
    component: str
    dtype: str
    seed: int
    config: dict[str, Any]
    device: str
    layers: dict[str, dict[str, float]]
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def mismatch(self, config: dict[str, Any], seed: int, device: str | None) -> str | None:
        """Why this baseline does not describe a run of ``config``/``seed`` on ``device`` (None: it does)."""
        if canonical_json(config) != canonical_json(self.config):
            return "recorded for a different config (re-save it with `parity baseline save`)"
        if seed != self.seed:
            return f"recorded with seed {self.seed}, this run used seed {seed}"
        if device is not None and device != self.device:
            return f"recorded on the MLX {self.device} device, this run is on {device}"
        return None


def mlx_device() -> str:
    """``"cpu"`` or ``"gpu"``: the device MLX computes on in this process."""
    import mlx.core as mx

    return mx.default_device().type.name


def shown(path: str | Path | None) -> str:
    """``path`` relative to the current folder when it is inside it (for messages)."""
    if path is None:
        return "-"
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def path_for(directory: str | Path, component: str, dtype: str) -> Path:
    return Path(directory) / f"{component}-{dtype}.json"


# --- building, saving, loading ----------------------------------------------------------------

def from_report(report: dict[str, Any], device: str) -> dict[str, Any]:
    """The baseline JSON of a passing run's ``report.json`` contents."""
    if report.get("verdict") != "PASS":
        raise BaselineError(f"{report.get('component')} {report.get('dtype')}: only a passing run can be a baseline "
                            f"(first divergence: {report.get('first_divergence')})")
    layers = {}
    for row in report["layers"]:
        entry = {}
        for metric in STORED:
            value = row.get(metric)
            if metric == "budget_ratio" and row.get("budget_excused"):
                continue  # excused: the ratio says nothing (we match the reference to float32 tolerance)
            if isinstance(value, (int, float)) and math.isfinite(value):
                entry[metric] = float(value)
        for scale in SCALE.values():
            if isinstance(row.get(scale), (int, float)):
                entry[scale] = float(row[scale])
        entry["dtype"] = _coarser(row.get("dtype_ref"), row.get("dtype_mlx"), report["dtype"])
        layers[row["layer"]] = entry
    return {
        "schema": SCHEMA,
        "component": report["component"],
        "dtype": report["dtype"],
        "seed": report.get("seed", 0),
        "device": device,
        "config": report.get("config", {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": report.get("git_commit"),
        "versions": {k: v for k, v in (report.get("versions") or {}).items() if k in ("mlx", "torch", "diffusers", "numpy", "platform")},
        "layers": layers,
    }


def save(report: dict[str, Any], directory: str | Path = DEFAULT_DIR, device: str | None = None) -> Path:
    """Write the baseline of a passing run; returns its path."""
    data = from_report(report, device or mlx_device())
    path = path_for(directory, data["component"], data["dtype"])
    write_json(path, data)
    return path


def load(path: str | Path) -> Baseline:
    """Read and validate a baseline file; a malformed one raises :class:`BaselineError` naming file and key."""
    path = Path(path)
    try:
        data = load_json(path, "baseline")
    except InputError as err:
        raise BaselineError(str(err)) from None
    if not isinstance(data, dict):
        raise BaselineError(f"baseline {path}: expected a JSON object")
    for key, kind in (("schema", int), ("component", str), ("dtype", str), ("seed", int), ("device", str),
                      ("config", dict), ("layers", dict)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise BaselineError(f"baseline {path}: key {key!r} missing or not a {kind.__name__}")
    if data["schema"] != SCHEMA:
        raise BaselineError(f"baseline {path}: schema {data['schema']}, this harness reads schema {SCHEMA}")
    if path.name != f"{data['component']}-{data['dtype']}.json":
        raise BaselineError(f"baseline {path}: holds {data['component']} {data['dtype']}; "
                            f"expected file name {data['component']}-{data['dtype']}.json")
    layers = {}
    for layer, entry in data["layers"].items():
        if not isinstance(entry, dict):
            raise BaselineError(f"baseline {path}: layers[{layer!r}] is not an object")
        for metric, value in entry.items():
            if metric == "dtype":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise BaselineError(f"baseline {path}: layers[{layer!r}].{metric} = {value!r}; "
                                    "expected a finite non-negative number")
        layers[layer] = entry
    meta = {k: v for k, v in data.items() if k not in ("layers", "config")}
    return Baseline(data["component"], data["dtype"], data["seed"], data["config"], data["device"], layers, path, meta)


def find(directory: str | Path, component: str, dtype: str) -> Baseline | None:
    """The baseline of ``component`` in ``dtype`` under ``directory``, or None if there is no file."""
    path = path_for(directory, component, dtype)
    return load(path) if path.exists() else None


# --- the regression check ---------------------------------------------------------------------

def _coarser(*dtypes: str | None) -> str:
    known = [d for d in dtypes if d in EPS]
    return max(known, key=EPS.__getitem__) if known else "float32"


def floor(metric: str, row: dict[str, Any], base: dict[str, Any] | None = None) -> float:
    """The smallest baseline ``metric`` is measured against for this layer (see the module doc)."""
    if metric == "budget_ratio":
        return BUDGET_FLOOR
    base = base or {}
    # Our error against the float64 truth is measured at float32 resolution whatever the run's dtype:
    # a bf16 error that doubles is far above 4 float32 ulps, so this baseline still sees it.
    dtype = "float32" if metric == "err_vs_truth" else _coarser(row.get("dtype_ref"), row.get("dtype_mlx"), base.get("dtype"))
    eps = EPS[dtype]
    scale = row.get(SCALE[metric])
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        scale = base.get(SCALE[metric], 0.0)
    return FLOOR_ULPS * eps * scale


@dataclass
class Change:
    """A gated metric of one layer, against its baseline."""

    metric: str
    value: float
    baseline: float
    limit: float  # regression above this
    regressed: bool
    improved: bool
    floored: bool  # the limit is measured from the floor, not from the (smaller) baseline


def check_layer(row: dict[str, Any], base: dict[str, Any], factor: float) -> list[Change]:
    """Compare one report row with its baseline entry: each gated metric both have, judged."""
    changes = []
    for metric in GATED:
        value, reference = row.get(metric), base.get(metric)
        if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)):
            continue
        if metric == "budget_ratio" and row.get("budget_excused"):
            continue
        low = floor(metric, row, base)
        limit = factor * max(reference, low)
        regressed = not value <= limit  # NaN regresses
        improved = not regressed and reference > low and value < reference / factor
        changes.append(Change(metric, float(value), float(reference), limit, regressed, improved, reference < low))
    return changes
