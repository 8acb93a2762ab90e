"""``parity mutate``: how many small numerical faults in a component's MLX source its comparison catches.

For one component:

1. **reference once**, in this process (no mutant runs PyTorch): a reference bundle
   (:func:`parity.bundle.dump_reference`) for each run a gate makes of the component: one per
   dtype and one per coverage cell (float32; ``Options.coverage``), each float32 one with a bundle
   of its second call (its second inputs: the worker calls the same MLX model object again,
   ``call2/...`` layers);
2. **baseline**: the unmutated MLX side against the bundles in two fresh worker processes
   (:mod:`parity.mutate_worker`), judged as a run judges (thresholds, and calibrated limits where
   ``calibration_dir`` holds a calibration of the component, dtype and config). It must PASS (a mutation score of a failing comparison means
   nothing). The first is traced: which lines of the project's files run, and which files have a
   function run during the comparison; the second shows the run is bit-reproducible (else no
   mutant is called equivalent: bit-identity would prove nothing);
3. **sources**: ``--source`` files, else the component's ``mutate_sources``, else the project
   files whose functions ran (the harness, installed packages and the component's own definition
   file excluded): for our components the ``mlx_impl/`` modules it uses, for a
   ``--component-module`` port the port's files;
4. **mutants** of the sources (:mod:`parity.mutate_ops`), kept on lines that ran, at most
   ``max_mutants`` (:func:`parity.mutate_ops.select`), each run in its own fresh worker process
   with the mutant shadowing the original file, ``jobs`` at a time, each for at most ``timeout``
   seconds (1 BLAS/torch thread each when several run at once);
5. each mutant is, over the runs: **killed** (some run FAILs at a layer the mutant changed;
   with the first divergence and whether it is the first layer the mutant changed at all),
   **crashed** (an exception or a timeout before any layer failed), **survived** (its captured
   MLX tensors differ from the baseline's, and every run PASSes) or **equivalent** (every
   captured MLX tensor is bit-identical to the baseline's). The kill rate is killed / (killed +
   survived).

Results: ``<out>/<component>/mutations.json`` (rewritten as mutants finish, so an interrupted run
keeps what it got) and ``mutations.html`` (:mod:`parity.mutate_page`).
"""
from __future__ import annotations

import importlib.util
import inspect
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from parity import calibration, mutate_page, registry, threads
from parity.dumps import write_json
from parity.mutate_ops import OPERATORS, Mutant, mutants, select
from parity.mutate_worker import REPO, closest, project_file
from parity.progress import SILENT, Progress
from parity.runner import git_commit, variant, versions
from parity.vocab import DTYPES, InputError, fmt

SCHEMA = 1
STATUSES = ("killed", "survived", "equivalent", "crashed")
DEFAULT_MAX_MUTANTS = 50
#: The per-mutant timeout when none is given: this many times the baseline's wall time, at least MIN_TIMEOUT.
TIMEOUT_FACTOR, MIN_TIMEOUT = 10, 60.0


class BaselineFails(Exception):
    """The unmutated component does not pass against its reference: no mutation score (exit 1)."""


@dataclass
class Options:
    """What ``parity mutate`` runs: dtypes, coverage cells, seed, config and calibration of the comparison, which
    sources and operators, bounds."""

    dtypes: Sequence[str] = DTYPES
    coverage: bool = True
    calibration_dir: Path | None = calibration.DEFAULT_DIR
    seed: int = 0
    config_path: Path | None = None
    sources: Sequence[Path] = ()
    operators: Sequence[str] | None = None
    max_mutants: int | None = DEFAULT_MAX_MUTANTS
    timeout: float | None = None
    jobs: int | None = None
    thresholds: Sequence[Path] = ()
    component_modules: Sequence[Path] = field(default_factory=list)


