"""Functions of an installed diffusers pipeline, compiled from its source file without importing it.

The Helios and Wan pipeline modules import ``transformers`` (their text and image encoders) at
module level, and this harness does not install it. The functions the harness needs from them
(``calculate_shift``, ``sample_block_noise``, ``prepare_latents``, ...) use none of it, so their
definitions are taken from the installed pipeline's source, unmodified, and compiled in a
namespace holding only what they use. Methods are compiled as plain functions and called
unbound, on a minimal object holding the attributes they read.

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
    path = source_path(module)
    tree = ast.parse(path.read_text(), str(path))
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
    scope = dict(namespace or {})
    code = compile(ast.Module(body=found, type_ignores=[]), str(path), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, scope)
    return SimpleNamespace(**{node.name: scope[node.name] for node in found})
