"""Capture tools for the PyTorch reference: values are read where the real code produces them, never recomputed.

- :func:`hook_modules`: forward hooks on submodules selected by path or glob (``blocks.*.attn1``);
- :func:`scoped_modules`: each call of the selected submodules opens a capture scope
  (``blocks.{0}``), so one hook spec serves N repeated blocks;
- :func:`record_calls`: wrap a module-level function (or method) to record its arguments / result
  (and values derived from its arguments: attention maps);
- :func:`trace_locals`: read local variables of functions as they are assigned (values that are
  no module's output: modulation vectors, residual sums).

Call counts are kept per enclosing scope, so "the second attention call" means the second one
inside each block. Everything is restored on exit, also when the forward raises.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

from parity.capture import CallCounter, Capture, CaptureError, Names, expand, match_pattern, name_for


def _select(root: Any, patterns: Mapping[str, Any], what: str) -> list[tuple[str, Any, tuple[str, ...], Any]]:
    """``(path, module, wildcard captures, spec)`` of every submodule of ``root`` each pattern selects."""
    modules = dict(root.named_modules())
    found = []
    for pattern, spec in patterns.items():
        hits = [(path, module, groups) for path, module in modules.items()
                if (groups := match_pattern(pattern, path)) is not None]
        if not hits:
            raise CaptureError(f"reference has no submodule {pattern!r} to {what}")
        found += [(path, module, groups, spec) for path, module, groups in hits]
    return found


@contextmanager
def hook_modules(root: Any, capture: Capture, hooks: Mapping[str, Names], inputs: Mapping[str, Names] | None = None
                 ) -> Iterator[Capture]:
    """Record the outputs (and, for ``inputs``, the first positional input) of submodules of ``root``.

    Keys are module paths or globs (as in ``root.named_modules()``); values a layer-name template
    or a list of names for successive calls. A tuple/list output is recorded element-wise as
    ``name/0``, ``name/1``... A pattern that selects nothing, or more calls than listed names,
    raises :class:`CaptureError`.
    """
    counter = CallCounter(capture)
    handles = []
    depth = len(capture._scopes)
    try:
        for path, module, groups, names in _select(root, hooks, "hook"):
            def hook(_module, _args, output, path=path, groups=groups, names=names):
                capture.add_tree(name_for(names, groups, counter.next(("out", path)), f"submodule {path!r}"), output)
            handles.append(module.register_forward_hook(hook))
        for path, module, groups, names in _select(root, inputs or {}, "hook"):
            def pre_hook(_module, args, path=path, groups=groups, names=names):
                if args:
                    capture.add_tree(name_for(names, groups, counter.next(("in", path)), f"submodule {path!r}"), args[0])
            handles.append(module.register_forward_pre_hook(pre_hook))
        yield capture
    finally:
        for handle in handles:
            handle.remove()
        del capture._scopes[depth:]


@contextmanager
def scoped_modules(root: Any, capture: Capture, scopes: Mapping[str, str]) -> Iterator[Capture]:
    """Each call of a selected submodule opens the scope its template names (``{call}``: its call count)."""
    counter = CallCounter(capture)
    handles = []
    depth = len(capture._scopes)
    try:
        for path, module, groups, template in _select(root, scopes, "scope"):
            def enter(_module, _args, path=path, groups=groups, template=template):
                capture._scopes.append(expand(template, groups, counter.next(path)))

            def leave(_module, _args, _output):
                capture._scopes.pop()
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        yield capture
    finally:
        for handle in handles:
            handle.remove()
        del capture._scopes[depth:]


@contextmanager
def record_calls(owner: Any, name: str, calls: Sequence[Mapping[str, str]], capture: Capture,
                 arg_names: Sequence[str] = (), derived: Mapping[str, Callable[[Mapping[str, Any]], Any]] | None = None
                 ) -> Iterator[None]:
    """Wrap ``owner.<name>`` so its i-th call inside each scope records the values ``calls[i]`` names.

    ``calls[i]`` maps an argument name (from ``arg_names``, positional order, or a keyword),
    ``"out"``, or a key of ``derived`` to a layer name. The original computes the result; the
    wrapper only records. ``derived[key](arguments)`` computes a value from the call's arguments
    (e.g. an attention map from ``dispatch_attention_fn``'s), recorded after the result. Every
    scope that calls it must call it exactly ``len(calls)`` times.
    """
    original: Callable = getattr(owner, name)
    derive = dict(derived or {})
    counter = CallCounter(capture)
    label = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"

    def wrapper(*args, **kwargs):
        index = counter.next(name)
        if index >= len(calls):
            raise CaptureError(f"{label} was called more than the {len(calls)} time(s) expected"
                               + (f" in scope {capture.current_scope!r}" if capture.current_scope else ""))
        bound = {**dict(zip(arg_names, args)), **kwargs}
        for arg, layer in calls[index].items():
            if arg != "out" and arg not in derive:
                capture.add(layer, bound[arg])
        result = original(*args, **kwargs)
        if "out" in calls[index]:
            capture.add_tree(calls[index]["out"], result)
        for key, compute in derive.items():
            if key in calls[index]:
                capture.add(calls[index][key], compute(bound))
        return result

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)
    short = {scope or "(top level)": count for (_key, scope), count in counter.counts.items() if count != len(calls)}
    if not counter.counts or short:
        raise CaptureError(f"{label} was called fewer than the {len(calls)} time(s) expected: {short or 'never'}")


@contextmanager
def trace_locals(specs: Mapping[Any, Mapping[tuple[str, int], str]], capture: Capture) -> Iterator[None]:
    """Record local variables of the frames running the given code objects, as they are assigned.

    ``specs`` maps a code object (``Class.forward.__code__``) to ``{(variable, n): layer}``: the
    n-th assignment of the variable in one call (arguments not counted). Counts are per call, so
    one spec serves every block of a model; several functions are traced at once. Every call must
    assign every variable of its spec, or :class:`CaptureError` (has diffusers changed?).
    """
    problems: list[str] = []
    ran: set[Any] = set()

    def frame_tracer(spec: Mapping[tuple[str, int], str], code: Any, frame: Any) -> Callable:
        seen = dict(frame.f_locals)  # the arguments
        counts: dict[str, int] = defaultdict(int)
        recorded: set[str] = set()

        def on_line(frame, event, _arg):
            if event in ("line", "return"):
                for name, value in frame.f_locals.items():
                    if name in seen and seen[name] is value:
                        continue
                    seen[name] = value
                    counts[name] += 1
                    layer = spec.get((name, counts[name]))
                    if layer is not None:
                        capture.add(layer, value)
                        recorded.add(layer)
            if event == "return":
                missing = sorted(set(spec.values()) - recorded)
                if missing and not frame_raised[0]:
                    problems.append(f"{code.co_qualname} never assigned the locals for {missing}")
            if event == "exception":
                frame_raised[0] = True
            return on_line

        frame_raised = [False]
        return on_line

    def on_call(frame, event, _arg):
        spec = specs.get(frame.f_code)
        if event == "call" and spec is not None:
            ran.add(frame.f_code)
            return frame_tracer(spec, frame.f_code, frame)
        return None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)
    problems += [f"{code.co_qualname} was never called" for code in specs if code not in ran]
    if problems:
        raise CaptureError("; ".join(dict.fromkeys(problems)) + "; has diffusers changed?")
