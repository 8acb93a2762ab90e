"""Checkpoint conversion and strict loading shared by the port's models.

A :class:`Rule` maps one or more diffusers keys (templates with ``{i}`` for a block index and
``{p}`` for ``weight``/``bias``) to one port key, concatenating several sources along axis 0
(a fused projection) and then applying a layout transform. :func:`convert` applies a rule
table to a whole state dict and is strict: an unknown key, or a fused group with a member
missing, raises :class:`ConversionError` naming the diffusers keys. :func:`load` is strict the
other way round: every parameter of the model must be filled, with its shape, and nothing else
may be given; a missing parameter is named together with the diffusers key(s) it comes from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(KeyError):
    """A checkpoint that does not fit the port (the message names the keys)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + "$")


def same(array: np.ndarray) -> np.ndarray:
    return array


@dataclass
class Rule:
    """``sources`` (diffusers templates, fused in this order along axis 0) -> ``target`` (port template)."""

    sources: Sequence[str]
    target: str
    transform: Transform = same
    _source_res: list = field(init=False, repr=False)
    _target_re: re.Pattern = field(init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.sources, str):
            self.sources = (self.sources,)
        self._source_res = [_regex(s) for s in self.sources]
        self._target_re = _regex(self.target)

    def match_source(self, key: str) -> tuple[int, dict] | None:
        for member, regex in enumerate(self._source_res):
            m = regex.match(key)
            if m:
                return member, m.groupdict()
        return None

    def diffusers_keys(self, port_key: str) -> list[str] | None:
        m = self._target_re.match(port_key)
        return None if m is None else [s.format(**m.groupdict()) for s in self.sources]


def convert(state: dict[str, np.ndarray], rules: Sequence[Rule], ignore: Sequence[str] = (),
            model: str = "model") -> dict[str, np.ndarray]:
    """The port's state dict for a diffusers one (see the module docstring). Keys starting with
    an ``ignore`` prefix are dropped on purpose (e.g. the VAE decoder for the encoder)."""
    groups: dict[tuple[int, tuple], dict[int, str]] = {}
    unknown = []
    for key in state:
        if key.startswith(tuple(ignore)):
            continue
        for index, rule in enumerate(rules):
            found = rule.match_source(key)
            if found is not None:
                member, names = found
                groups.setdefault((index, tuple(sorted(names.items()))), {})[member] = key
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{model}: {len(unknown)} checkpoint key(s) the port does not know: {sorted(unknown)}")
    out = {}
    for (index, names), members in groups.items():
        rule = rules[index]
        wanted = [s.format(**dict(names)) for s in rule.sources]
        missing = [k for k in wanted if k not in members.values()]
        if missing:
            raise ConversionError(f"{model}: missing checkpoint key(s) {missing}, needed with "
                                  f"{sorted(members.values())} to build {rule.target.format(**dict(names))}")
        arrays = [np.asarray(state[k]) for k in wanted]
        array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        out[rule.target.format(**dict(names))] = rule.transform(array)
    return out


def diffusers_keys(port_key: str, rules: Sequence[Rule]) -> list[str]:
    for rule in rules:
        keys = rule.diffusers_keys(port_key)
        if keys is not None:
            return keys
    return []


def load(model: nn.Module, weights: dict[str, np.ndarray], rules: Sequence[Rule], dtype: mx.Dtype | None = None,
         keep_float32: Sequence[str] = ()) -> nn.Module:
    """Fill every parameter of ``model`` from ``weights`` (port keys), strictly.

    ``dtype`` casts the parameters, except those with a path component in ``keep_float32``.
    """
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    extra = sorted(weights.keys() - expected.keys())
    if missing:
        named = [f"{k} (from {', '.join(diffusers_keys(k, rules)) or '?'})" for k in missing]
        raise ConversionError(f"{type(model).__name__}: {len(missing)} parameter(s) not in the weights: {named}")
    if extra:
        raise ConversionError(f"{type(model).__name__}: {len(extra)} weight(s) the model has no parameter for: {extra}")
    bad = [f"{k}: model {tuple(expected[k].shape)}, weights {tuple(np.shape(weights[k]))}"
           for k in sorted(expected) if tuple(expected[k].shape) != tuple(np.shape(weights[k]))]
    if bad:
        raise ValueError(f"{type(model).__name__}: shape mismatch: {bad}")
    loaded = []
    for key, array in weights.items():
        value = mx.array(np.asarray(array, dtype=np.float32))
        if dtype is not None and not set(key.split(".")) & set(keep_float32):
            value = value.astype(dtype)
        loaded.append((key, value))
    model.load_weights(loaded, strict=True)
    mx.eval(model.parameters())
    return model
