"""pytest plugin: fixtures and assertions for running parity comparisons inside a test suite.

Installed with the harness (entry point ``parity.pytest_plugin`` in ``pytest11``), so a port's own
tests can::

    import pytest

    @pytest.mark.parity_component("rope")
    def test_rope_matches_diffusers(parity_run, assert_parity):
        result = parity_run(num_frames=3)      # component from the marker; config overrides as kwargs
        assert_parity(result)                  # fails naming the first diverging layer

Listing it in a conftest (``pytest_plugins = ["parity.pytest_plugin"]``) as well is harmless: the
entry point registers it under that same name, so pytest loads it once.

Fixtures
    ``parity_run(component=None, dtype=None, seed=0, **overrides) -> parity.runner.RunResult``
        runs one component (a name, or a ``Component`` instance; default: the test's
        ``parity_component`` marker) in ``dtype`` (default: ``parity_dtype``); ``overrides`` are
        merged into the component's config (an unknown key is an error). Every run of a session
        goes into one run folder under ``parity_report_dir``, named by component and overrides
        (``scheduler[shift=12]-float32``); the report folder is the test's ``parity_report`` user
        property (visible in pytest's own JUnit).
    ``parity_dtype``: from ``--parity-dtype`` (default float32; the summary says what bf16 would
        add); with several (``float32,bfloat16`` or ``all``) every test using it, or ``parity_run``,
        is parametrized over them.
    ``parity_report_dir``: ``--parity-report-dir``, default a temporary folder of the session.
    ``parity_thresholds``: the harness's parity/thresholds.toml, the project's own (``parity.toml`` or
        ``[tool.parity]`` in ``pyproject.toml`` from the rootdir up), then ``--parity-thresholds``.
    ``assert_parity``: :func:`parity.assertions.assert_parity`; its failure message names the first
        diverging layer, the worst metrics and, in one line, the known porting mistake that explains the
        divergence (``parity explain``, advice) or that none does.

Options ``--parity-components=rope,vae`` (only marked tests naming one of those run; unmarked
tests always do), ``--parity-component-module FILE`` (your own components, repeatable; also the
ini option ``parity_component_modules``), ``--parity-hypotheses-module FILE`` (your own entries of the
catalog of porting mistakes; ini ``parity_hypotheses_modules``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

# Rewrite the asserts of the helper module before importing it. (pytest rewrites entry-point
# plugins itself only when installed from a wheel -- not in an editable install.)
pytest.register_assert_rewrite("parity.assertions")
from parity.assertions import assert_parity, explain  # noqa: E402
from parity.vocab import DTYPES, InputError  # noqa: E402

__all__ = ["assert_parity", "explain"]
_RUNS = pytest.StashKey[list]()
_RUN_DIR = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "numerical parity of MLX ports against diffusers (mlx-video-parity)")
    group.addoption("--parity-dtype", default="float32", metavar="DTYPE[,DTYPE]",
                    help="precision(s) for parity_run / parity_dtype: float32, bfloat16, a comma list or all "
                         "(several parametrize the tests; default float32)")
    group.addoption("--parity-components", default=None, metavar="C[,C]",
                    help="run only tests marked parity_component(...) naming one of these (unmarked tests still run)")
    group.addoption("--parity-report-dir", default=None, metavar="DIR",
                    help="where parity_run writes reports (default: a temporary folder of the session)")
    group.addoption("--parity-thresholds", default=None, metavar="FILE",
                    help="thresholds layered over the harness's parity/thresholds.toml and your project's")
    group.addoption("--parity-component-module", action="append", default=[], metavar="FILE",
                    help="a Python file defining COMPONENT(S): your own port's components (repeatable)")
    group.addoption("--parity-hypotheses-module", action="append", default=[], metavar="FILE",
                    help="a Python file defining HYPOTHESIS/HYPOTHESES: your own known porting mistakes for the "
                         "failure message's explanation (repeatable)")
    parser.addini("parity_component_modules", "component files (paths relative to the rootdir)", type="paths",
                  default=[])
    parser.addini("parity_hypotheses_modules", "hypotheses files (paths relative to the rootdir)", type="paths",
                  default=[])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "parity_component(name, ...): the parity component(s) this test checks; "
                                       "selected with --parity-components, default component of parity_run")
    config.stash[_RUNS] = []
    config.stash[_RUN_DIR] = []
    from parity import registry

    from parity.explain import catalog

    files = [*config.getini("parity_component_modules"), *config.getoption("parity_component_module")]
    hypotheses = [*config.getini("parity_hypotheses_modules"), *config.getoption("parity_hypotheses_module")]
    try:
        registry.use_files(files)
        catalog.use_files(hypotheses)
    except InputError as err:
        raise pytest.UsageError(f"parity: {err}") from None


def _dtypes(config: pytest.Config) -> list[str]:
    value = config.getoption("parity_dtype") or "float32"
    items = [v.strip() for v in value.split(",") if v.strip()]
    if items == ["all"]:
        return list(DTYPES)
    bad = [v for v in items if v not in DTYPES]
    if bad or not items:
        raise pytest.UsageError(f"--parity-dtype {value!r}: expected float32, bfloat16, a comma list of them, or all")
    return list(dict.fromkeys(items))


def pytest_report_header(config: pytest.Config) -> str:
    where = config.getoption("parity_report_dir") or "temporary folder"
    selected = config.getoption("parity_components") or "all"
    return f"parity: dtype {','.join(_dtypes(config))}; components {selected}; reports {where}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "parity_dtype" in metafunc.fixturenames:
        dtypes = _dtypes(metafunc.config)
        if len(dtypes) > 1:
            metafunc.parametrize("parity_dtype", dtypes)  # overrides the fixture, for parity_run too


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    option = config.getoption("parity_components")
    marked: dict[pytest.Item, set[str]] = {}
    for item in items:
        names = {name for marker in item.iter_markers("parity_component") for name in marker.args}
        if item.get_closest_marker("parity_component") is not None and not names:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.parity_component needs a component name")
        if names:
            marked[item] = names
    if not option:
        return
    wanted = {w.strip() for w in option.split(",") if w.strip()}
    if "all" in wanted:
        return
    known = set().union(*marked.values())
    unknown = wanted - known
    if unknown:
        from parity import registry

        unknown -= set(registry.available())
        if unknown:
            raise pytest.UsageError(f"--parity-components: unknown component(s) {sorted(unknown)}; "
                                    f"registered: {registry.available()}, marked in tests: {sorted(known)}")
    keep, drop = [], []
    for item in items:
        (drop if item in marked and not marked[item] & wanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from parity.dumps import mark_complete, mark_incomplete

    for run_dir in session.config.stash.get(_RUN_DIR, []):
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            mark_incomplete(run_dir, "interrupted")
        else:
            mark_complete(run_dir)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from parity.report import unchecked

    runs = config.stash.get(_RUNS, [])
    if runs:
        folders = sorted({str(Path(r.report_dir).parent) for r in runs if r.report_dir})
        failed = [r for r in runs if r.verdict != "PASS"]
        terminalreporter.write_sep("-", "parity")
        terminalreporter.write_line(f"{len(runs)} parity run(s), {len(failed)} not PASS; reports in {', '.join(folders)}")
        for note in unchecked({r.comparison.dtype for r in runs}):
            terminalreporter.write_line(f"note: {note} (--parity-dtype all runs both)")


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def parity_report_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    option = request.config.getoption("parity_report_dir")
    if option:
        path = Path(option)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("parity-reports")


@pytest.fixture
def parity_dtype(request: pytest.FixtureRequest) -> str:
    return _dtypes(request.config)[0]


@pytest.fixture(scope="session")
def parity_thresholds(request: pytest.FixtureRequest) -> Any:
    from parity import registry, thresholds

    files = [f for f in (thresholds.project_file(request.config.rootpath),
                         request.config.getoption("parity_thresholds")) if f]
    try:
        return thresholds.load(files, known_components=registry.available())
    except InputError as err:
        raise pytest.UsageError(f"parity: {err}") from None


def _session_run_dir(config: pytest.Config, report_dir: Path) -> Path:
    """The session's one run folder (created at its first parity run)."""
    from parity.dumps import new_run_dir

    folders = config.stash[_RUN_DIR]
    if not folders:
        folders.append(new_run_dir(report_dir))
    return folders[0]


@pytest.fixture
def parity_run(request: pytest.FixtureRequest, parity_dtype: str, parity_report_dir: Path,
               parity_thresholds: Any) -> Callable[..., Any]:
    marker = request.node.get_closest_marker("parity_component")
    default = marker.args[0] if marker is not None and marker.args else None

    def run(component: Any = None, dtype: str | None = None, seed: int = 0, **overrides: Any) -> Any:
        from parity.runner import run_component

        component = component if component is not None else default
        if component is None:
            raise TypeError("parity_run: name a component, or mark the test @pytest.mark.parity_component(name)")
        try:
            result = run_component(component, dtype or parity_dtype, seed=seed, out_dir=parity_report_dir,
                                   overrides=overrides or None, thresholds=parity_thresholds,
                                   run_dir=_session_run_dir(request.config, parity_report_dir))
        except InputError as err:  # a bad argument or file: one line, not the harness's traceback
            pytest.fail(f"parity_run: {err}", pytrace=False)
        request.config.stash[_RUNS].append(result)
        request.node.user_properties.append(("parity_report", str(result.report_dir)))
        return result

    return run


@pytest.fixture(name="assert_parity")
def assert_parity_fixture() -> Callable[[Any], None]:
    return assert_parity
