"""The interface every compared component implements.

A component pairs a PyTorch reference built on the real diffusers module with an MLX
implementation (ours in ``mlx_impl/``, or a user's port). The runner (:mod:`parity.runner`)
drives it: validate the config, build the reference (random tiny config from a seed, or a real
checkpoint), convert its weights through the port's converter and the strict loader, feed both
sides the same inputs, capture named tensors and hand them to the judge.

A component declares

- ``name``, ``description`` and ``config_model`` (its typed config, :mod:`parity.config`); the
  default config is ``fixtures/configs/<name>.json`` (or ``default_config``, or ``<name>.json``
  next to the module), found along the class hierarchy, so a subclass can reuse its parent's;
- ``keep_fp32``: the module names diffusers keeps in float32 in a bf16 model (its
  ``_keep_in_fp32_modules``), applied to both sides;
- ``alignment`` (reference layer -> MLX layer, adapters, exclusions, :mod:`parity.alignment`)
  and ``mlx_hooks`` (capture by module path for a port without taps, :mod:`parity.capture_mlx`);
- ``views`` (report sections computed from the captures alone: also from a reference bundle)
  and ``extra_runs`` (sections that run the models again, e.g. drift over repeated application);
- ``second_inputs``: what a second call of the same MLX model object sees (state carried between
  calls shows as ``call2/...`` layers); ``coverage``: config overrides the gate also runs.
- ``attention_groups`` (named key ranges whose attention mass is judged per head, when the
  component captures attention maps: ``<attention>/probs`` layers, :mod:`parity.attention`).

Subclasses inherit thresholds (threshold tables of their parents) as well.
"""
from __future__ import annotations

import copy
import importlib
import inspect
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

from parity.alignment import Alignment
from parity.config import ComponentConfig, ConfigError, merge, read_object, validate
from parity.vocab import InputError

if TYPE_CHECKING:
    from parity.capture import Capture
    from parity.capture_mlx import MlxHooks
    from parity.compare import Comparison
    from parity.thresholds import Thresholds

CONFIG_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "configs"


@dataclass
class Section:
    """An extra block of a run report: artifact metrics, drift curves, per-frame errors, ...

    ``kind`` tells renderers how to draw ``data``:
      - ``"curves"``: ``{"x": [...], "series": {label: [float, ...]}, "xlabel": str, "ylabel": str, "log": bool}``
      - ``"table"``: ``{"columns": [...], "rows": [[...], ...]}``
      - ``"heatmap"``: ``{"rows": [label...], "cols": [label...], "values": [[float...]...], "label": str}``
    ``passed`` is None for information only; False fails the run and ``failing`` (a layer or
    step name) becomes the first divergence if no layer diverged earlier. ``culprit`` (teacher
    forcing): the first block or step whose own error, on the reference's input, breaks its limit.
    """

    name: str
    title: str
    kind: str
    data: dict[str, Any]
    passed: bool | None = None
    failing: str | None = None
    note: str = ""
    culprit: str | None = None


@dataclass
class RunContext:
    """Everything a component's sections may need after the main comparison.

    ``reference`` is None in a comparison against a reference bundle (no PyTorch there).
    ``comparison`` holds the judged layers: a section may summarise their verdicts, never re-judge them.
    """

    component: "Component"
    config: Any
    seed: int
    dtype: str
    inputs: dict[str, np.ndarray]
    reference: Any
    mlx_model: Any
    ref: "Capture"
    mlx: "Capture"
    truth: "Capture | None" = None
    thresholds: "Thresholds | None" = None
    extra: dict[str, Any] = field(default_factory=dict)
    comparison: "Comparison | None" = None


