"""Reference hypotheses: the reference sublayer, re-run on the port's own inputs with one declared change.

Each test takes the layer's :class:`~parity.explain.sublayer.Sublayer` (none: the hypothesis does not
apply) and yields the candidates of its variants: the sublayer's output with the change, in the run's
dtype, and in float64 as the truth in reduced-precision runs. Changes act on what the sublayer
runs, by kind, whatever the component: activations (modules with an ``approximate`` attribute,
``SiLU``), norms (LayerNorm, RMSNorm and the VAE's L2 norm: :func:`norm_of`), attention functions
(a ``scale`` parameter), rotary functions (``rot``/``rope`` in the name), the extra inputs of a
call (a cache), and which recorded layer feeds it.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator



from parity.explain.evidence import Candidate, Evidence
from parity.explain.sublayer import Call, Sublayer, is_torch

EPS = (1e-5, 1e-6)


def candidate(evidence: Evidence, sub: Sublayer, detail: str, change: Callable[[Call], Any] | None = None,
              swap: dict[str, str] | None = None, precision: str | None = None) -> Candidate:
    """The sublayer's output with ``change`` on the port's inputs (and in float64, when a truth is needed)."""
    ref = evidence.window(sub.run(change, precision, swap))
    truth = evidence.window(sub.run(change, "float64", swap)) if evidence.reduced or precision else None
    return Candidate(detail, ref, truth, precision=precision)


@contextmanager
def patched(obj: Any, **attrs: Any) -> Iterator[None]:
    """Set instance attributes of ``obj`` for the block (a method as an attribute overrides the class's)."""
    saved = {k: obj.__dict__[k] for k in attrs if k in obj.__dict__}
    for key, value in attrs.items():
        object.__setattr__(obj, key, value)
    try:
        yield
    finally:
        for key in attrs:
            if key in saved:
                object.__setattr__(obj, key, saved[key])
            else:
                object.__delattr__(obj, key)


def _modules(call: Call) -> list[Any]:
    root = call.fn if call.module else next((a for a in call.args[:1] if hasattr(a, "modules")), None)
    return list(root.modules()) if root is not None else []


def with_modules(select: Callable[[Any], bool], attrs: Callable[[Any], dict[str, Any]]) -> Callable[[Call], Any]:
    """A change: the modules ``select`` picks get ``attrs(module)`` for the call."""
    def change(call: Call) -> Any:
        with ExitStack() as stack:
            for module in _modules(call):
                if select(module):
                    stack.enter_context(patched(module, **attrs(module)))
            return call()
    return change


# --- activations --------------------------------------------------------------------------------

def _gelu(module: Any) -> bool:
    return isinstance(getattr(module, "approximate", None), str)


def _silu(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.SiLU)


def gelu_approximation(evidence: Evidence) -> Iterator[Candidate]:
    sub = evidence.sublayer
    found = [m for m in sub.modules() if _gelu(m)] if sub else []
    for want in ("none", "tanh"):
        if any(m.approximate != want for m in found):
            yield candidate(evidence, sub, f'GELU(approximate="{want}")', with_modules(_gelu, lambda m: {"approximate": want}))


def silu_gelu(evidence: Evidence) -> Iterator[Candidate]:
    import torch.nn.functional as F

    sub = evidence.sublayer
    modules = sub.modules() if sub else []
    if any(_gelu(m) for m in modules):  # diffusers' GELU calls self.gelu after its projection; torch's is forward
        yield candidate(evidence, sub, "SiLU where the reference has GELU", with_modules(
            _gelu, lambda m: {"gelu" if hasattr(type(m), "gelu") else "forward": F.silu}))
    if any(_silu(m) for m in modules):
        for approximate in ("none", "tanh"):
            yield candidate(evidence, sub, f'GELU(approximate="{approximate}") where the reference has SiLU',
                            with_modules(_silu, lambda m, a=approximate: {"forward": lambda x: F.gelu(x, approximate=a)}))


# --- norms ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Norm:
    """What a norm module computes: ``kind`` (layer, rms, l2) over ``axis``, its affine and eps."""

    kind: str
    axis: int
    weight: Any
    bias: Any
    eps: float | None

    def __call__(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        h = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        eps = self.eps if self.eps is not None else torch.finfo(h.dtype).eps
        if self.kind == "layer":
            h = h - h.mean(self.axis, keepdim=True)
        if self.kind == "l2":
            h = F.normalize(h, dim=self.axis) * math.sqrt(h.shape[self.axis])
        else:
            h = h * torch.rsqrt(h.pow(2).mean(self.axis, keepdim=True) + eps)
        if self.weight is not None:
            h = h * self.weight.to(h.dtype)
        if is_torch(self.bias):
            h = h + self.bias.to(h.dtype)
        return h.to(x.dtype)

    def but(self, **changes: Any) -> "Norm":
        return Norm(**{**self.__dict__, **changes})


def norm_of(module: Any) -> Norm | None:
    """The :class:`Norm` a module computes, or None for a module that is no norm of a known kind."""
    import torch

    if isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) == 1:
        return Norm("layer", -1, module.weight, module.bias, module.eps)
    if isinstance(module, torch.nn.RMSNorm) and len(module.normalized_shape) == 1:
        return Norm("rms", -1, module.weight, None, module.eps)
    if type(module).__name__ == "RMSNorm" and isinstance(getattr(module, "eps", None), float):  # diffusers' own
        return Norm("rms", -1, getattr(module, "weight", None), getattr(module, "bias", None), module.eps)
    if hasattr(module, "channel_first") and is_torch(getattr(module, "gamma", None)):  # the Wan VAE's RMS_norm
        return Norm("l2", 1 if module.channel_first else -1, module.gamma, module.bias, None)
    return None


def with_norms(variant: Callable[[Norm], Norm | None]) -> Callable[[Call], Any]:
    """A change: every norm the sublayer runs computes ``variant(its Norm)`` instead (None: its input)."""
    def forward(norm: Norm | None) -> Callable[[Any], Any]:
        return (lambda x, *a, **k: x) if norm is None else (lambda x, *a, **k: norm(x))
    return with_modules(lambda m: norm_of(m) is not None, lambda m: {"forward": forward(variant(norm_of(m)))})


def _norms(evidence: Evidence) -> tuple[Sublayer | None, list[Norm]]:
    sub = evidence.sublayer
    return sub, [n for n in map(norm_of, sub.modules() if sub else []) if n is not None]


def norm_kind(evidence: Evidence) -> Iterator[Candidate]:
    sub, norms = _norms(evidence)
    if any(n.kind == "layer" for n in norms):
        yield candidate(evidence, sub, "RMSNorm where the reference has LayerNorm",
                        with_norms(lambda n: n.but(kind="rms") if n.kind == "layer" else n))
    if any(n.kind != "layer" for n in norms):
        yield candidate(evidence, sub, "LayerNorm where the reference has RMSNorm",
                        with_norms(lambda n: n.but(kind="layer", eps=n.eps or 1e-6) if n.kind != "layer" else n))


def norm_eps(evidence: Evidence) -> Iterator[Candidate]:
    sub, norms = _norms(evidence)
    for eps in EPS:
        if any(n.eps != eps for n in norms):
            yield candidate(evidence, sub, f"eps {eps:.0e}".replace("e-0", "e-"), with_norms(
                lambda n, e=eps: n.but(eps=e, kind="rms" if n.kind == "l2" else n.kind)))


def norm_axis(evidence: Evidence) -> Iterator[Candidate]:
    sub, norms = _norms(evidence)
    shapes = [v.shape for _, v in sub.tensors()[:1]] if sub else []
    rank = len(shapes[0]) if shapes else 0
    for axis in (1, -2, -1):
        if rank >= 3 and any(n.axis % rank != axis % rank for n in norms):
            yield candidate(evidence, sub, f"normalised over axis {axis}", with_norms(lambda n, a=axis: n.but(axis=a)))


def norm_affine(evidence: Evidence) -> Iterator[Candidate]:
    sub, norms = _norms(evidence)
    if any(n.weight is not None or is_torch(n.bias) for n in norms):
        yield candidate(evidence, sub, "the norm's weight and bias left out", with_norms(lambda n: n.but(weight=None, bias=None)))


def missing_norm(evidence: Evidence) -> Iterator[Candidate]:
    sub, norms = _norms(evidence)
    if norms:
        yield candidate(evidence, sub, f"the norm{'s' if len(norms) > 1 else ''} skipped (input passed through)", with_norms(lambda n: None))


def extra_norm(evidence: Evidence) -> Iterator[Candidate]:
    sub, norms = _norms(evidence)
    first = sub.tensors()[:1] if sub else []
    if sub is None or norms or not first or first[0][1].ndim < 2:
        return
    slot = first[0][0]
    for kind in ("layer", "rms"):
        norm = Norm(kind, -1, None, None, 1e-6)
        yield candidate(evidence, sub, f"an extra {'LayerNorm' if kind == 'layer' else 'RMSNorm'} (no affine, eps 1e-6) "
                        f"on its input", lambda c, norm=norm: c.with_slots({slot: norm(dict(c.slots())[slot])})())


# --- attention, rotary embedding ---------------------------------------------------------------------

def attention_scale(evidence: Evidence) -> Iterator[Candidate]:
    sub = evidence.sublayer
    query = next((v for s, v in sub.tensors() if s in ("0", "query")), None) if sub else None
    if query is None or query.ndim != 4 or sub.call.module or sub.call.parameter("scale") is None:
        return
    head = query.shape[-1]
    dims = {head * query.shape[-2]: f"1/sqrt({head} x {query.shape[-2]})", head * query.shape[-3]:
            f"1/sqrt({head} x {query.shape[-3]})"}
    scales = {1 / math.sqrt(d): f"{text} (the model dim, not head_dim {head})" for d, text in dims.items() if d != head}
    scales.update({1.0: "1 (no scale)", 1 / head: f"1/{head} (not 1/sqrt)"})
    for value, text in scales.items():
        yield candidate(evidence, sub, f"softmax scale {text}", lambda c, v=value: c.setting("scale", v)())


def _halves_to_pairs(x: Any) -> Any:
    half = x.shape[-1] // 2
    import torch

    return torch.stack([x[..., :half], x[..., half:]], dim=-1).reshape(x.shape)


def _pairs_to_halves(x: Any) -> Any:
    import torch

    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def rotary_pairs(evidence: Evidence) -> Iterator[Candidate]:
    """The rotation's pairs (i, i + D/2) where the reference rotates (2i, 2i + 1), or the reverse: the reference
    sublayer conjugated by the pairing (its input re-paired, its output paired back)."""
    sub = evidence.sublayer
    first = sub.tensors()[:1] if sub else []
    name = sub.name.lower() if sub else ""
    if not first or not ("rot" in name or "rope" in name) or first[0][1].shape[-1] % 2:
        return
    slot = first[0][0]
    for detail, into, back in (("pairs (i, i + D/2): rotate_half, where the reference interleaves", _halves_to_pairs,
                                _pairs_to_halves),
                               ("interleaved pairs (2i, 2i + 1) where the reference rotates halves", _pairs_to_halves,
                                _halves_to_pairs)):
        yield candidate(evidence, sub, detail, lambda c, i=into, b=back: b(c.with_slots({slot: i(dict(c.slots())[slot])})()))


# --- inputs ----------------------------------------------------------------------------------------------

def zeroed_input(evidence: Evidence) -> Iterator[Candidate]:
    """An extra input (a cache, a history) missing or zeroed: each tensor argument after the first, as None
    where its parameter defaults to None, else zeros; for a 5-D (N, C, T, H, W) one, also its first frames."""
    import torch

    sub = evidence.sublayer
    tensors = sub.tensors() if sub else []
    for slot, value in tensors[1:]:
        if "." in slot or slot in sub.inputs:
            continue
        param = sub.call.parameter(slot)
        name = param.name if param is not None else slot
        missing = None if param is not None and param.default is None else "zeros"
        yield candidate(evidence, sub, f"{name} {'missing (None)' if missing is None else 'zeroed'}",
                        lambda c, s=slot, m=missing: c.with_slots({s: None if m is None else torch.zeros_like(dict(c.slots())[s])})())
        for k in range(1, value.shape[2] if value.ndim == 5 else 0):
            def first_zeroed(c: Call, s: str = slot, k: int = k) -> Any:
                x = dict(c.slots())[s].clone()
                x[:, :, :k] = 0
                return c.with_slots({s: x})()
            yield candidate(evidence, sub, f"{name} keeps {value.shape[2] - k} of {value.shape[2]} frames (the first "
                            f"{k} zero)", first_zeroed)


def fused_input_swap(evidence: Evidence) -> Iterator[Candidate]:
    """The sublayer fed another recorded layer of the same shape and scope (q/k/v or gate/up chunks of a fused
    projection reordered): the port's tensor of that layer in place of the one the reference uses."""
    sub = evidence.sublayer
    for slot, layer in (sub.inputs.items() if sub else ()):
        scope = layer.rpartition("/")[0]
        siblings = [n for n, shape in sub.layers.items() if n != layer and shape == sub.layers[layer]
                    and n.rpartition("/")[0] == scope and sub.port(n) is not None]
        for other in siblings[-6:]:
            yield candidate(evidence, sub, f"fed {other} where the reference takes {layer}", swap={slot: other})


# --- precision ---------------------------------------------------------------------------------------------

def sublayer_bf16(evidence: Evidence) -> Iterator[Candidate]:
    """The sublayer computed in bf16 (weights, inputs, softmax, accumulation) where the reference keeps float32."""
    from parity.explain.precision import narrowed

    sub = evidence.sublayer
    if sub is None or evidence.dtype_ref not in ("float32", "float64"):
        return
    if evidence.dtype_mlx == "bfloat16" or "bfloat16" in narrowed(evidence, ("bfloat16",)):
        yield candidate(evidence, sub, f"{sub.name} run in bfloat16", precision="bfloat16")