def check(names: Sequence[str], options: Options) -> None:
    """Every input error before anything runs: components, source files, operators, bounds."""
    for name in names:
        registry.get(name)
    for path in options.sources:
        path = Path(path)
        if not path.is_file() or path.suffix != ".py":
            raise InputError(f"--source {path}: expected an existing .py file")
        if not project_file(str(path.resolve())):
            raise InputError(f"--source {path}: part of the harness or of an installed package, not of a port")
    unknown = sorted(set(options.operators or ()) - set(OPERATORS))
    if unknown:
        raise InputError(f"unknown mutation operator(s) {', '.join(unknown)}; available: {', '.join(OPERATORS)}")
    for dtype in options.dtypes:
        if dtype not in DTYPES:
            raise InputError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if options.max_mutants is not None and options.max_mutants < 0:
        raise InputError(f"--max-mutants: expected a count >= 0, got {options.max_mutants}")
    if options.timeout is not None and not options.timeout > 0:
        raise InputError(f"--timeout: expected seconds > 0, got {options.timeout}")


# --- worker processes ----------------------------------------------------------------------------

class Workers:
    """Fresh ``python -m parity.mutate_worker`` processes, at most ``jobs`` at once, each killed after its timeout."""

    def __init__(self, jobs: int, scratch: Path, env: dict[str, str]):
        self.scratch, self.env = scratch, env
        self.executor = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="parity-mutate")
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopped = False
        self.numbers = itertools.count()

    def submit(self, spec: dict[str, Any], timeout: float | None) -> Future:
        return self.executor.submit(self.run, spec, timeout)

    def run(self, spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        folder = self.scratch / f"worker{next(self.numbers)}"
        folder.mkdir()
        out = folder / "result.json"
        (folder / "spec.json").write_text(json.dumps({**spec, "out": str(out)}))
        started = time.perf_counter()
        with open(folder / "log.txt", "wb") as log, self.lock:
            if self.stopped:
                return {"cancelled": True}
            proc = subprocess.Popen([sys.executable, "-m", "parity.mutate_worker", str(folder / "spec.json")],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env)
            self.live.add(proc)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        finally:
            with self.lock:
                self.live.discard(proc)
        result = json.loads(out.read_text()) if out.is_file() else {}
        result.update(returncode=proc.returncode, timed_out=timed_out, wall=round(time.perf_counter() - started, 3))
        if proc.returncode or timed_out or "setup_error" in result:
            lines = (folder / "log.txt").read_text(errors="replace").strip().splitlines()
            result["log_tail"] = "\n".join(lines[-12:])
        shutil.rmtree(folder, ignore_errors=True)
        return result

    def stop(self) -> None:
        """Kill the running workers (our own child processes, by handle) and drop the queued ones."""
        with self.lock:
            self.stopped = True
            for proc in self.live:
                proc.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)


def worker_env(jobs: int) -> dict[str, str]:
    """The workers' environment: this harness first on the path; one BLAS/torch thread each when several run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    count = 1 if jobs > 1 else threads.current().get("threads") or 1
    env[threads.ENV_THREADS] = str(count)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(count)
    return env


# --- judging one mutant ---------------------------------------------------------------------------

def first_changed(baseline: list[list[str]], ours: list[list[str]]) -> str | None:
    """The first captured MLX layer (in execution order) whose bits differ from the baseline's, or that is missing."""
    mine = dict(map(tuple, ours))
    for name, digest in baseline:
        if mine.get(name) != digest:
            return name
    known = {name for name, _ in baseline}
    return next((name for name, _ in ours if name not in known), None)


def changed_layers(baseline: list[list[str]], ours: list[list[str]]) -> set[str]:
    """The captured MLX layers whose bits differ from the baseline's (or that only one of them has)."""
    return {name for name, _ in set(map(tuple, baseline)) ^ set(map(tuple, ours))}


def judge_run(entry: dict[str, Any] | None, baseline: list[list[str]], reproducible: bool,
              failure: str) -> dict[str, Any]:
    """One run of one mutant: status and what tells it (see the module docstring)."""
    if entry is None:
        return {"status": "crashed", "reason": failure}
    if "error" in entry:
        return {"status": "crashed", "reason": entry["error"], "traceback": entry.get("traceback")}
    changed = first_changed(baseline, entry["digests"])
    out = {k: entry.get(k) for k in ("verdict", "first_divergence", "failure", "seconds")}
    out["first_changed"] = changed
    moved = changed_layers(baseline, entry["digests"])
    out["closest"] = closest([m for m in entry.get("margins") or [] if m["mlx_layer"] in moved])
    crash = entry.get("crash")
    missing = entry.get("failure_metric") == "presence"
    if entry["verdict"] == "FAIL" and not (crash and missing):
        layer = entry.get("first_divergence_mlx")
        out.update(status="killed", localised=(layer == changed) if layer else None)
    elif crash:
        out.update(status="crashed", reason=f"{crash['side']} raised {crash['error']} after {crash['after'] or 'no layer'}")
    elif changed is None and reproducible:
        out["status"] = "equivalent"
    else:
        out["status"] = "survived"
    return out


