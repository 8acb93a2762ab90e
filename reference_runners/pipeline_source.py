"""Functions of an installed diffusers pipeline, compiled from its source file without importing it.

The Helios and Wan pipeline modules import ``transformers`` (their text and image encoders) at
module level, and this harness does not install it. The functions the harness needs from them
(``calculate_shift``, ``sample_block_noise``, ``prepare_latents``, ...) use none of it, so their
definitions are taken from the installed pipeline's source, unmodified, and compiled in a
namespace holding only what they use. Methods are compiled as plain functions and called
unbound, on a minimal object holding the attributes they read.

A whole pipeline class (:func:`compile_class`, e.g. ``WanPipeline`` to run its real ``__call__``)
is compiled the same way: its ``class`` statement as written, its bases and every global its
methods read at run time taken from the namespace given.

Annotations are compiled lazily (``from __future__ import annotations``): they name types
(``PipelineImageInput``, ...) that the namespace does not need to hold, and are never evaluated.
Nothing else about the code changes.
"""
from __future__ import annotations

import __future__
import ast
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence


def source_path(module: str) -> Path:
    """The installed source file of ``module``, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{module} is not installed")
    return Path(spec.origin)


def compile_functions(module: str, functions: Sequence[str] = (), methods: Mapping[str, Sequence[str]] | None = None,
                      namespace: Mapping[str, Any] | None = None) -> SimpleNamespace:
    """Module-level ``functions`` and ``methods`` (``{class name: [method, ...]}``) of ``module``'s source.

    Each definition is compiled as written, in one namespace made of ``namespace`` plus the compiled
    functions themselves (so one may call another, e.g. ``prepare_latents`` -> ``retrieve_latents``).
    Returns them by name; a name missing from the source is an error naming the file.
    """
    methods = dict(methods or {})
    path, tree = _parse(module)
    bodies: dict[str, list[ast.stmt]] = {"": tree.body}
    bodies.update({node.name: node.body for node in tree.body
                   if isinstance(node, ast.ClassDef) and node.name in methods})
    found, missing = [], []
    for owner, names in (("", functions), *methods.items()):
        defs = {node.name: node for node in bodies.get(owner, [])
                if isinstance(node, ast.FunctionDef)}
        for name in names:
            if name in defs:
                found.append(defs[name])
            else:
                missing.append(f"{owner}.{name}" if owner else name)
    if missing:
        raise RuntimeError(f"{path}: expected definitions of {missing}, not found in the installed source")
    scope = _exec(path, found, namespace)
    return SimpleNamespace(**{node.name: scope[node.name] for node in found})


def compile_class(module: str, name: str, namespace: Mapping[str, Any]) -> type:
    """The class ``name`` of ``module``'s source, compiled as written in ``namespace`` (its bases, and the
    globals its methods read); a class missing from the source is an error naming the file."""
    path, tree = _parse(module)
    found = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name]
    if not found:
        raise RuntimeError(f"{path}: expected the definition of class {name}, not found in the installed source")
    return _exec(path, found, {"__name__": module, **namespace})[name]


def _parse(module: str) -> tuple[Path, ast.Module]:
    path = source_path(module)
    return path, ast.parse(path.read_text(), str(path))


def _exec(path: Path, definitions: list[ast.stmt], namespace: Mapping[str, Any] | None) -> dict[str, Any]:
    """Run ``definitions`` (nodes of ``path``'s source) in a copy of ``namespace``; returns that namespace."""
    scope = dict(namespace or {})
    code = compile(ast.Module(body=definitions, type_ignores=[]), str(path), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, scope)
    return scope
