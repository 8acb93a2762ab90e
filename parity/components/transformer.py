"""What the whole-transformer components share: precision modes, streamed block weights, teacher forcing, depth curves.

Layers: ``patch_embedding``, ``rope``, (Helios) ``history/{short,mid,long}`` and their ``/rope``,
``tokens`` (block 0's input), ``condition_embedder/{t0,main}/...``, ``blocks.{i}/<sublayer>``
(the block component's names), ``norm_out``, ``norm_out/modulated``, ``proj_out``, ``unpatchify``.

Sections:

- ``depth`` (a view): per block, the block output's relative error, 1 - cosine, bf16 budget ratio
  and high-frequency energy ratio (ours / reference's, :mod:`parity.drift`), so a deep model
  reads at a glance;
- ``teacher_forcing`` (an extra run): every block i of ours run again on the *reference's*
  input to block i (and its text, timestep projection and RoPE), judged against the
  reference's block i output by the same rules as any layer (:class:`parity.compare.Judge`);
  in bf16 against the float64 reference block on that same input, next to the reference's own
  bf16 error. In a deep model every block after a real divergence also diverges free-running
  (*inherited* error); the first block whose *local* error breaks its limit is the
  ``culprit``. ``teacher_forcing_blocks`` tabulates both per block.

Config ``stream`` as the block component's: ``"model"`` (diffusers' bf16 model) or ``"float32"``
(mixed precision: the float32 reference under autocast, float32 stream; ours with bf16 Linear
and patch weights). ``stream_weights`` keeps one block's weights in memory at a time on both
sides (weights of block i from ``checkpoint``, a safetensors file or folder read memory-mapped,
or drawn from the seed per block), for models that do not fit (``fixtures/configs/wan_transformer_14b.json``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import mlx.core as mx
import numpy as np
from pydantic import Field

from fixtures.inputs import normal, rng
from mlx_impl import transformer as mlx_transformer
from mlx_impl.taps import muted, tap_scope
from parity import drift, teacher_forcing
from parity.capture import Capture
from parity.compare import FAIL, Judge, judge_tensors
from parity.component import Component, RunContext, Section
from parity.components.block import bf16_exact
from parity.config import Bool, ComponentConfig, NonNegativeFloat, PositiveFloat, PositiveInt
from parity.metrics import tensor_metrics
from parity.vocab import InputError
from parity.weights import WeightLoadError, check_state, strict_load

OUTPUT = "residual3"


class TransformerConfig(ComponentConfig):
    """Latent grid, text, timestep and how the run is computed; ``transformer`` is the diffusers config."""

    batch: PositiveInt = 1
    frames: PositiveInt
    height: PositiveInt
    width: PositiveInt
    text_len: PositiveInt
    timestep: NonNegativeFloat = Field(700.0, le=1000)
    #: Scale of the latents: the residual stream's size relative to a block's update.
    input_scale: PositiveFloat = 1.0
    stream: Literal["model", "float32"] = "model"
    hf_cutoff: float = Field(0.5, strict=True, ge=0, lt=1.414)
    teacher_forcing: Bool = True
    stream_weights: Bool = False
    checkpoint: str | None = None


# --- block weights, streamed -----------------------------------------------------------------------
class BlockSource:
    """The weights of block i (diffusers keys, float32 numpy), read when needed.

    From a safetensors checkpoint (file or folder, memory-mapped, keys ``blocks.{i}.*``), or drawn
    from ``seed`` per block and key (so both sides get the same and no block depends on another;
    see :meth:`draw`).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, checkpoint: str | None = None):
        self.shapes, self.seed = shapes, seed
        self.files: dict[str, Path] = {}
        if checkpoint is not None:
            path = Path(checkpoint)
            files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
            if not files or not all(f.is_file() and f.suffix == ".safetensors" for f in files):
                raise WeightLoadError(f"checkpoint {checkpoint}: expected a .safetensors file or a folder holding them")
            from safetensors import safe_open

            for file in files:
                with safe_open(str(file), "numpy") as handle:
                    self.files.update({key: file for key in handle.keys()})

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if not self.files:
            return self.draw(index)
        prefix = f"blocks.{index}."
        keys = [k for k in self.files if k.startswith(prefix)]
        if not keys:
            raise WeightLoadError(f"checkpoint has no keys under {prefix!r}")
        return {k[len(prefix):]: v for k, v in self.read(keys).items()}

    def rest(self) -> dict[str, np.ndarray]:
        """The checkpoint's weights outside the blocks (the resident part of the model)."""
        return self.read([k for k in self.files if not k.startswith("blocks.")])

    def read(self, keys: list[str]) -> dict[str, np.ndarray]:
        """``keys`` of the checkpoint as float32 numpy (bf16 widened), each file opened memory-mapped."""
        from safetensors import safe_open

        state = {}
        for file in sorted({self.files[k] for k in keys}):
            with safe_open(str(file), "pt") as handle:
                for key in keys:
                    if self.files[key] == file:
                        state[key] = handle.get_tensor(key).float().numpy()
        return state

    def draw(self, index: int) -> dict[str, np.ndarray]:
        """Block ``index``'s weights from the seed: uniform draws (7x faster than normal ones, and torch's
        default Linear init is uniform: ``U(-1, 1) / sqrt(fan_in)``); tables and norm scales with the variance
        of diffusers' ``randn / sqrt(dim)`` and of ``1 + 0.1 N(0, 1)``."""
        state = {}
        for key, shape in self.shapes.items():
            value = rng(self.seed, f"blocks.{index}.{key}").random(shape, dtype=np.float32)
            value *= 2.0
            value -= 1.0  # U(-1, 1): variance 1/3
            module = key.rsplit(".", 1)[0]
            if key.endswith("scale_shift_table"):
                value *= (3.0 / shape[-1]) ** 0.5
            elif "norm" in module.split(".")[-1] or key.endswith("history_key_scale"):
                value *= 0.1 * 3.0 ** 0.5
                if key.endswith(("weight", "history_key_scale")):
                    value += 1.0
            else:
                value *= self.shapes[f"{module}.weight"][-1] ** -0.5
            state[key] = value
        return state