def judge(result: dict[str, Any], baseline: dict[str, Any], labels: Sequence[str], timeout: float | None) -> dict[str, Any]:
    """Every run of one mutant, and the mutant's status: killed in any run, else crashed in any, else survived in
    any, else equivalent."""
    if result.get("timed_out"):
        failure = f"timeout after {fmt(timeout)} s"
    elif "setup_error" in result:
        failure = result["setup_error"]["error"]
    elif not result.get("loaded"):
        failure = f"the mutated file was not imported (worker exit code {result.get('returncode')})"
    else:
        failure = f"the worker stopped (exit code {result.get('returncode')}): {result.get('log_tail', '')[-300:]}"
    per = {run: judge_run(result.get("runs", {}).get(run) if result.get("loaded") else None,
                          baseline["digests"][run], baseline["reproducible"], failure) for run in labels}
    statuses = [p["status"] for p in per.values()]
    status = next(s for s in ("killed", "crashed", "survived", "equivalent") if s in statuses)
    chosen = next(p for p in per.values() if p["status"] == status)
    return {"status": status, "runs": per, "timed_out": bool(result.get("timed_out")), "seconds": result.get("wall"),
            **{k: chosen.get(k) for k in ("first_divergence", "failure", "localised", "first_changed", "reason",
                                          "closest")}}


# --- sources ----------------------------------------------------------------------------------------

def label(path: Path) -> str:
    """A file as the pages name it: relative to the current folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def definition_files(component: Any) -> set[Path]:
    """The files defining the component's class and its parents (harness glue, never mutated by default)."""
    files = set()
    for cls in type(component).__mro__:
        try:
            files.add(Path(inspect.getfile(cls)).resolve())
        except TypeError:
            continue
    return files


def declared_sources(component: Any) -> list[Path]:
    """``Component.mutate_sources``: module names, or paths relative to the component's module."""
    found = []
    base = Path(inspect.getfile(type(component))).resolve().parent
    for entry in component.mutate_sources:
        path = base / entry
        if entry.endswith(".py") or path.is_file():
            if not path.is_file():
                raise InputError(f"{component.name}: mutate_sources names {entry!r}, which is not a file ({path})")
            found.append(path)
            continue
        try:
            spec = importlib.util.find_spec(entry)
        except (ImportError, ValueError) as err:
            raise InputError(f"{component.name}: mutate_sources names module {entry!r}, which cannot be found: {err}") from None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise InputError(f"{component.name}: mutate_sources names module {entry!r}, which has no .py source")
        found.append(Path(spec.origin).resolve())
    return found


def choose_sources(component: Any, options: Options, ran: Sequence[str], coverage: dict[str, list[int]]) -> tuple[list[Path], str]:
    """The files to mutate and how they were found (see the module docstring)."""
    covered = {Path(f).resolve() for f, lines in coverage.items() if lines}
    if options.sources:
        files = [Path(p).resolve() for p in options.sources]
        for path in files:
            if path not in covered:
                raise InputError(f"--source {path}: no line of it ran when {component.name} ran; not a source of its MLX side")
        return files, "--source"
    if component.mutate_sources:
        return declared_sources(component), f"{type(component).__name__}.mutate_sources"
    own = definition_files(component)
    files = sorted({Path(f).resolve() for f in ran} - own)
    return files, "project files whose functions ran during the comparison"


# --- one component ------------------------------------------------------------------------------------