class Component(ABC):
    """One comparable unit: a diffusers reference and an MLX implementation of it."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_model: ClassVar[type[ComponentConfig]] = ComponentConfig
    #: Path of the default config when not ``fixtures/configs/<name>.json`` (relative: to the module's folder).
    default_config: ClassVar[str | None] = None
    #: Key prefix of this component's weights inside a full model checkpoint ("" = whole file).
    weights_prefix: ClassVar[str] = ""
    #: Reference layer -> MLX layer rules, adapters and exclusions (identity when empty).
    alignment: ClassVar[Alignment | Mapping[str, Any] | None] = None
    #: Module names diffusers keeps in float32 when loading in bf16 (its ``_keep_in_fp32_modules``): both sides.
    keep_fp32: ClassVar[tuple[str, ...]] = ()
    #: Module of ``reference_runners`` whose ``run`` the default ``run_reference`` calls.
    reference_runner: ClassVar[str] = ""
    #: Attribute of the reference whose weights the component compares (None: the whole reference).
    reference_submodule: ClassVar[str | None] = None
    #: The part of the config a diffusers ``config.json`` given with ``--config`` replaces.
    diffusers_config_key: ClassVar[str | None] = None
    #: The file a diffusers model folder keeps that config in.
    diffusers_config_file: ClassVar[str] = "config.json"
    #: Call the MLX model a second time, on :meth:`second_inputs`, in float32 runs (``call2/...`` layers).
    second_call: ClassVar[bool] = True
    #: The coverage matrix: config overrides, one per cell, each run in float32 by the gate (and
    #: ``parity run --coverage``) as a variant ``name[key=value]``: code paths the default config
    #: never takes (first steps, one frame, odd sizes, the ends of a table, history off).
    coverage: ClassVar[tuple[Mapping[str, Any], ...]] = ()
    #: Capture by module path (a port without taps); None: our ``mlx_impl.taps``.
    mlx_hooks: ClassVar["MlxHooks | None"] = None
    #: Reference submodules (globs, in the state dict's namespace) whose outputs the reference records,
    #: and their layer names: what ``MlxHooks(derive=True)`` matches the port's converter against.
    reference_layers: ClassVar[Mapping[str, str]] = {}

    # --- identity and configuration -----------------------------------------------------------
    def lineage(self) -> list[str]:
        """This component's name and those of the components it subclasses (for inherited thresholds)."""
        names = [cls.__dict__["name"] for cls in type(self).__mro__ if cls.__dict__.get("name")]
        return list(dict.fromkeys(names))

    def aligned(self) -> Alignment:
        return Alignment.of(self.alignment)

    def default_config_path(self) -> Path:
        """The default config, looked up along the class hierarchy (a renamed subclass finds its parent's)."""
        tried = []
        for cls in type(self).__mro__:
            name = cls.__dict__.get("name")
            if not name and not cls.__dict__.get("default_config"):
                continue
            module_dir = Path(inspect.getfile(cls)).resolve().parent
            own = cls.__dict__.get("default_config")
            candidates = [module_dir / own] if own else [CONFIG_DIR / f"{name}.json", module_dir / f"{name}.json"]
            for path in candidates:
                tried.append(str(path))
                if path.is_file():
                    return path
        raise ConfigError(f"{self.name}: no default config; looked for {', '.join(tried) or 'nothing'}")

    def load_config(self, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Any:
        """The validated config: the default, then a user's file, then ``overrides`` (see :mod:`parity.config`).

        A user's file is a whole component config (a JSON object with the default's keys), or,
        for components that set ``diffusers_config_key``, a diffusers config (file, or the model
        folder holding ``diffusers_config_file``) that replaces that part of the default.
        """
        default_path = self.default_config_path()
        sources: dict[str, Any] = {str(default_path): read_object(default_path, f"{self.name} default config")}
        data = sources[str(default_path)]
        if path is not None:
            path = Path(path)
            if path.is_dir() and self.diffusers_config_key:
                path = path / self.diffusers_config_file
            user = read_object(path, f"{self.name} config")
            key = self.diffusers_config_key
            if key and key not in user:
                user = {key: user}  # a diffusers config: replaces the default's diffusers part
                data = {**data, key: {}}
            sources[str(path)] = user
            data = merge(data, user)
        if overrides:
            sources["overrides"] = dict(overrides)
            data = merge(data, overrides)
        return validate(self.config_model, data, sources)

    @abstractmethod
    def make_inputs(self, config: Any, seed: int) -> dict[str, np.ndarray]:
        """Deterministic inputs shared by both sides (float32/float64/int numpy arrays)."""

    def second_inputs(self, config: Any, seed: int) -> dict[str, np.ndarray]:
        """Inputs of the second call (state carried between calls, see :func:`parity.runner.second_call`):
        same shapes, other values. Override to also vary what a port might cache (positions, timesteps)."""
        return self.make_inputs(config, seed + 1)

    # --- reference side (PyTorch, real diffusers modules) -------------------------------------
    @abstractmethod
    def build_reference(self, config: Any, seed: int) -> Any:
        """The diffusers reference, randomly initialised from ``seed`` (float32)."""

    def load_reference(self, config: Any, weights: dict[str, np.ndarray]) -> Any:
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

        In bf16, parameters under ``keep_fp32`` modules stay float32, as diffusers'
        ``from_pretrained(torch_dtype=torch.bfloat16)`` leaves them.
        """
        import torch

        module = copy.deepcopy(reference)
        target = getattr(torch, dtype)
        keep = self.keep_fp32 if dtype == "bfloat16" else ()
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):
                tensor.data = tensor.data.to(target)
        return module

    def run_reference(self, reference: Any, inputs: dict[str, np.ndarray], dtype: str, capture: "Capture") -> None:
        """Run the reference in ``dtype`` on ``inputs``, recording named tensors into ``capture``.

        By default: ``reference_runners.<reference_runner>.run(reference, inputs, torch_dtype, capture)``.
        """
        import torch

        if not self.reference_runner:
            raise InputError(f"{self.name}: set reference_runner or override run_reference")
        runner = importlib.import_module(f"reference_runners.{self.reference_runner}")
        runner.run(reference, inputs, getattr(torch, dtype), capture)

    # --- MLX side -----------------------------------------------------------------------------
    def convert_weights(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The port's whole-state-dict converter (diffusers keys and layouts -> the port's); identity by default.

        Its output goes through the strict loader in :meth:`build_mlx` (missing, unused and
        wrong-shape keys are errors).
        """
        return weights

    @abstractmethod
    def build_mlx(self, config: Any, weights: dict[str, np.ndarray], dtype: str) -> Any:
        """The MLX implementation in ``dtype``, weights (after :meth:`convert_weights`) loaded strictly."""

    @abstractmethod
    def run_mlx(self, model: Any, inputs: dict[str, np.ndarray], dtype: str) -> None:
        """Run the MLX implementation; what it computes is captured by :meth:`mlx_capture`."""

    def run_hooks(self, weights: dict[str, np.ndarray]) -> tuple["MlxHooks | None", Alignment]:
        """This run's MLX hooks and alignment: the declared ones, completed (``MlxHooks(derive=True)``)
        by what the port's weight converter says of ``weights`` (the reference's state dict), see
        :func:`parity.alignment.derive`. Declared hooks and rules win over derived ones."""
        from dataclasses import replace

        from parity.alignment import derive

        hooks, alignment = self.mlx_hooks, self.aligned()
        if hooks is None or not hooks.derive:
            return hooks, alignment
        outputs, rules = derive(self.convert_weights, weights, self.reference_layers)
        taken = {n for names in [*hooks.outputs.values(), *hooks.functions.values()]
                 for n in ([names] if isinstance(names, str) else names)}
        outputs = {m: n for m, n in outputs.items() if m not in hooks.outputs and n not in taken}
        ruled = {r.ref for r in alignment.rules}
        rules = [r for r in rules if r.ref not in ruled and r.ref not in taken]
        return (replace(hooks, outputs={**outputs, **hooks.outputs}),
                Alignment((*alignment.rules, *rules), alignment.exclusions))

    def mlx_capture(self, model: Any, capture: "Capture", hooks: "MlxHooks | None" = None) -> AbstractContextManager:
        """Where the MLX side's tensors come from: ``hooks`` by module path (a port without taps), or our taps."""
        from parity.capture_mlx import record_taps

        return hooks.capture(model, capture) if hooks is not None else record_taps(capture)

    # --- attention maps -----------------------------------------------------------------------
    def attention_groups(self, config: Any) -> dict[str, dict[str, tuple[int, int]]]:
        """Named key ranges of attention map layers, by layer glob: ``{"attn1/probs": {"history": (0, 36)}}``.

        Their mass is reported and judged per head besides the generic ``sink`` and ``first``
        (:mod:`parity.attention`); none by default.
        """
        return {}

    # --- report sections ----------------------------------------------------------------------
    def views(self, run: RunContext) -> list[Section]:
        """Sections computed from the captures alone (also available from a reference bundle)."""
        return []

    def extra_runs(self, run: RunContext) -> list[Section]:
        """Sections that run the models again (drift); not available from a reference bundle."""
        return []

    def has_extra_runs(self) -> bool:
        return type(self).extra_runs is not Component.extra_runs

    def has_views(self) -> bool:
        return type(self).views is not Component.views
