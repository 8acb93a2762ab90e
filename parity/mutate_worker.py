"""One run of ``parity mutate`` in a fresh process: a component's MLX side against reference bundles.

    python -m parity.mutate_worker SPEC.json

Started by :mod:`parity.mutate` (not a command). ``SPEC`` holds ``component``,
``component_modules``, ``runs`` (each a ``label``, the ``bundle`` it is judged against and, for the
float32 run, ``call2``: the bundle of the second call, made on the same model object), ``thresholds``
(files layered over the harness's), ``calibration_dir`` (where the judge finds calibrated limits, as
a run does), ``out`` (the result file) and optionally

- ``mutant``: ``{"file": path, "mutant": path}``: ``file`` is imported from the mutant's copy
  instead (the loader is patched before anything is imported, so every import of the file, also
  ``--component-module`` loading, gets the mutant; ``__file__`` and tracebacks name the original
  path, showing the mutant's lines; nothing is written next to the original, no bytecode cache);
- ``trace``: record which lines of the project's files run (coverage, from the first import) and
  which files have a function run during the comparisons (the component's MLX sources).

The result (JSON, rewritten after each run) holds per run the verdict, the first divergence
and its failure, a crash, how close each layer came to its limit and a digest of every captured
MLX tensor (equivalence is bit-identity of these); and ``loaded`` (the mutant was imported).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Any, Callable

PARITY_DIR = Path(__file__).resolve().parent
REPO = PARITY_DIR.parent
#: The harness's own code around the implementations: never a source of a component's MLX side.
HARNESS = (PARITY_DIR, REPO / "reference_runners", REPO / "fixtures", REPO / "tests", REPO / "mlx_impl" / "taps.py")
CO_OPTIMIZED = 0x1  # a function's code (not a module or class body)


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def project_file(filename: str) -> bool:
    """A Python file of the project under test: not the harness, the standard library or an installed package
    (the harness's own ``mlx_impl`` counts as project, wherever it is installed)."""
    if not filename.endswith(".py") or filename.startswith("<"):
        return False
    path = Path(filename).resolve()
    if any(_under(path, h) for h in HARNESS):
        return False
    if _under(path, REPO / "mlx_impl"):
        return True
    installed = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return not any(_under(path, Path(p).resolve()) for p in installed) and "site-packages" not in path.parts


# --- the mutant in place of the original ----------------------------------------------------------

def substitute(original: str, source: str) -> dict[str, bool]:
    """Make every import of ``original`` load ``source`` instead (this process only); returns ``{"loaded": ...}``."""
    import linecache
    from importlib.machinery import SourceFileLoader

    target = os.path.realpath(original)
    data = source.encode()
    state = {"loaded": False}
    get_data, path_stats = SourceFileLoader.get_data, SourceFileLoader.path_stats

    def mutant_data(self: Any, path: str) -> bytes:
        if os.path.realpath(path) == target:
            state["loaded"] = True
            return data
        return get_data(self, path)

    def no_cache(self: Any, path: str) -> Any:
        if os.path.realpath(path) == target:
            raise OSError("a mutant has no bytecode cache")  # forces the source path: get_data above
        return path_stats(self, path)

    SourceFileLoader.get_data, SourceFileLoader.path_stats = mutant_data, no_cache
    linecache.cache[original] = (len(source), None, source.splitlines(keepends=True), original)
    return state


# --- which lines run ----------------------------------------------------------------------------------

class Tracer:
    """``sys.settrace`` hook: lines run in project files, and the files with a function run while ``running``."""

    def __init__(self, keep: Callable[[str], bool] = project_file):
        self.keep = keep
        self.lines: dict[str, set[int]] = {}
        self.ran: set[str] = set()
        self.running = False
        self._kept: dict[str, bool] = {}

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        kept = self._kept.get(filename)
        if kept is None:
            kept = self._kept[filename] = self.keep(filename)
        if not kept:
            return None
        if self.running and frame.f_code.co_flags & CO_OPTIMIZED:
            self.ran.add(filename)
        lines = self.lines.setdefault(filename, set())
        lines.add(frame.f_lineno)

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                lines.add(frame.f_lineno)
            return local
        return local


# --- one comparison -------------------------------------------------------------------------------------

def digest(capture: Any, name: str) -> str:
    """sha256 (16 hex digits) of a captured tensor's dtype, shape and bytes (or of its statistics)."""
    import numpy as np

    h = hashlib.sha256(f"{capture.dtypes[name]}|{tuple(capture.shapes[name])}|".encode())
    stats = capture.stats_of(name)
    if stats is not None:
        h.update(json.dumps(stats, sort_keys=True, default=str).encode())
    else:
        h.update(np.ascontiguousarray(capture.tensors[name]).tobytes())
    return h.hexdigest()[:16]


def margins(layers: list[Any]) -> list[dict[str, Any]]:
    """How close each judged layer came to (or how far past) a limit: ``{layer, mlx_layer, metric, ratio}``, the
    largest of its value / limit ratios (max abs, bf16 budget, 1 - cosine)."""
    found = []
    for layer in layers:
        if layer.verdict == "EXCLUDED":
            continue
        m, limits = layer.metrics, layer.limits
        ratios = []
        if isinstance(m.get("max_abs"), float) and limits.get("abs_limit"):
            ratios.append(("max_abs", m["max_abs"] / limits["abs_limit"]))
        if isinstance(m.get("budget_ratio"), float) and limits.get("budget_ratio") and not m.get("budget_excused"):
            ratios.append(("budget_ratio", m["budget_ratio"] / limits["budget_ratio"]))
        if isinstance(m.get("cosine"), float) and limits.get("cosine_min") and limits["cosine_min"] < 1:
            ratios.append(("cosine", (1 - m["cosine"]) / (1 - limits["cosine_min"])))
        if ratios:
            metric, ratio = max(ratios, key=lambda r: r[1])
            found.append({"layer": layer.name, "mlx_layer": layer.mlx_name, "metric": metric, "ratio": ratio})
    return found


def closest(margins: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The margin nearest its limit (or furthest past it)."""
    return max(margins, key=lambda m: m["ratio"], default=None)


def compare_run(component: str, run_spec: dict[str, Any], thresholds: Any, calibration_dir: str | None) -> dict[str, Any]:
    """The MLX side against one bundle (and, when the run has one, its second call against the bundle of the
    second call, on the same model object): verdict, first divergence, crash, margins, digests."""
    import tempfile

    from parity.bundle import open_bundle, run_against
    from parity.runner import SECOND_CALL, second_call

    started = time.perf_counter()
    opened = open_bundle(component, run_spec["bundle"], use_bundle_config=True)
    with tempfile.TemporaryDirectory(prefix="parity-mutant-") as spool:
        run = run_against(opened, thresholds, Path(spool), keep_mlx=True, calibration_dir=calibration_dir)
        comparison, mlx = run.comparison, run.sides.mlx
        digests = [[name, digest(mlx, name)] for name in mlx.order]
        if run_spec.get("call2") and comparison.crash is None:
            again = open_bundle(component, run_spec["call2"], use_bundle_config=True)
            second = second_call(run.setup, run.judge, ref=again.ref, inputs=again.inputs)
            comparison.layers += second.layers
            comparison.crash = second.crash
            digests += [[SECOND_CALL + name, digest(second.mlx, name)] for name in second.mlx.order]
        first = next((l for l in comparison.layers if l.verdict == "FAIL"), None)
        crash = comparison.crash
        return {
            "verdict": comparison.verdict,
            "first_divergence": comparison.first_divergence,
            "first_divergence_mlx": first.mlx_name if first is not None else None,
            "failure": first.failures[0].message if first is not None and first.failures else None,
            "failure_metric": first.failures[0].metric if first is not None and first.failures else None,
            "failed_sections": [s.name for s in comparison.sections if s.passed is False],
            "crash": {"side": crash.side, "error": crash.error, "after": crash.after} if crash else None,
            "calibration": run.calibrated,
            "margins": margins(comparison.layers),
            "layers": len(comparison.layers),
            "digests": digests,
            "seconds": round(time.perf_counter() - started, 3),
        }


def error_entry(err: BaseException) -> dict[str, Any]:
    from parity.vocab import InputError

    return {"error": f"{type(err).__name__}: {err}", "input_error": isinstance(err, InputError),
            "traceback": "".join(traceback.format_exception(err)[-6:])}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    mutant = spec.get("mutant")
    state = substitute(mutant["file"], Path(mutant["mutant"]).read_text()) if mutant else {"loaded": False}
    tracer = Tracer() if spec.get("trace") else None
    if tracer:
        sys.settrace(tracer)
    result: dict[str, Any] = {"runs": {}}
    out = Path(spec["out"])

    def write() -> None:
        result["loaded"] = state["loaded"]
        if tracer:
            result["coverage"] = {f: sorted(lines) for f, lines in tracer.lines.items()}
            result["ran"] = sorted(tracer.ran)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, allow_nan=True))
        os.replace(tmp, out)

    try:
        from parity import config, registry, threads
        from parity import thresholds as thresholds_mod

        # The bundles' configs were checked against the diffusers constructors when the parent made them;
        # checking again would import diffusers and torch into every worker (seconds each) for nothing.
        config._constructor_keys = lambda target: None
        threads.configure()
        registry.use_files(spec.get("component_modules") or [])
        registry.get(spec["component"])
        thresholds = thresholds_mod.load(spec.get("thresholds") or [])
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which decides what it means
        result["setup_error"] = error_entry(err)
        write()
        return 0
    for run_spec in spec["runs"]:
        if tracer:
            tracer.running = True
        try:
            result["runs"][run_spec["label"]] = compare_run(spec["component"], run_spec, thresholds,
                                                            spec.get("calibration_dir"))
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001 - a mutant that breaks building or loading: reported
            result["runs"][run_spec["label"]] = error_entry(err)
        finally:
            if tracer:
                tracer.running = False
        write()
    if tracer:
        sys.settrace(None)
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