def run_baseline(workers: Workers, spec: dict[str, Any], labels: Sequence[str], name: str) -> dict[str, Any]:
    """The unmutated run, twice at once (the first traced): digests, whether they reproduce, coverage, what ran.

    Raises :class:`BaselineFails` when a run does not pass, an input error when the worker reports one.
    """
    traced, again = workers.submit({**spec, "trace": True}, None), workers.submit(spec, None)
    first, second = traced.result(), again.result()
    for result in (first, second):
        if "setup_error" in result:
            error = result["setup_error"]
            if error["input_error"]:
                raise InputError(error["error"])
            raise RuntimeError(f"the {name} worker failed to start: {error['error']}\n{error['traceback']}")
        for label in labels:
            entry = result.get("runs", {}).get(label)
            if entry is None:
                raise RuntimeError(f"the unmutated {name} {label} run stopped (exit code {result.get('returncode')}):\n"
                                   f"{result.get('log_tail', '')}")
            if "error" in entry:
                if entry.get("input_error"):
                    raise InputError(entry["error"])
                raise RuntimeError(f"the unmutated {name} {label} run raised {entry['error']}\n{entry['traceback']}")
            if entry["verdict"] != "PASS":
                why = entry.get("failure") or (entry.get("crash") or {}).get("error") or ""
                again_with = f"--dtype {label}" if label in DTYPES else "--coverage"
                raise BaselineFails(f"the unmutated {name} fails in {label} (first divergence {entry['first_divergence']}"
                                    f"{': ' + why if why else ''}); a mutation score of a failing comparison means "
                                    f"nothing: fix it first (`parity run {name} {again_with}`)")
    digests = {r: first["runs"][r]["digests"] for r in labels}
    reproducible = all(digests[r] == second["runs"][r]["digests"] for r in labels)
    return {"digests": digests, "reproducible": reproducible, "coverage": first.get("coverage", {}),
            "ran": first.get("ran", []), "seconds": max(first["wall"], second["wall"]),
            "runs": {r: {**{k: first["runs"][r].get(k) for k in ("verdict", "layers", "seconds", "calibration")},
                         "closest": closest(first["runs"][r].get("margins") or [])} for r in labels}}


def _executed(mutant: Mutant, coverage: dict[Path, set[int]]) -> bool:
    lines = coverage.get(Path(mutant.file).resolve(), set())
    return any(line in lines for line in range(mutant.line, mutant.end_line + 1))


def _entry(mutant: Mutant) -> dict[str, Any]:
    return {"id": mutant.id, "operator": mutant.operator, "file": label(Path(mutant.file)), "line": mutant.line,
            "function": mutant.function, "original": mutant.original, "replacement": mutant.replacement,
            "change": f"{' '.join(mutant.original.split())} -> {' '.join(mutant.replacement.split())}",
            "summary": mutant.summary(), "diff": mutant.diff}


def summarise(result: dict[str, Any]) -> None:
    """Counts, the kill rate and the per-operator table of a result, from its mutants."""
    done = result["mutants"]
    counts = {s: sum(m["status"] == s for m in done) for s in STATUSES}
    counts["timeouts"] = sum(bool(m.get("timed_out")) for m in done)
    counts["localised"] = sum(m["status"] == "killed" and bool(m.get("localised")) for m in done)
    result["counts"].update(counts, run=len(done), pending=result["counts"]["selected"] - len(done))
    judged = counts["killed"] + counts["survived"]
    result["kill_rate"] = counts["killed"] / judged if judged else None
    table: dict[str, dict[str, int]] = {}
    for m in done:
        table.setdefault(m["operator"], dict.fromkeys(STATUSES, 0))[m["status"]] += 1
    result["by_operator"] = {op: table[op] for op in OPERATORS if op in table}


@dataclass
class Plan:
    """What a component's mutation run covers: its sources, every mutant made, those on lines that ran, the chosen."""

    files: list[Path]
    found_by: str
    everything: list[Mutant]
    executed: list[Mutant]
    chosen: list[Mutant]


def plan(component: Any, options: Options, base: dict[str, Any]) -> Plan:
    """Sources, mutants and the selection, from the traced baseline."""
    coverage = {Path(f).resolve(): set(lines) for f, lines in base["coverage"].items()}
    files, found_by = choose_sources(component, options, base["ran"], base["coverage"])
    if not files:
        raise InputError(f"{component.name}: no source file of its MLX side found (no project file ran); "
                         "name them with --source or the component's mutate_sources")
    everything = [m for path in files for m in mutants(path, options.operators, label(path))]
    executed = [m for m in everything if _executed(m, coverage)]
    return Plan(files, found_by, everything, executed, select(executed, options.max_mutants))


