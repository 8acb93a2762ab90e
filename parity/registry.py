"""Where components come from: this package, installed packages, and the user's own files.

1. ``parity/components/*.py``: each module defines ``COMPONENT`` (or a list ``COMPONENTS``);
2. the entry-point group ``parity.components`` of any installed package (an entry point names
   a module, a component instance or a list of them);
3. ``--component-module path/to/file.py`` on any command, the pytest plugin option of the same
   name, or ``PARITY_COMPONENT_MODULES`` (paths separated by ``os.pathsep``): a file defining
   ``COMPONENT`` / ``COMPONENTS``, loaded as a module (its folder goes on ``sys.path``, so it
   can import its neighbours).

Two components with one name is an error naming both sources. Component modules must not import
PyTorch at import time (``parity compare`` against a bundle runs without it).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator

from parity.component import Component
from parity.vocab import InputError

ENTRY_POINT_GROUP = "parity.components"
ENV_MODULES = "PARITY_COMPONENT_MODULES"


class UnknownComponentError(InputError):
    def __str__(self) -> str:
        return f"unknown component {self.args[0]!r}; available: {', '.join(available())}"


_components: dict[str, Component] | None = None
_sources: dict[str, str] = {}
_files: list[Path] = []


def provided(obj: Any, kind: type, names: tuple[str, str]) -> list[Any]:
    """The ``kind`` instances ``obj`` provides: itself, those of a list, or a module's ``names``
    (one instance, a list of them: ``("COMPONENT", "COMPONENTS")``)."""
    if isinstance(obj, kind):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [found for item in obj for found in provided(item, kind, names)]
    if isinstance(obj, ModuleType):
        one, many = names
        return provided(getattr(obj, one, None), kind, names) + provided(getattr(obj, many, None) or [], kind, names)
    return []


def load_provided(path: str | Path, option: str, kind: type, names: tuple[str, str]) -> list[Any]:
    """Import a user's file given with ``option`` and return the ``kind`` instances it provides (none: an input error)."""
    path = Path(path).resolve()
    found = provided(import_file(path, option), kind, names)
    if not found:
        raise InputError(f"{option} {path}: defines no {names[0]} (a {kind.__module__}.{kind.__qualname__} instance) "
                         f"or {names[1]} list")
    return found


#: What a component module defines.
_NAMES = ("COMPONENT", "COMPONENTS")


def _found_in(obj: Any) -> list[Component]:
    """The components a module, an instance or a list of instances provides."""
    return provided(obj, Component, _NAMES)


def _add(registry: dict[str, Component], component: Component, source: str) -> None:
    if not component.name:
        raise InputError(f"{source}: component {type(component).__name__} has no name")
    if component.name in registry and registry[component.name] is not component:
        raise InputError(f"component {component.name!r} is defined twice: in {_sources[component.name]} and in {source}")
    registry[component.name] = component
    _sources[component.name] = source


def import_file(path: str | Path, option: str = "--component-module") -> ModuleType:
    """Import a user's Python file as a module (its folder goes on ``sys.path``); errors name ``option`` and the file."""
    path = Path(path).resolve()
    if not path.is_file() or path.suffix != ".py":
        raise InputError(f"{option} {path}: expected an existing .py file")
    name = f"parity_user_modules.{path.stem}_{abs(hash(str(path))) % 10**8}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's file: name it
        sys.modules.pop(name, None)
        raise InputError(f"{option} {path}: importing it failed: {type(err).__name__}: {err}") from err
    return module


def load_file(path: str | Path) -> list[Component]:
    """Import a component file (``--component-module``) and return what it defines."""
    return load_provided(path, "--component-module", Component, _NAMES)


def use_files(paths: Iterable[str | Path]) -> None:
    """Add component files to the registry (``--component-module``)."""
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in _files:
            continue
        found = load_file(resolved)
        _files.append(resolved)
        if _components is not None:
            for component in found:
                _add(_components, component, str(resolved))


@contextmanager
def scoped() -> Iterator[None]:
    """Forget, on leaving the block, the component files registered inside it (the registry is
    process-wide: one command per process; tests and in-process plugin sessions need this)."""
    global _components
    saved = (list(_files), dict(_sources), dict(_components) if _components is not None else None)
    try:
        yield
    finally:
        _files[:], sources, _components = saved
        _sources.clear()
        _sources.update(sources)


def _discover() -> dict[str, Component]:
    registry: dict[str, Component] = {}
    import parity.components as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue  # shared definitions, not components
        module = importlib.import_module(f"parity.components.{info.name}")
        for component in _found_in(module):
            _add(registry, component, module.__name__)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin package: name it
            raise InputError(f"entry point {entry.name!r} ({entry.value}) of group {ENTRY_POINT_GROUP} failed to load: "
                             f"{type(err).__name__}: {err}") from err
        for component in _found_in(loaded):
            _add(registry, component, f"entry point {entry.value}")
    env = [p for p in os.environ.get(ENV_MODULES, "").split(os.pathsep) if p]
    for path in [*_files, *(Path(p).resolve() for p in env if Path(p).resolve() not in _files)]:
        for component in load_file(path):
            _add(registry, component, str(path))
    return registry


def _registry() -> dict[str, Component]:
    global _components
    if _components is None:
        _components = _discover()
    return _components


def available() -> list[str]:
    """Names of all registered components, sorted."""
    return sorted(_registry())


def get(name: str | Component) -> Component:
    """The component called ``name`` (a component instance is returned as it is)."""
    if isinstance(name, Component):
        return name
    registry = _registry()
    if name not in registry:
        raise UnknownComponentError(name)
    return registry[name]


def select(names: Iterable[str]) -> list[str]:
    """Component names to run: all for none or ``all``; each checked to exist."""
    names = list(names)
    if not names or names == ["all"]:
        return available()
    for name in names:
        get(name)
    return names