class StreamedState(dict):
    """The non-block weights of a model with streamed blocks, and (``blocks``) where the blocks' come from.

    What ``reference_weights`` hands to ``build_mlx``, so both sides read one :class:`BlockSource`.
    """

    blocks: BlockSource


class ReferenceSide(NamedTuple):
    """The reference side of a run: the diffusers model (and how it runs), its config, where streamed blocks come from."""

    model: Any
    config: Any
    blocks: BlockSource | None


@dataclass
class MlxTransformer:
    """Our transformer and the config its inputs are laid out by."""

    model: Any
    config: Any


# --- the component ---------------------------------------------------------------------------------
class TransformerComponent(Component):
    """Base of ``helios_transformer`` and ``wan_transformer`` (see the module docstring)."""

    kind = ""
    diffusers_config_key = "transformer"
    #: Under autocast only these stay float32 on our side (see :data:`mlx_impl.transformer.AUTOCAST_FP32`).
    autocast_fp32 = mlx_transformer.AUTOCAST_FP32
    alignment = {"patch_embedding": ("patch_embedding", "channels_first"),
                 "history/*": ("history/{0}", "channels_first"),
                 "unpatchify": ("unpatchify", "channels_first")}

    # --- precision -------------------------------------------------------------------------------
    def stream_dtype(self, config: Any, dtype: str) -> str:
        """float32 for a bf16 run with ``stream: float32`` (mixed precision), else ``dtype``."""
        return "float32" if config.stream == "float32" and dtype == "bfloat16" else dtype

    def dims(self, config: Any) -> Any:
        raise NotImplementedError

    # --- inputs ------------------------------------------------------------------------------------
    def latents(self, config: Any, seed: int, stream: str, frames: int) -> np.ndarray:
        t = config.transformer
        shape = (config.batch, t.in_channels, frames, config.height, config.width)
        return bf16_exact(normal(seed, stream, shape, config.input_scale))

    def second_inputs(self, config: Any, seed: int) -> dict[str, np.ndarray]:
        """Other latents and text, and the timestep mirrored (1000 - t): a time embedding cached at the first call shows."""
        inputs = self.make_inputs(config, seed + 1)
        inputs["timestep"] = (1000.0 - inputs["timestep"]).astype(np.float32)
        return inputs

    def common_inputs(self, config: Any, seed: int) -> dict[str, np.ndarray]:
        t = config.transformer
        return {"timestep": np.full((config.batch,), config.timestep, np.float32),
                "text": bf16_exact(normal(seed, f"{self.name}/text", (config.batch, config.text_len, t.text_dim)))}

    # --- reference ---------------------------------------------------------------------------------
    def build_reference(self, config: Any, seed: int) -> Any:
        import torch

        from reference_runners import transformer as ref

        model = ref.build(self.kind, config.transformer.to_dict(), seed, streamed=config.stream_weights)
        source = self.block_source(config, seed)
        if source is not None and source.files:
            rest = source.rest()
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("blocks.")}
            check_state(f"reference {type(model).__name__} (outside the blocks)", expected,
                        {k: tuple(v.shape) for k, v in rest.items()})
            model.load_state_dict({k: torch.from_numpy(v) for k, v in rest.items()}, strict=False)
        return ReferenceSide(ref.Reference(model), config, source)

    def block_source(self, config: Any, seed: int) -> BlockSource | None:
        if not config.stream_weights:
            if config.checkpoint is not None:
                raise InputError(f"{self.name} config key 'checkpoint': only read with stream_weights true "
                                 "(otherwise pass --weights)")
            return None
        from reference_runners import transformer as ref

        return BlockSource(ref.block_shapes(self.kind, config.transformer.to_dict()), seed, config.checkpoint)

    def reference_weights(self, reference: Any) -> dict[str, np.ndarray]:
        """The model's weights; with streamed blocks, all but the blocks' (those come from the block source)."""
        (ref, _config, source) = reference
        state = {k: v.detach().float().numpy() for k, v in ref.model.state_dict().items()
                 if source is None or not k.startswith("blocks.")}
        if source is None:
            return state
        state = StreamedState(state)
        state.blocks = source
        return state

    def load_reference(self, config: Any, weights: dict[str, np.ndarray]) -> Any:
        from parity.weights import load_torch_strict

        if config.stream_weights:
            raise InputError(f"{self.name}: with stream_weights, give the checkpoint as the config key 'checkpoint'")
        reference = self.build_reference(config, seed=0)
        load_torch_strict(reference.model.model, weights)
        return reference

    def cast_reference(self, reference: Any, dtype: str) -> Any:
        """The model in ``dtype`` as diffusers' ``from_pretrained(torch_dtype=...)`` leaves it: parameters cast
        except ``keep_fp32`` (buffers, such as RoPE bases, stay as built); in mixed precision float32 under autocast."""
        import torch

        from reference_runners import transformer as ref

        (base, config, source) = reference
        stream = self.stream_dtype(config, dtype)
        model = copy.deepcopy(base.model)
        keep = self.keep_fp32 if stream == "bfloat16" else ()
        for name, param in model.named_parameters():
            if param.is_floating_point() and not any(k in name.split(".") for k in keep):
                param.data = param.data.to(getattr(torch, stream))
        if stream != dtype:
            ref.carry_patches_in_float32(model)
        if source is not None:
            ref.StreamedBlocks(source, getattr(torch, stream), keep).attach(model)
        return ReferenceSide(ref.Reference(model, dtype if stream != dtype else None), config, source)

    def run_reference(self, reference: Any, inputs: dict, dtype: str, capture: Capture) -> None:
        import torch

        from reference_runners import transformer as ref

        (model, config, _source) = reference
        run = {"helios": ref.run_helios, "wan": ref.run_wan}[self.kind]
        run(model, inputs, getattr(torch, self.stream_dtype(config, dtype)), capture)

    # --- MLX ---------------------------------------------------------------------------------------
    def mlx_model(self, dims: Any) -> Any:
        raise NotImplementedError

    def build_mlx(self, config: Any, weights: dict[str, np.ndarray], dtype: str) -> MlxTransformer:
        mixed = self.stream_dtype(config, dtype) != dtype
        keep = self.autocast_fp32 if mixed else self.keep_fp32
        model = self.mlx_model(self.dims(config))
        if config.stream_weights:
            if not isinstance(weights, StreamedState):
                raise InputError(f"{self.name}: stream_weights needs the reference's block source; "
                                 "a checkpoint goes in the config key 'checkpoint'")
            source = weights.blocks

            def load(block: Any, index: int) -> None:
                strict_load(block, source(index), convert=mlx_transformer.convert_key, dtype=getattr(mx, dtype),
                            keep_float32=keep)
            model.stream_blocks(load)
        strict_load(model, dict(weights), convert=mlx_transformer.convert_key, dtype=getattr(mx, dtype), keep_float32=keep)
        return MlxTransformer(model, config)

    def mlx_array(self, array: np.ndarray, dtype: str, config: Any, channels_last: bool = False) -> mx.array:
        x = mx.array(np.moveaxis(array, 1, -1) if channels_last else array)
        return x.astype(getattr(mx, self.stream_dtype(config, dtype))) if x.dtype == mx.float32 else x

    # --- sections ----------------------------------------------------------------------------------
    def num_blocks(self, config: Any) -> int:
        return config.transformer.num_layers

    def main_grid(self, config: Any, tokens: np.ndarray) -> np.ndarray:
        """The main tokens of ``(batch, tokens, dim)`` as a ``(batch, frames, height, width, dim)`` grid."""
        pt, ph, pw = config.transformer.patch_size
        grid = (config.frames // pt, config.height // ph, config.width // pw)
        main = math.prod(grid)
        return tokens[:, -main:].reshape(tokens.shape[0], *grid, -1)

    def views(self, run: RunContext) -> list[Section]:
        """``depth``: per-block curves of the block output (information; the layers are judged)."""
        blocks = [i for i in range(self.num_blocks(run.config)) if f"blocks.{i}/{OUTPUT}" in run.ref]
        series: dict[str, list[float]] = {"relative error (RMSE / RMS ref)": [], "1 - cosine": [],
                                          "HF energy ratio (ours / ref)": []}
        if run.truth is not None:
            series["budget ratio (vs float64, / ref's own)"] = []
        for i in blocks:
            name = f"blocks.{i}/{OUTPUT}"
            ok = name in run.mlx and run.mlx.shapes[name] == run.ref.shapes[name]
            ref, ours = run.ref[name], (run.mlx[name] if ok else None)
            m = tensor_metrics(ref, ours) if ok else {}
            series["relative error (RMSE / RMS ref)"].append(m.get("rmse", math.nan) / (m.get("ref_rms") or math.nan))
            series["1 - cosine"].append(1.0 - m.get("cosine", math.nan))
            hf = [drift.high_frequency_energy(self.main_grid(run.config, x), run.config.hf_cutoff) for x in (ours, ref)] \
                if ok else [math.nan, 1.0]
            series["HF energy ratio (ours / ref)"].append(hf[0] / hf[1] if hf[1] else math.nan)
            if run.truth is not None:
                from parity.metrics import precision_budget

                budget = precision_budget(run.truth[name], ref, ours, run.mlx.dtypes[name]) if ok else {}
                series["budget ratio (vs float64, / ref's own)"].append(budget.get("budget_ratio", math.nan))
        return [Section("depth", "Depth profile: the block outputs", "curves",
                        {"x": blocks, "series": series, "xlabel": "block", "ylabel": "error / ratio", "log": True},
                        note=f"Per block, blocks.i/{OUTPUT} free-running (each block on our previous block's "
                             "output). Information only: every layer is judged in the table.")]

    def extra_runs(self, run: RunContext) -> list[Section]:
        if not run.config.teacher_forcing or run.reference is None:
            return []
        return teacher_forcing_sections(self, run)

    # --- teacher forcing: what a component supplies ------------------------------------------------
    def forced_args(self, run: RunContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """Block arguments other than the hidden state, from the reference's captured tensors: (ours, the reference's)."""
        raise NotImplementedError


# --- teacher forcing --------------------------------------------------------------------------------
def block_input(ref: Capture, index: int) -> str:
    """The reference layer holding block ``index``'s hidden-state input."""
    return "tokens" if index == 0 else f"blocks.{index - 1}/{OUTPUT}"


def teacher_forcing_sections(component: TransformerComponent, run: RunContext) -> list[Section]:
    """Run each of our blocks on the reference's input to it; judge local against inherited error (see the module docstring)."""
    import torch

    from reference_runners import transformer as ref_runner

    config, dtype = run.config, run.dtype
    stream = component.stream_dtype(config, dtype)
    judge = Judge(component.lineage(), dtype, run.thresholds) if run.thresholds else None
    if judge is None:
        return []
    ours_args, ref_args = component.forced_args(run)
    truth = component.cast_reference(run.reference, "float64").model if dtype != "float32" else None
    model = run.mlx_model.model
    blocks = model.block_sequence()
    judged = {layer.name: layer for layer in run.comparison.layers}
    local, inherited, diverged = [], [], []
    for i in range(component.num_blocks(config)):
        name, source = f"blocks.{i}/{OUTPUT}", block_input(run.ref, i)
        if name not in run.ref or source not in run.ref:
            break
        x = np.asarray(run.ref[source])
        with muted(), tap_scope(f"blocks.{i}"):
            out = model.call_block(blocks[i], mx.array(x).astype(getattr(mx, stream)), **ours_args)
            mx.eval(out)
        ours_dtype = str(out.dtype).removeprefix("mlx.core.")
        ours = np.array(out.astype(mx.float32) if out.dtype != mx.float64 else out)
        truth_out = None
        if truth is not None:
            args = {k: (v.to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in ref_args.items()}
            truth_out = ref_runner.run_block(truth, i, {"hidden_states": torch.from_numpy(x).to(torch.float64), **args})
        tol, exact = judge.tolerances(name)
        local_result = judge_tensors(name, name, np.asarray(run.ref[name]), ours, truth_out, tol, exact,
                                     run.ref.dtypes[name], ours_dtype)
        local.append(local_result)
        inherited.append(judged.get(name))
        diverged.append(any(layer.verdict == FAIL for key, layer in judged.items() if key.startswith(f"blocks.{i}/")))
    return teacher_forcing.sections([f"blocks.{i}" for i in range(len(local))], local, inherited, diverged, dtype,
                                    "block")
