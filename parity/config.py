"""Typed component configs, validated once at the boundary.

Each component declares a :class:`ComponentConfig` subclass (pydantic): every key it reads,
with its type, range and default. A config is assembled from the component's default file
(``fixtures/configs/<name>.json``, found along the class hierarchy), a user's file
(``--config``: a whole component config, or a diffusers ``config.json`` that replaces the
component's diffusers part) and keyword overrides, then validated in one go. An unknown key,
a value of the wrong type or out of range is a :class:`ConfigError` naming where it came from,
the key, the value and what was expected -- before anything runs or is written.

The part of a config that is a diffusers model's own config (``transformer``, ``vae``,
``scheduler``) is a :class:`DiffusersConfig`: it declares the keys the harness reads, with
diffusers' defaults, and accepts any other key the diffusers class's constructor takes (a real
``config.json`` has them all); a key the class does not take is an error too.
"""
from __future__ import annotations

import copy
import importlib
import inspect
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from parity.vocab import InputError, load_json


class ConfigError(InputError):
    """A component config that does not validate."""


class ComponentConfig(BaseModel):
    """Base of every component config: unknown keys are errors, values are typed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON data (what reports, bundles and baselines record)."""
        return self.model_dump(mode="json")


class DiffusersConfig(BaseModel):
    """A diffusers model's config: the declared keys typed, any other key the diffusers class takes kept."""

    model_config = ConfigDict(extra="allow", frozen=True)
    #: ``module:Class`` of the diffusers class whose constructor defines the allowed keys.
    diffusers_class: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = {k: v for k, v in data.items() if not str(k).startswith("_")}  # _class_name, _diffusers_version
        allowed = _constructor_keys(cls.diffusers_class)
        if allowed is not None:
            unknown = sorted(k for k in data if k not in allowed and k not in cls.model_fields)
            if unknown:
                raise ValueError(f"unknown key(s) {unknown} for {cls.diffusers_class.split(':')[-1]}")
        return data

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@cache
def _constructor_keys(target: str) -> frozenset[str] | None:
    """The keyword parameters of a diffusers class's constructor; None when diffusers is not importable."""
    if not target:
        return None
    module_name, _, name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except ImportError:
        return None
    params = inspect.signature(cls.__init__).parameters
    return frozenset(p for p in params if p != "self")


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``; nested dicts are merged key by key, everything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object."""
    data = load_json(path, what)
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object, got a {type(data).__name__}")
    return data


def validate(model: type[ComponentConfig], data: Any, sources: Mapping[str, Any]) -> ComponentConfig:
    """``model.model_validate(data)``; a failure is one :class:`ConfigError` line naming key, value and source.

    ``sources`` maps a description (a file path, ``"overrides"``) to the data it contributed, so
    the message can say where the offending key came from (the last source that set it).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a JSON object, got a {type(data).__name__}")
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError("; ".join(_describe(e, sources) for e in err.errors()[:3])) from None


def _describe(error: dict[str, Any], sources: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    where = next((name for name, data in reversed(list(sources.items())) if _has(data, loc)), None)
    if where is None:
        where = next(iter(sources), "config")
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown config key {key!r} (expected one of the component's keys; see its default config)"
    if error["type"] == "missing":
        return f"{where}: config key {key!r} is missing"
    if not key:
        return f"{where}: {message}"
    if error["type"] == "value_error":
        return f"{where}: config key {key!r}: {message}"
    return f"{where}: config key {key!r}: {message} (got {error.get('input')!r})"


def _has(data: Any, loc: list[str]) -> bool:
    for part in loc:
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True


# --- field types every component config uses ---------------------------------------------------
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0)]
NonNegativeFloat = Annotated[float, Field(strict=True, ge=0)]
Bool = StrictBool
Triple = tuple[PositiveInt, PositiveInt, PositiveInt]
