"""``parity bisect``: find the first commit that broke parity (or, ``--find-fix``, that fixed it).

    parity bisect --good v0.3 --bad HEAD --component dit_block --dtype bfloat16
    parity bisect --find-fix --bad v0.3 --good HEAD --component-module tests/my_port_parity.py

The commits searched are the first-parent commits between the two ends. Each tested commit is
checked out into its own temporary ``git worktree`` (the user's working tree, index and branch are
never touched) and checked there with that revision's own code::

    python -m parity run <components> --dtype <dtype> --out <out>/commits/<sha> [--component-module F] [--thresholds F]

run with the worktree first on the import path and every editable install of the current
checkout hidden (:data:`BOOTSTRAP`), so whatever the worktree holds (the harness itself, a port,
a component file) comes from the commit under test, and nothing from the checkout bisect runs
in; an installed harness serves revisions that do not contain one. Relative ``--component-module``
and ``--thresholds`` paths are taken inside each worktree. Exit code 0 marks the commit as
passing, 2 ("usage or input error": e.g. the component does not exist yet) or a timeout marks it
untestable (skipped, like ``git bisect skip``), anything else marks it failing (``--on-crash
skip``: a check that fails without writing any report counts as untestable). Both ends are
tested first: ``--good`` must pass and ``--bad`` must fail.

Writes ``<out>/bisect.json`` and a self-contained ``<out>/bisect.html``: the tested commits with
their verdicts and key metrics, the first bad commit's message and diff stat, a per-layer
comparison of the last good and first bad runs, and a metric trend over the tested commits.
Exit code 0 when one first bad (``--find-fix``: first good) commit was found, 2 otherwise (bad
range, untestable ends, or skips leaving several suspects).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from parity import html_report
from parity.dumps import write_json, write_text
from parity.html_report import cell, column, num_cell
from parity.report import load_report
from parity.vocab import InputError, fmt

GOOD, BAD, SKIP = "good", "bad", "skip"
REGRESSION, FIX = "regression", "fix"
#: How the page names the commit found and the one before it.
WORDS = {REGRESSION: {"first": "First bad commit", "last": "Last good"},
         FIX: {"first": "First good commit (the fix)", "last": "Last bad"}}

#: Runs ``python -m parity`` in a worktree (the current folder) with that revision's code: the
#: worktree first on the import path; paths and editable-install mappings (setuptools finders)
#: that point into the repository bisect was started from (``PARITY_BISECT_HIDE``) removed, so a
#: module that only exists there cannot leak into an older revision. Packages installed from
#: elsewhere (a harness installed into the environment) stay importable.
BOOTSTRAP = """
import os, runpy, sys
tree, hide = os.path.realpath(os.getcwd()), os.path.realpath(os.environ["PARITY_BISECT_HIDE"])
def hidden(path):
    real = os.path.realpath(str(path))
    return real == hide or real.startswith(hide + os.sep)
for finder in list(sys.meta_path) + list(sys.path_hooks):
    module = sys.modules.get(getattr(finder, "__module__", "") or "")
    for table in ("MAPPING", "NAMESPACES"):
        mapping = getattr(module, table, None)
        if isinstance(mapping, dict):
            for name, where in list(mapping.items()):
                paths = where if isinstance(where, list) else [where]
                if any(hidden(p) for p in paths):
                    del mapping[name]