def new_result(component: Any, options: Options, config: dict[str, Any], runs: list[dict[str, Any]],
               base: dict[str, Any], planned: Plan, timeout: float, jobs: int, worker_threads: int) -> dict[str, Any]:
    """The ``mutations.json`` of a run about to start (mutants are added as they finish)."""
    def count(mutants: list[Mutant], path: Path) -> int:
        return sum(Path(m.file).resolve() == path for m in mutants)

    return {
        "schema": SCHEMA, "kind": "parity-mutate", "component": component.name, "dtypes": list(options.dtypes),
        "runs": [r["label"] for r in runs],
        "seed": options.seed, "config": config, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "versions": versions(),
        "settings": {"max_mutants": options.max_mutants, "timeout": timeout, "jobs": jobs,
                     "worker_threads": worker_threads, "operators": list(options.operators or OPERATORS)},
        "operators": {k: v[0] for k, v in OPERATORS.items()},
        "sources_found_by": planned.found_by,
        "sources": [{"file": label(p), "mutants": count(planned.everything, p), "executed": count(planned.executed, p)}
                    for p in planned.files],
        "baseline": {"reproducible": base["reproducible"], "seconds": base["seconds"], "runs": base["runs"]},
        "counts": {"generated": len(planned.everything), "not_executed": len(planned.everything) - len(planned.executed),
                   "executed": len(planned.executed), "selected": len(planned.chosen)},
        "mutants": [], "complete": False, "interrupted": False,
    }


def reference_bundles(component: Any, options: Options, scratch: Path, progress: Progress) -> list[dict[str, Any]]:
    """The runs each mutant makes, as the gate makes them, with their reference bundles (the only PyTorch runs of
    the whole mutation run): one per dtype and one per coverage cell (float32); each float32 run also with the
    bundle of its second call."""
    from parity import bundle

    plan = [(dtype, dtype, None) for dtype in options.dtypes]
    if options.coverage and "float32" in options.dtypes:
        plan += [(variant(component, cell), "float32", cell) for cell in component.coverage]
    runs = []
    for i, (label, dtype, cell) in enumerate(plan):
        progress.step(f"[{component.name}] reference bundle, {label} (computed once for every mutant)")
        run = {"label": label, "bundle": str(bundle.dump_reference(
            component, scratch / f"bundle{i}", dtype, options.seed, options.config_path, overrides=cell))}
        if dtype == "float32" and component.second_call:
            inputs = component.second_inputs(component.load_config(options.config_path, cell), options.seed)
            run["call2"] = str(bundle.dump_reference(component, scratch / f"bundle{i}-call2", dtype, options.seed,
                                                     options.config_path, overrides=cell, inputs=inputs))
        runs.append(run)
    return runs


def mutate_component(name: str, out_dir: Path, options: Options, progress: Progress = SILENT) -> dict[str, Any]:
    """Run ``parity mutate`` for one component; returns the result written to ``out_dir/<name>/mutations.json``.

    Raises :class:`BaselineFails` when the unmutated component does not pass, an
    :class:`~parity.vocab.InputError` on bad input, and ``KeyboardInterrupt`` after writing what
    finished (``interrupted: true``).
    """
    from parity.bundle import read_manifest

    component = registry.get(name)
    started = time.perf_counter()
    folder = out_dir / component.name
    jobs = options.jobs or threads.available_cores()
    with tempfile.TemporaryDirectory(prefix=f"parity-mutate-{component.name}-") as scratch:
        runs = reference_bundles(component, options, Path(scratch), progress)
        spec = {"component": component.name, "runs": runs,
                "calibration_dir": str(Path(options.calibration_dir).resolve()) if options.calibration_dir else None,
                "component_modules": [str(Path(p).resolve()) for p in options.component_modules],
                "thresholds": [str(Path(p).resolve()) for p in options.thresholds]}
        workers = Workers(jobs, Path(scratch), worker_env(jobs))
        result = None
        try:
            progress.step(f"[{component.name}] the unmutated MLX side against the bundles (traced; and again, "
                          "for bit-reproducibility)")
            base = run_baseline(workers, spec, [r["label"] for r in runs], component.name)
            planned = plan(component, options, base)
            timeout = options.timeout or max(MIN_TIMEOUT, TIMEOUT_FACTOR * base["seconds"])
            config = read_manifest(runs[0]["bundle"])["config"]
            result = new_result(component, options, config, runs, base, planned, timeout, jobs,
                                int(workers.env[threads.ENV_THREADS]))
            if not base["reproducible"]:
                progress.step(f"[{component.name}] warning: two unmutated runs differ bit-wise; no mutant is called "
                              "equivalent (bit-identity would prove nothing)")
            progress.step(f"[{component.name}] {len(planned.chosen)} of {len(planned.executed)} mutants on lines that "
                          f"ran ({len(planned.everything)} made of {len(planned.files)} file(s)); {jobs} at a time, "
                          f"timeout {fmt(timeout)} s")
            _run_mutants(workers, spec, planned.chosen, result, base, timeout, folder, progress)
        except KeyboardInterrupt:
            workers.stop()
            if result is not None:
                result.update(interrupted=True, seconds=round(time.perf_counter() - started, 3))
                _write(folder, result)
            raise
        finally:
            workers.stop()
    result.update(complete=True, seconds=round(time.perf_counter() - started, 3))
    _write(folder, result)
    return result


