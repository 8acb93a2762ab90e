"""The interface every compared component implements, and the registry that finds them.

A component pairs a PyTorch reference built on the real diffusers module with our MLX
implementation. The runner (``parity.runner``) drives it: build the reference (random tiny
config from a seed, or a real checkpoint), convert its weights through the strict loader,
feed both sides the same inputs, capture named tensors and compare them.

Each module in ``parity/components/`` defines ``COMPONENT = <Component subclass>()``; the
registry discovers them, so adding a component touches no shared file.
"""
from __future__ import annotations

import copy
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from parity.capture import Capture

CONFIG_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "configs"
DTYPES = ("float32", "bfloat16")


class UnknownComponentError(KeyError):
    def __str__(self) -> str:
        return f"unknown component {self.args[0]!r}; available: {', '.join(available())}"


@dataclass
class Section:
    """An extra block of a run report: artifact metrics, drift curves, per-frame errors, ...

    ``kind`` tells renderers how to draw ``data``:
      - ``"curves"``: ``{"x": [...], "series": {label: [float, ...]}, "xlabel": str, "ylabel": str, "log": bool}``
      - ``"table"``: ``{"columns": [...], "rows": [[...], ...]}``
      - ``"heatmap"``: ``{"rows": [label...], "cols": [label...], "values": [[float...]...], "label": str}``
    ``passed`` is None for information only; False fails the run and ``failing`` (a layer or
    step name) becomes the first divergence if no layer diverged earlier.
    """

    name: str
    title: str
    kind: str
    data: dict[str, Any]
    passed: bool | None = None
    failing: str | None = None
    note: str = ""


@dataclass
class RunContext:
    """Everything a component's extra sections may need after the main comparison."""

    component: "Component"
    config: dict[str, Any]
    seed: int
    dtype: str
    inputs: dict[str, np.ndarray]
    reference: Any
    mlx_model: Any
    ref: "Capture"
    mlx: "Capture"
    truth: "Capture | None" = None
    thresholds: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Component(ABC):
    """One comparable unit: a diffusers reference and our MLX implementation of it."""

    name: str = ""
    description: str = ""
    #: Key prefix of this component's weights inside a full model checkpoint ("" = whole file).
    weights_prefix: str = ""
    #: Reference layer name -> MLX layer name where they differ (identity otherwise).
    alignment: dict[str, str] = {}
    #: Module names diffusers keeps in float32 when loading in bf16 (its ``_keep_in_fp32_modules``).
    keep_fp32_modules: tuple[str, ...] = ()
    #: Module of ``reference_runners`` whose ``run`` the default ``run_reference`` calls.
    reference_runner: str = ""
    #: Attribute of the reference whose weights the component compares (None: the whole reference).
    reference_submodule: str | None = None
    #: The part of the component config a diffusers ``config.json`` given with ``--config`` replaces.
    diffusers_config_key: str | None = None
    #: The file a diffusers model folder keeps that config in.
    diffusers_config_file: str = "config.json"

    # --- configuration and inputs -------------------------------------------------------
    def load_config(self, path: str | Path | None = None) -> dict[str, Any]:
        """The component's config: the tiny default in ``fixtures/configs``, or a user's file.

        A user's file is either a whole component config (a JSON object like the default one), or,
        for components that set ``diffusers_config_key``, a diffusers config (file, or the model
        folder holding ``diffusers_config_file``): that replaces the default's ``diffusers_config_key`` part.
        """
        default = CONFIG_DIR / f"{self.name}.json"
        if path is None:
            return _read_json(default, self.name)
        key = self.diffusers_config_key
        if key is None or (Path(path).is_file() and key in _read_json(Path(path), self.name)):
            return _read_json(Path(path), self.name)
        from parity.weights import read_config

        path = Path(path) / self.diffusers_config_file if Path(path).is_dir() else path
        return {**_read_json(default, self.name),
                key: {k: v for k, v in read_config(path).items() if not k.startswith("_")}}

    @abstractmethod
    def make_inputs(self, config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
        """Deterministic inputs shared by both sides (float32/float64/int numpy arrays)."""

    # --- reference side (PyTorch, real diffusers modules) -------------------------------
    @abstractmethod
    def build_reference(self, config: dict[str, Any], seed: int) -> Any:
        """The diffusers reference, randomly initialised from ``seed`` (float32)."""

    def load_reference(self, config: dict[str, Any], weights: dict[str, np.ndarray]) -> Any:
        """The reference with a real checkpoint's weights loaded strictly into its ``reference_submodule``."""
        from parity.weights import load_torch_strict

        reference = self.build_reference(config, seed=0)
        load_torch_strict(self._weights_module(reference), weights)
        return reference

    def reference_weights(self, reference: Any) -> dict[str, np.ndarray]:
        """The ``reference_submodule``'s state dict as float32 numpy arrays (what a checkpoint would hold)."""
        module = self._weights_module(reference)
        state = module.state_dict() if hasattr(module, "state_dict") else {}
        return {k: v.detach().float().cpu().numpy() for k, v in state.items()}

    def _weights_module(self, reference: Any) -> Any:
        return getattr(reference, self.reference_submodule) if self.reference_submodule else reference

    def cast_reference(self, reference: Any, dtype: str) -> Any:
        """A copy of the reference in ``dtype`` ("float32", "bfloat16" or "float64").

        In bf16, parameters under ``keep_fp32_modules`` stay float32, as diffusers'
        ``from_pretrained(torch_dtype=torch.bfloat16)`` leaves them.
        """
        import torch

        module = copy.deepcopy(reference)
        target = getattr(torch, dtype)
        keep = self.keep_fp32_modules if dtype == "bfloat16" else ()
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):
                tensor.data = tensor.data.to(target)
        return module

    def run_reference(self, reference: Any, inputs: dict[str, np.ndarray], dtype: str, capture: "Capture") -> None:
        """Run the reference in ``dtype`` on ``inputs``, recording named tensors into ``capture``.

        By default: ``reference_runners.<reference_runner>.run(reference, inputs, torch_dtype, capture)``.
        """
        import torch

        runner = importlib.import_module(f"reference_runners.{self.reference_runner}")
        runner.run(reference, inputs, getattr(torch, dtype), capture)

    # --- MLX side -----------------------------------------------------------------------
    @abstractmethod
    def build_mlx(self, config: dict[str, Any], weights: dict[str, np.ndarray], dtype: str) -> Any:
        """Our MLX implementation in ``dtype``, weights converted through ``parity.weights.strict_load``."""

    @abstractmethod
    def run_mlx(self, model: Any, inputs: dict[str, np.ndarray], dtype: str, capture: "Capture") -> None:
        """Run our MLX implementation; its ``tap`` calls land in ``capture``."""

    # --- optional extras ----------------------------------------------------------------
    def sections(self, run: RunContext) -> list[Section]:
        """Extra report sections (artifact metrics, drift, per-frame errors). None by default."""
        return []


def _read_json(path: Path, component: str) -> dict[str, Any]:
    from parity.weights import read_config

    try:
        return read_config(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{component}: {err}") from None


def available() -> list[str]:
    """Names of all registered components, sorted."""
    return sorted(_registry())


def get(name: str) -> Component:
    registry = _registry()
    if name not in registry:
        raise UnknownComponentError(name)
    return registry[name]


_cache: dict[str, Component] | None = None


def _registry() -> dict[str, Component]:
    global _cache
    if _cache is None:
        import parity.components as package

        found: dict[str, Component] = {}
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"parity.components.{info.name}")
            component = getattr(module, "COMPONENT", None)
            if isinstance(component, Component):
                found[component.name] = component
        _cache = found
    return _cache