sys.path[:] = [tree] + [p for p in sys.path if p and not hidden(p) and os.path.realpath(p) != tree]
sys.path_importer_cache.clear()
sys.argv[0] = "parity"
runpy.run_module("parity", run_name="__main__", alter_sys=True)
"""
#: Patches longer than this many lines are cut in the HTML (the diff stat is always whole).
PATCH_LINES = 400


class BisectError(InputError):
    """The range cannot be bisected (unknown revision, good not an ancestor of bad, ends not as claimed)."""


# --- the search ----------------------------------------------------------------------------------

def search(commits: Sequence[str], status_of: Callable[[str], str]) -> list[str]:
    """Binary search for the first bad commit among ``commits`` (oldest first).

    The commit before ``commits[0]`` is known good and ``commits[-1]`` is known bad. ``status_of``
    returns good, bad or skip. Returns the suspects: one commit when the first bad commit is
    determined, else the untestable commits that hide it followed by the first known bad one.
    """
    if not commits:
        raise BisectError("no commits between good and bad")
    lo, hi = -1, len(commits) - 1  # last known good index (-1: the good revision), first known bad
    skipped: set[int] = set()
    while True:
        pending = [i for i in range(lo + 1, hi) if i not in skipped]
        if not pending:
            break
        middle = (lo + hi) / 2
        i = min(pending, key=lambda k: (abs(k - middle), k))
        status = status_of(commits[i])
        if status == GOOD:
            lo = i
        elif status == BAD:
            hi = i
        else:
            skipped.add(i)
    return list(commits[lo + 1:hi + 1])


# --- git -----------------------------------------------------------------------------------------

def git(repo: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise BisectError(f"git {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def resolve(repo: Path, rev: str) -> str:
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").strip()
    except BisectError:
        raise BisectError(f"{rev!r} is not a commit in {repo}") from None


def first_parent_range(repo: Path, good: str, bad: str) -> list[str]:
    """First-parent commits after ``good`` up to and including ``bad``, oldest first."""
    if subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", good, bad]).returncode != 0:
        raise BisectError(f"good {good[:12]} is not an ancestor of bad {bad[:12]}")
    commits = git(repo, "rev-list", "--first-parent", "--reverse", f"{good}..{bad}").split()
    if not commits:
        raise BisectError("good and bad are the same commit")
    return commits


def commit_info(repo: Path, commit: str, patch: bool = False) -> dict[str, Any]:
    fmt = "%H%x00%s%x00%an <%ae>%x00%aI%x00%B"
    sha, subject, author, date, message = git(repo, "show", "-s", f"--format={fmt}", commit).split("\x00", 4)
    info = {"commit": sha, "subject": subject, "author": author, "date": date, "message": message.strip()}
    if patch:
        parent = git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^1", check=False).strip()
        base = parent or git(repo, "hash-object", "-t", "tree", "/dev/null").strip()
        info["parent"] = parent or None
        info["diffstat"] = git(repo, "diff", "--stat=120", base, commit).rstrip()
        lines = git(repo, "diff", base, commit).splitlines()
        info["patch"] = "\n".join(lines[:PATCH_LINES])
        info["patch_truncated"] = max(len(lines) - PATCH_LINES, 0)
    return info


# --- testing one commit ----------------------------------------------------------------------------

@dataclass
class CommitCheck:
    """The result of checking one commit."""

    commit: str
    status: str
    returncode: int | None = None
    seconds: float = 0.0
    note: str = ""
    run_dir: str | None = None
    log: str | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Check:
    """How each commit is checked: ``parity run`` with these arguments, within ``timeout`` seconds.

    ``component_modules`` / ``thresholds``: relative paths are taken inside each worktree.
    ``on_crash``: how a check that fails without writing a report counts (bad or skip).
    """

    components: tuple[str, ...] = ()
    dtype: str | None = "all"
    python: str = sys.executable
    timeout: float | None = None
    on_crash: str = BAD
    component_modules: tuple[str, ...] = ()
    thresholds: str | None = None

    def command(self, tree: Path, out: Path) -> list[str]:
        cmd = [self.python, "-c", BOOTSTRAP, "run", *self.components, "--out", str(out), "--quiet"]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        for module in self.component_modules:
            cmd += ["--component-module", str(tree / module) if not Path(module).is_absolute() else module]
        if self.thresholds:
            cmd += ["--thresholds", str(tree / self.thresholds) if not Path(self.thresholds).is_absolute()
                    else self.thresholds]
        return cmd


def drift_end(sections: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The last finite value of each series of a drift section (a ``curves`` section named or titled drift)."""
    ends: dict[str, float] = {}
    for section in sections or []:
        name = f"{section.get('name', '')} {section.get('title', '')}".lower()
        series = (section.get("data") or {}).get("series") if section.get("kind") == "curves" else None
        if "drift" not in name or not isinstance(series, dict):
            continue
        for label, values in series.items():
            finite = [float(v) for v in values or [] if isinstance(v, (int, float)) and math.isfinite(v)]
            if finite:
                ends[f"{section.get('name')}/{label}"] = finite[-1]
    return ends


