"""Capture tools for MLX ports: our taps, and hooks by module path for a port that has no taps.

- :func:`record_taps`: every ``mlx_impl.taps.tap(name, x)`` inside the block lands in the capture.
- :func:`hook_modules`: the MLX mirror of torch forward hooks. Submodules of an ``mlx.nn.Module``
  selected by path globs (``blocks.*.self_attn``) record their outputs (and optionally their
  first input) under a name template; :func:`scoped` modules or functions open a scope per call
  (``encoder`` -> ``chunk{call}``), so a module called once per chunk, step or block gets one
  name per call.
- :func:`wrap_functions`: the same for plain functions (``"pkg.module:function"`` or
  ``"pkg.module:Class.method"``), for ports that compute in functions.

Nothing here changes a value: outputs are recorded and returned as they are. Hooks exist only
inside the ``with`` block (zero cost otherwise) and are removed on exit, also on exceptions.
A module is hooked by giving the instance a subclass whose ``__call__`` records; a function by
replacing the attribute it is looked up under (a ``from x import f`` copy elsewhere is not seen).
"""
from __future__ import annotations

import importlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from mlx_impl import taps
from parity.capture import CallCounter, Capture, CaptureError, Names, expand, match_pattern, name_for


@contextmanager
def record_taps(capture: Capture) -> Iterator[Capture]:
    """Record every ``tap`` call made inside the block into ``capture``."""
    with taps.recorder(capture.add):
        yield capture


@dataclass(frozen=True)
class MlxHooks:
    """What to capture from an MLX port without editing it (see the module docstring).

    ``outputs`` / ``inputs``: module path glob -> layer name template; ``scopes``: module path glob
    or ``"pkg.module:function"`` -> scope template; ``functions``: ``"pkg.module:function"`` ->
    layer name template of its result. Templates use ``{0}``... for wildcards and ``{call}``; a
    list instead of one template names successive calls (``["attn1/attention", "attn2/attention"]``;
    a call past its end is an error). ``derive``: complete ``outputs`` (and the alignment) from the
    port's weight converter (:meth:`parity.component.Component.run_hooks`).
    """

    outputs: Mapping[str, Names] = field(default_factory=dict)
    inputs: Mapping[str, Names] = field(default_factory=dict)
    scopes: Mapping[str, str] = field(default_factory=dict)
    functions: Mapping[str, Names] = field(default_factory=dict)
    derive: bool = False

    @contextmanager
    def capture(self, model: Any, capture: Capture) -> Iterator[Capture]:
        """Install the hooks on ``model`` (an ``mlx.nn.Module``, or a tuple/list holding one first) and the functions."""
        module_scopes = {k: v for k, v in self.scopes.items() if ":" not in k}
        function_scopes = {k: v for k, v in self.scopes.items() if ":" in k}
        with ExitStack() as stack:
            if self.outputs or self.inputs or module_scopes:
                stack.enter_context(hook_modules(root_module(model), capture, self.outputs, self.inputs, module_scopes))
            stack.enter_context(wrap_functions(capture, self.functions, function_scopes))
            yield capture


def root_module(model: Any) -> Any:
    """The module to hook: ``model`` itself, or the first ``mlx.nn.Module`` of a tuple/list (``build_mlx``
    may return the module with what its call needs, e.g. ``(block, config)``)."""
    import mlx.nn as nn

    if isinstance(model, nn.Module):
        return model
    found = next((m for m in model if isinstance(m, nn.Module)), None) if isinstance(model, (tuple, list)) else None
    if found is None:
        raise CaptureError(f"MLX hooks by module path need an mlx.nn.Module; build_mlx returned {type(model).__name__}")
    return found


def _modules(root: Any) -> dict[str, Any]:
    return {path: module for path, module in root.named_modules() if path}


_SUBCLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` runs the per-instance recorder installed by :func:`hook_modules`."""
    if cls not in _SUBCLASSES:
        def __call__(self, *args, **kwargs):
            return _ACTIVE[id(self)](self, cls.__call__, args, kwargs)
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__})
    return _SUBCLASSES[cls]


_ACTIVE: dict[int, Callable] = {}


@contextmanager
def hook_modules(root: Any, capture: Capture, outputs: Mapping[str, Names], inputs: Mapping[str, Names] | None = None,
                 scopes: Mapping[str, str] | None = None) -> Iterator[Capture]:
    """Record outputs / inputs of the submodules of ``root`` that the globs select; open scopes per call."""
    modules = _modules(root)
    plan: dict[str, dict[str, Any]] = {}
    for kind, patterns in (("output", outputs), ("input", inputs or {}), ("scope", scopes or {})):
        for pattern, template in patterns.items():
            hits = [(path, groups) for path in modules if (groups := match_pattern(pattern, path)) is not None]
            if not hits:
                raise CaptureError(f"MLX model {type(root).__name__} has no submodule {pattern!r}; "
                                   f"its modules include {sorted(modules)[:12]}")
            for path, groups in hits:
                plan.setdefault(path, {})[kind] = (template, groups)
    counter = CallCounter(capture)
    swapped: list[tuple[Any, type]] = []
    try:
        for path, kinds in plan.items():
            module = modules[path]
            _ACTIVE[id(module)] = _recorder(capture, counter, path, kinds)
            swapped.append((module, type(module)))
            module.__class__ = _recording_class(type(module))
        yield capture
    finally:
        for module, cls in swapped:
            module.__class__ = cls
            _ACTIVE.pop(id(module), None)


def _recorder(capture: Capture, counter: CallCounter, path: str, kinds: dict[str, Any]) -> Callable:
    def record(module: Any, call: Callable, args: tuple, kwargs: dict) -> Any:
        scope = None
        if "scope" in kinds:
            template, groups = kinds["scope"]
            scope = expand(template, groups, counter.next(("scope", path)))
            capture._scopes.append(scope)
        try:
            if "input" in kinds and args:
                template, groups = kinds["input"]
                capture.add_tree(name_for(template, groups, counter.next(("in", path)), f"module {path!r}"), args[0])
            output = call(module, *args, **kwargs)
        finally:
            if scope is not None:
                capture._scopes.pop()
        if "output" in kinds:
            template, groups = kinds["output"]
            capture.add_tree(name_for(template, groups, counter.next(("out", path)), f"module {path!r}"), output)
        return output
    return record


def resolve(target: str) -> tuple[Any, str]:
    """``"pkg.module:function"`` / ``"pkg.module:Class.method"`` -> (the object holding it, attribute name)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise CaptureError(f"function {target!r}: expected 'package.module:function'")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise CaptureError(f"function {target!r}: cannot import {module_name}: {err}") from None
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    if owner is None or not callable(getattr(owner, name, None)):
        raise CaptureError(f"function {target!r}: {module_name} has no callable {attr}")
    return owner, name


@contextmanager
def wrap_functions(capture: Capture, outputs: Mapping[str, Names], scopes: Mapping[str, str] | None = None
                   ) -> Iterator[Capture]:
    """Record the results of functions (``outputs``) and open a scope per call (``scopes``)."""
    counter = CallCounter(capture)
    targets: dict[str, dict[str, Any]] = {}
    for kind, table in (("output", outputs), ("scope", scopes or {})):
        for target, template in table.items():
            targets.setdefault(target, {})[kind] = template
    replaced: list[tuple[Any, str, Any]] = []
    try:
        for target, kinds in targets.items():
            owner, name = resolve(target)
            original = vars(owner).get(name, getattr(owner, name))
            wrapper = _wrapped(capture, counter, target, kinds, getattr(owner, name))
            if isinstance(original, (staticmethod, classmethod)):
                wrapper = staticmethod(wrapper)  # getattr gave the function (staticmethod) or the bound method
            replaced.append((owner, name, original))
            setattr(owner, name, wrapper)
        yield capture
    finally:
        for owner, name, original in reversed(replaced):
            setattr(owner, name, original)


def _wrapped(capture: Capture, counter: CallCounter, target: str, kinds: dict[str, Any], function: Callable) -> Callable:
    def call(*args, **kwargs):
        scope = None
        if "scope" in kinds:
            scope = expand(kinds["scope"], (), counter.next(("scope", target)))
            capture._scopes.append(scope)
        try:
            result = function(*args, **kwargs)
        finally:
            if scope is not None:
                capture._scopes.pop()
        if "output" in kinds:
            capture.add_tree(name_for(kinds["output"], (), counter.next(("out", target)), f"function {target!r}"), result)
        return result

    return call