def _run_mutants(workers: Workers, spec: dict[str, Any], chosen: list[Mutant], result: dict[str, Any],
                 base: dict[str, Any], timeout: float, folder: Path, progress: Progress) -> None:
    copies = workers.scratch / "mutants"
    copies.mkdir()
    pending: dict[Future, Mutant] = {}
    for i, mutant in enumerate(chosen):
        copy = copies / f"{i}_{Path(mutant.file).name}"
        copy.write_text(mutant.source)
        job = {**spec, "mutant": {"file": str(Path(mutant.file).resolve()), "mutant": str(copy)}}
        pending[workers.submit(job, timeout)] = mutant
    order = {m.id: i for i, m in enumerate(chosen)}
    summarise(result)
    _write(folder, result, html=False)
    with progress.counter(f"[{result['component']}] mutants", total=len(chosen), unit="mutant") as count:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                mutant = pending.pop(future)
                entry = {**_entry(mutant), **judge(future.result(), base, result["runs"], timeout)}
                result["mutants"].append(entry)
                result["mutants"].sort(key=lambda m: order[m["id"]])
                summarise(result)
                _write(folder, result, html=False)
                count(mutant.id)
                progress.step(f"[{result['component']}] {result['counts']['run']}/{len(chosen)} {entry['status']:<10} "
                              f"{mutant.id}{_detail(entry)}")


def _detail(entry: dict[str, Any]) -> str:
    if entry["status"] == "killed":
        where = "" if entry.get("localised") is None else (" (the first layer it changed)" if entry["localised"]
                                                           else f" (first changed {entry.get('first_changed')})")
        return f": first divergence {entry.get('first_divergence')}{where}"
    if entry["status"] == "crashed":
        return f": {str(entry.get('reason'))[:120]}"
    if entry["status"] == "survived":
        near = entry.get("closest") or {}
        return (f": changed from {entry.get('first_changed')}; nearest a limit {near.get('layer')} {near.get('metric')} at "
                f"{fmt(near.get('ratio'))} of its limit" if near else f": changed from {entry.get('first_changed')}")
    return ""


def _write(folder: Path, result: dict[str, Any], html: bool = True) -> None:
    write_json(folder / "mutations.json", result)
    if html:
        mutate_page.write_page(folder / "mutations.html", result)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The terminal summary of one component: kill rate with counts, then each survivor."""
    c = result["counts"]
    rate = result.get("kill_rate")
    head = (f"{result['component']}: kill rate {fmt(100 * rate) + '%' if rate is not None else '-'} "
            f"({c['killed']} killed / {c['killed'] + c['survived']} non-equivalent, {c['survived']} survived); "
            f"{c['equivalent']} equivalent, {c['crashed']} crashed ({c['timeouts']} timeouts); "
            f"{c['run']} of {c['executed']} mutants on lines that ran ({c['generated']} made), "
            f"{', '.join(result['runs'])}, {fmt(result.get('seconds'))} s")
    if result.get("interrupted"):
        head += " [interrupted]"
    lines = [head]
    for m in result["mutants"]:
        if m["status"] == "survived":
            lines.append(f"  survived {m['id']}: {m['summary']}{_detail(m)}")
    return lines