def summarize(report: dict[str, Any], report_dir: Path, base: Path) -> dict[str, Any]:
    summary = report.get("summary") or {}
    return {
        "component": report.get("component"),
        "dtype": report.get("dtype"),
        "verdict": report.get("verdict"),
        "first_divergence": report.get("first_divergence"),
        "worst_cosine": summary.get("worst_cosine"),
        "max_budget_ratio": summary.get("max_budget_ratio"),
        "failed": summary.get("failed"),
        "layers": summary.get("layers"),
        "drift_end": drift_end(report.get("sections") or []),
        "report_dir": os.path.relpath(report_dir, base),
    }


def run_check(repo: Path, commit: str, out: Path, check: Check, worktrees: Path) -> CommitCheck:
    """Check ``commit`` in a fresh worktree with its own code; reports go to ``out/commits/<sha12>``.

    Exit 0 is good, 2 or a timeout untestable (skip), anything else bad; a failure without any
    report (an exception, a revision without the harness) counts as ``check.on_crash``.
    """
    tree = worktrees / commit[:12]
    commit_out = out / "commits" / commit[:12]
    commit_out.mkdir(parents=True, exist_ok=True)
    git(repo, "worktree", "add", "--detach", "--quiet", str(tree), commit)
    started = time.perf_counter()
    cmd = check.command(tree, commit_out)
    try:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PARITY_BISECT_HIDE": str(repo)}
        env.pop("PYTHONPATH", None)
        try:
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=check.timeout)
            returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as err:
            returncode = None
            stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            stderr = (err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")) + \
                f"\n[bisect] timed out after {check.timeout} s"
    finally:
        git(repo, "worktree", "remove", "--force", str(tree), check=False)
        shutil.rmtree(tree, ignore_errors=True)
    seconds = round(time.perf_counter() - started, 2)
    log = commit_out / "parity-run.log"
    shown = " ".join(c if c != BOOTSTRAP else "<bootstrap: python -m parity>" for c in cmd)
    write_text(log, f"$ {shown}\n[exit {returncode}]\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")
    outcome = CommitCheck(commit, BAD, returncode, seconds, log=os.path.relpath(log, out))
    report_paths = sorted(commit_out.glob("*/*/report.json"))
    if report_paths:  # the newest run folder
        outcome.run_dir = os.path.relpath(report_paths[-1].parent.parent, out)
    for path in report_paths:
        try:
            outcome.reports.append(summarize(load_report(path), path.parent, out))
        except InputError as err:
            outcome.note += f"unreadable report {path.parent.name}: {err}; "
    tail = (stderr.strip().splitlines() or [""])[-1].replace(str(tree), "<worktree>")[:300]
    if returncode == 0:
        outcome.status = GOOD
    elif returncode is None:
        outcome.status, outcome.note = SKIP, f"timed out after {check.timeout} s (cannot test)"
    elif returncode == 2:
        outcome.status, outcome.note = SKIP, f"exit 2, cannot test: {tail}"
    else:
        outcome.status = BAD
        if not outcome.reports:
            outcome.status = check.on_crash
            outcome.note = f"exit {returncode} without a report (crashed?): {tail}"
        elif all(r.get("verdict") == "PASS" for r in outcome.reports):
            outcome.note = f"exit {returncode} although every report passes: {tail}"
    return outcome


# --- the whole bisection ----------------------------------------------------------------------------

def bisect(repo: str | Path, good: str, bad: str, check: Check = Check(), out: str | Path | None = None,
           keep_dumps: bool = False, target: str = REGRESSION, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Bisect between ``good`` and ``bad`` in ``repo``; write ``bisect.json`` and ``bisect.html`` into ``out``.

    ``target`` regression: ``good`` is the older end and the first failing commit is sought;
    fix: ``bad`` is the older end and the first passing commit is sought. Returns the JSON, whose
    ``first_changed`` / ``last_unchanged`` are that commit and the one before it (a regression
    also names them ``first_bad`` / ``last_good``).
    """
    say = progress or (lambda _m: None)
    if target not in (REGRESSION, FIX):
        raise BisectError(f"target: expected {REGRESSION} or {FIX}, got {target!r}")
    repo = Path(git(Path(repo), "rev-parse", "--show-toplevel").strip())
    good_sha, bad_sha = resolve(repo, good), resolve(repo, bad)
    old, new = (good_sha, bad_sha) if target == REGRESSION else (bad_sha, good_sha)
    before, after = (GOOD, BAD) if target == REGRESSION else (BAD, GOOD)
    sought = "first bad commit" if target == REGRESSION else "first good commit (the fix)"
    commits = first_parent_range(repo, old, new)
    out = Path(out) if out else Path("reports") / ("bisect-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    outcomes: dict[str, CommitCheck] = {}
    infos: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    started = time.perf_counter()
    git(repo, "worktree", "prune", check=False)
    worktrees = Path(tempfile.mkdtemp(prefix="parity-bisect-"))
    result: dict[str, Any] = {
        "schema": 2, "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "repo": str(repo),
        "target": target, "good": good_sha, "bad": bad_sha, "components": list(check.components),
        "component_modules": list(check.component_modules), "thresholds": check.thresholds, "dtype": check.dtype,
        "python": check.python, "range": len(commits), "status": "error", "message": "", "first_changed": None,
        "last_unchanged": None, "suspects": [], "tested_order": order,
    }

    def test(commit: str) -> str:
        infos[commit] = commit_info(repo, commit)
        say(f"[bisect] testing {commit[:12]} {infos[commit]['subject'][:60]!r}")
        outcome = run_check(repo, commit, out, check, worktrees)
        outcomes[commit] = outcome
        order.append(commit)
        verdicts = ", ".join(f"{r['component']} {r['dtype']} {r['verdict']}" for r in outcome.reports) or "no report"
        say(f"[bisect]   {outcome.status} ({verdicts}; {outcome.seconds} s){' - ' + outcome.note if outcome.note else ''}")
        return outcome.status

    def changed(commit: str) -> str:
        """The commit's status in search terms: GOOD = as the older end, BAD = as the newer end."""
        status = outcomes[commit].status if commit in outcomes else test(commit)
        return {before: GOOD, after: BAD}.get(status, status)

    try:
        for name, sha, expected in (("good", good_sha, GOOD), ("bad", bad_sha, BAD)):
            status = test(sha)
            if status != expected:
                why = "cannot be tested" if status == SKIP else f"is {status}"
                raise BisectError(f"the {name} revision {sha[:12]} {why}: {outcomes[sha].note or 'see its log'}")
        say(f"[bisect] {len(commits)} commits to search; about {max(math.ceil(math.log2(len(commits))), 0)} steps")
        suspects = search(commits, changed)
        result["suspects"] = suspects
        first = suspects[-1] if len(suspects) == 1 else None
        index = commits.index(suspects[0])
        result["last_unchanged"] = commits[index - 1] if index > 0 else old
        if first:
            result["status"] = "found"
            result["first_changed"] = commit_info(repo, first, patch=True)
            result["message"] = f"{sought}: {first[:12]} {result['first_changed']['subject']}"
        else:
            result["status"] = "ambiguous"
            result["message"] = (f"untestable commits hide the {sought}; it is one of "
                                 f"{', '.join(c[:12] for c in suspects)}")
    except BisectError as err:
        result["status"], result["message"] = "error", str(err)
    finally:
        shutil.rmtree(worktrees, ignore_errors=True)
        git(repo, "worktree", "prune", check=False)
    if target == REGRESSION:
        result["first_bad"], result["last_good"] = result["first_changed"], result["last_unchanged"]
    result["seconds"] = round(time.perf_counter() - started, 1)
    all_commits = [old, *commits]
    result["commits"] = [{**{k: infos[c][k] for k in ("commit", "subject", "author", "date")},
                          "position": position, "tested": order.index(c) + 1,
                          **{k: v for k, v in asdict(outcomes[c]).items() if k != "commit"}}
                         for position, c in enumerate(all_commits) if c in outcomes]
    result["untested"] = len(all_commits) - len(outcomes)
    keep = {result.get("last_unchanged"), (result.get("first_changed") or {}).get("commit")}  # the runs a person opens
    for c in keep:
        for report in outcomes[c].reports if c in outcomes else []:
            try:
                html_report.write_html_report(out / report["report_dir"])
            except Exception as err:  # noqa: BLE001 - the bisection result matters more than a page
                say(f"[bisect] could not render {report['report_dir']}: {err}")
    if not keep_dumps:
        for c, outcome in outcomes.items():
            if c not in keep:
                for report in outcome.reports:
                    for side in ("ref", "mlx", "truth"):
                        shutil.rmtree(out / report["report_dir"] / side, ignore_errors=True)
    write_json(out / "bisect.json", result)
    write_text(out / "bisect.html", render(result, out))
    if (out.parent / html_report.INDEX_NAME).is_file():  # e.g. reports/bisect-<time>: list it in reports/index.html
        html_report.write_index(out.parent)
    say(f"[bisect] {result['message']}")
    say(f"[bisect] report: {out / 'bisect.html'}")
    return result


# --- the HTML page -------------------------------------------------------------------------------------

def _key(report: dict[str, Any]) -> str:
    return f"{report.get('component')} {report.get('dtype')}"


def layer_comparison(good_dir: Path, bad_dir: Path) -> dict[str, Any]:
    """Rows of one component's reports before and after the change (last unchanged, first changed), layer by layer."""
    good, bad = load_report(good_dir), load_report(bad_dir)
    good_rows = {r.get("layer"): r for r in good.get("layers") or []}
    bad_rows = {r.get("layer"): r for r in bad.get("layers") or []}
    names = [r.get("layer") for r in bad.get("layers") or []]
    names += [n for n in good_rows if n not in bad_rows]
    metrics = [("cosine", "cos"), ("max_abs", "g"), ("budget_ratio", "g")]
    present = [(k, s) for k, s in metrics if any(k in r for r in [*good_rows.values(), *bad_rows.values()])]
    columns = [column("layer")] + [column("verdict before"), column("verdict after")]
    for key, _style in present:
        label = key.replace("_", " ")
        columns += [column(f"{label} before", True), column(f"{label} after", True)]
    rows = []
    for name in names:
        g, b = good_rows.get(name, {}), bad_rows.get(name, {})
        gv, bv = g.get("verdict", "absent"), b.get("verdict", "absent")
        cells = [cell(name, cls="layer"), cell(gv, badge=gv if gv in ("PASS", "FAIL") else "INFO"),
                 cell(bv, badge=bv if bv in ("PASS", "FAIL") else "INFO")]
        for key, style in present:
            cells += [num_cell(g.get(key), style), num_cell(b.get(key), style, bad=bv == "FAIL" and gv != bv)]
        cls = " ".join(c for c, on in (("changed", gv != bv), ("first", name == bad.get("first_divergence"))) if on)
        rows.append({"cls": cls, "id": "", "cells": cells})
    return {"id": "", "columns": columns, "rows": rows, "first_divergence": bad.get("first_divergence")}


def render(result: dict[str, Any], out: Path) -> str:
    """The HTML page of a bisection (see the module docstring)."""
    from parity import plots

    commits = sorted(result.get("commits") or [], key=lambda c: c["position"])
    first_bad = (result.get("first_changed") or {}).get("commit")
    last_good = result.get("last_unchanged")
    has_drift = any(r.get("drift_end") for c in commits for r in c.get("reports") or [])
    columns = [column("#", True, "position on the first-parent chain (0 = good)"),
               column("tested", True, "the order commits were checked in"), column("commit"), column("subject"),
               column("status"), column("run"), column("verdict"), column("worst cosine", True),
               column("first divergence"), column("max budget ratio", True)]
    if has_drift:
        columns.append(column("drift end"))
    rows = []
    for c in commits:
        reports = c.get("reports") or [{}]
        role = " (good)" if c["commit"] == result["good"] else (" (bad)" if c["commit"] == result["bad"] else "")
        for n, r in enumerate(reports):
            if r.get("report_dir"):
                html = out / r["report_dir"] / "report.html"
                link = html_report._rel(html if html.is_file() else out / r["report_dir"] / "report.json", out)
                run = cell(_key(r), cls="nowrap", href=link)
            else:
                run = cell("log", href=c.get("log") or "")
            classes = ["run-start"] if n == 0 else []
            if c["commit"] == first_bad:
                classes.append("first")
            if c["status"] == "bad":
                classes.append("fail")
            subject = cell(c["subject"] if n == 0 else "")
            subject["meta"] = c.get("note", "") if n == 0 else ""
            row = [cell(c["position"], str(c["position"]), "num"),
                   cell(c["tested"], str(c["tested"]), "num", title=f"{c.get('seconds')} s"),
                   cell(c["commit"][:12] + role, cls="mono nowrap", title=c["commit"]), subject,
                   cell(c["status"], badge=c["status"]), run,
                   cell(r.get("verdict", "–"), badge=r.get("verdict", "")) if r else cell("–"),
                   num_cell(r.get("worst_cosine"), "cos"), cell(r.get("first_divergence") or "–", cls="layer"),
                   num_cell(r.get("max_budget_ratio"))]
            if has_drift:
                row.append(cell(", ".join(f"{k} {fmt(v)}" for k, v in (r.get("drift_end") or {}).items()) or "–"))
            rows.append({"cls": " ".join(classes), "id": f"c-{c['commit'][:12]}" if n == 0 else "", "cells": row})
    tested_table = {"id": "commits", "columns": columns, "rows": rows}

    # metric trends over the tested commits, one line per component run (and drift series)
    labels = [c["commit"][:8] for c in commits]
    statuses = [c["status"] for c in commits]

    def series(values_of: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, list[Any]]:
        """Each line ``values_of`` names in a report, by tested commit (None where absent); lines never set are left out."""
        per_commit = []
        for c in commits:
            values: dict[str, Any] = {}
            for r in c.get("reports") or []:
                for key, value in values_of(r).items():
                    values.setdefault(key, value)
            per_commit.append(values)
        keys = sorted({key for values in per_commit for key, value in values.items() if value is not None})
        return {key: [values.get(key) for values in per_commit] for key in keys}

    trends = []
    for data, ylabel, title in (
            (series(lambda r: {_key(r): None if r.get("worst_cosine") is None else 1.0 - float(r["worst_cosine"])}),
             "1 − worst cosine", "Worst cosine deficit per tested commit (tick colour: good / bad / skipped)"),
            (series(lambda r: {_key(r): r.get("max_budget_ratio")}), "max budget ratio", "Max precision-budget ratio"),
            (series(lambda r: {f"{_key(r)} {k}": v for k, v in (r.get("drift_end") or {}).items()}),
             "drift end point", "Drift end point")):
        if data:
            trends.append(plots.trend_plot(labels, data, statuses, ylabel, title))

    # last good vs first bad, per component run
    comparisons = []
    by_commit = {c["commit"]: c for c in commits}
    if first_bad and last_good in by_commit and first_bad in by_commit:
        good_reports = {_key(r): r for r in by_commit[last_good].get("reports") or []}
        for r in by_commit[first_bad].get("reports") or []:
            g = good_reports.get(_key(r))
            entry = {"key": _key(r), "verdict_good": g.get("verdict") if g else "absent", "verdict_bad": r.get("verdict"),
                     "table": None, "note": "", "good_link": "", "bad_link": ""}
            if g is None:
                entry["note"] = "Not run at the last good commit."
            else:
                try:
                    entry["table"] = layer_comparison(out / g["report_dir"], out / r["report_dir"])
                except ValueError as err:
                    entry["note"] = str(err)
                for side, rep in (("good_link", g), ("bad_link", r)):
                    html = out / rep["report_dir"] / "report.html"
                    entry[side] = html_report._rel(html, out) if html.is_file() else ""
            comparisons.append(entry)

    info = result.get("first_changed") or {}
    status = result.get("status")
    return html_report._env().get_template("bisect.html.j2").render(
        b=result, banner="FAIL" if status == "found" else "UNKNOWN", info=info, tested_table=tested_table,
        trends=trends, comparisons=comparisons, generated=html_report._now(),
        last_good=(last_good or "")[:12], first_bad=(first_bad or "")[:12],
        words=WORDS[result.get("target", REGRESSION)],
        suspects=[by_commit.get(s, {"commit": s, "subject": ""}) for s in result.get("suspects") or []],
        components=", ".join(result.get("components") or []) or "all")
