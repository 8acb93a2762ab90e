"""The reference sublayer that produced a layer, found by re-running the reference, and run again on the port's inputs.

Finding it (:func:`find`): the component's reference runs once more (its own ``run_reference``, on
the run's inputs) into a :class:`Watch` capture while every torch module call (a global forward
hook, with keyword arguments) and every Python function call of the reference's code (a profiler;
the harness's and torch's own functions excluded) is noted. When the runner records the layer, the
call whose result it is -- a module first, else a function -- is the sublayer, and the run stops
there. A value no call returns (a traced local, a slice) has no sublayer.

Its inputs (:class:`Sublayer`): each tensor argument that is a layer recorded earlier in that run
(the same tensor, or the same values, possibly reshaped) is replaced by **the port's** tensor of
that layer; the others stay the reference's. :meth:`Sublayer.run` calls it so -- in the run's dtype,
or as a copy cast to another (float64 for the truth, bfloat16) -- with a change applied.
"""
from __future__ import annotations

import copy
import inspect
import sys
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from parity.capture import Capture, to_numpy

#: Calls remembered while the reference runs (the producer of a layer is among the last few).
CALLS = 512
#: Tuples and lists of at most this many items are looked into for tensor arguments.
SHORT = 4
_SKIP = tuple(str(Path(p).resolve()) for p in (Path(__file__).parents[1],))  # the harness's own code
_VARARGS, _VARKW = inspect.CO_VARARGS, inspect.CO_VARKEYWORDS


class Found(Exception):
    """Raised by :class:`Watch` when the layer it waits for is recorded: the reference need not run further."""


@dataclass
class Call:
    """A callable (a torch module, or a function) with its arguments; ``result`` as the reference returned it."""

    fn: Any
    args: tuple
    kwargs: dict
    result: Any = None
    module: bool = False

    def __call__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)

    def slots(self) -> Iterator[tuple[str, Any]]:
        """``(slot, value)`` of every argument, and of the items of a short tuple or list (a (cos, sin) pair; not a
        per-layer cache list): ``"0"``, ``"cache_x"``, ``"1.0"``."""
        for key, value in [*((str(i), v) for i, v in enumerate(self.args)), *self.kwargs.items()]:
            yield key, value
            if isinstance(value, (tuple, list)) and len(value) <= SHORT:
                yield from ((f"{key}.{j}", item) for j, item in enumerate(value))

    def with_slots(self, values: dict[str, Any]) -> "Call":
        """This call with some slots' values replaced."""
        args, kwargs = list(self.args), dict(self.kwargs)

        def put(key: str, value: Any) -> None:
            head, _, rest = key.partition(".")
            holder, index = (args, int(head)) if head.isdigit() else (kwargs, head)
            if rest:
                items = list(holder[index])
                items[int(rest)] = value
                holder[index] = type(holder[index])(items)
            else:
                holder[index] = value
        for key, value in values.items():
            put(key, value)
        return replace(self, args=tuple(args), kwargs=kwargs)

    def parameter(self, slot: str) -> inspect.Parameter | None:
        """The parameter a top-level slot (a position or a keyword) binds to, when the signature says."""
        target = self.fn.forward if self.module else self.fn
        try:
            params = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):
            return None
        if slot.isdigit():
            index = int(slot)
            return params[index] if index < len(params) and params[index].kind != params[index].VAR_POSITIONAL else None
        return next((p for p in params if p.name == slot), None)

    def setting(self, name: str, value: Any) -> "Call":
        """This call with parameter ``name`` set to ``value`` (where it was passed, positionally or by keyword)."""
        if name not in self.kwargs:
            target = self.fn.forward if self.module else self.fn
            names = list(inspect.signature(target).parameters)
            if name in names and names.index(name) < len(self.args):
                return self.with_slots({str(names.index(name)): value})
        return replace(self, kwargs={**self.kwargs, name: value})

    @property
    def name(self) -> str:
        fn = self.fn
        return type(fn).__name__ if self.module else getattr(fn, "__qualname__", getattr(fn, "__name__", str(fn)))


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dtype") and hasattr(x, "shape")


def _holds(result: Any, tensor: Any) -> int | None:
    """-1 when ``result`` is ``tensor``, its index when a tuple/list holds it, else None."""
    if result is tensor:
        return -1
    if isinstance(result, (tuple, list)):
        return next((i for i, item in enumerate(result) if item is tensor), None)
    return None


class Watch(Capture):
    """A capture that records nothing but waits for ``target``: then it notes the call that produced it and stops the run."""

    def __init__(self, target: str):
        super().__init__("ref", keep=False)
        self.target = target
        self.calls: deque[Call] = deque(maxlen=CALLS)
        self.layers: list[tuple[str, Any]] = []
        self.output: Any = None
        self.producer: tuple[Call, int] | None = None

    def add(self, name: str, tensor: Any) -> None:
        full = self.full_name(name)
        if full == self.target:
            self.output = tensor
            self.producer = self._producer(tensor)
            raise Found(full)
        if is_torch(tensor):
            self.layers.append((full, tensor))

    def _producer(self, tensor: Any) -> tuple[Call, int] | None:
        for modules in (True, False):
            for call in reversed(self.calls):
                index = _holds(call.result, tensor) if call.module == modules else None
                if index is not None:
                    return call, index
        return None


def _callable(frame: Any) -> Callable | None:
    """The function a frame runs, when it can be called again: a module-level function or a method."""
    code = frame.f_code
    found = frame.f_globals.get(code.co_name)
    if getattr(found, "__code__", None) is code:
        return found
    if code.co_argcount:
        owner = frame.f_locals.get(code.co_varnames[0])
        attr = inspect.getattr_static(type(owner), code.co_name, None) if owner is not None else None
        func = getattr(attr, "__func__", attr)
        if getattr(func, "__code__", None) is code and not isinstance(attr, staticmethod):
            return func
    return None


def _arguments(frame: Any) -> tuple[tuple, dict]:
    code, local = frame.f_code, frame.f_locals
    named = code.co_argcount + code.co_kwonlyargcount
    args = [local[n] for n in code.co_varnames[:code.co_argcount]]
    kwargs = {n: local[n] for n in code.co_varnames[code.co_argcount:named]}
    if code.co_flags & _VARARGS:
        args += list(local[code.co_varnames[named]])
        named += 1
    if code.co_flags & _VARKW:
        kwargs.update(local[code.co_varnames[named]])
    return tuple(args), kwargs


@contextmanager
def noting(watch: Watch) -> Iterator[None]:
    """Note every torch module call and every re-callable Python function call of the reference's code in ``watch``."""
    import torch

    skip = _SKIP + (str(Path(torch.__file__).parent), str(Path(np.__file__).parent))
    open_calls: dict[int, tuple[Callable, tuple, dict]] = {}

    def on_module(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        watch.calls.append(Call(module, tuple(args), dict(kwargs), output, True))

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            if not frame.f_code.co_filename.startswith(skip):
                fn = _callable(frame)
                if fn is not None:
                    open_calls[id(frame)] = (fn, *_arguments(frame))
        elif event == "return":
            entry = open_calls.pop(id(frame), None)
            if entry is not None and (is_torch(arg) or isinstance(arg, (tuple, list)) and any(map(is_torch, arg))):
                watch.calls.append(Call(entry[0], entry[1], entry[2], arg, False))

    handle = torch.nn.modules.module.register_module_forward_hook(on_module, with_kwargs=True)
    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)
        handle.remove()


def _match(value: Any, layers: list[tuple[str, Any]]) -> str | None:
    """The recorded layer ``value`` is: the same tensor, else the same values (any shape, any float dtype)."""
    import torch

    for name, tensor in reversed(layers):
        if tensor is value:
            return name
    if not value.is_floating_point():
        return None
    for name, tensor in reversed(layers):
        if tensor.numel() == value.numel() and tensor.is_floating_point() and \
                torch.equal(tensor.reshape(-1).to(value.dtype), value.reshape(-1)):
            return name
    return None


@dataclass
class Sublayer:
    """The reference sublayer of a layer (see the module docstring), ready to run on the port's inputs."""

    call: Call
    element: int
    inputs: dict[str, str]
    port: Callable[[str], np.ndarray | None]
    layers: dict[str, tuple[int, ...]]
    missing: list[str] = field(default_factory=list)
    _casts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, watch: Watch, port: Callable[[str], np.ndarray | None]) -> "Sublayer | None":
        if watch.producer is None:
            return None
        call, element = watch.producer
        inputs, missing = {}, []
        for slot, value in call.slots():
            if is_torch(value):
                name = _match(value, watch.layers)
                if name is not None and port(name) is not None:
                    inputs[slot] = name
                elif name is not None:
                    missing.append(name)
        return cls(call, element, inputs, port, {n: tuple(t.shape) for n, t in watch.layers}, missing)

    @property
    def name(self) -> str:
        return self.call.name

    def modules(self) -> list[Any]:
        """The torch modules the sublayer runs (itself and its submodules; for a method, its object's)."""
        root = self.call.fn if self.call.module else next((a for a in self.call.args[:1] if hasattr(a, "modules")), None)
        return list(root.modules()) if root is not None else []

    def tensors(self) -> list[tuple[str, Any]]:
        """``(slot, reference tensor)`` of its floating-point tensor arguments, in order."""
        return [(s, v) for s, v in self.call.slots() if is_torch(v) and v.is_floating_point()]

    def _as_input(self, layer: str, like: Any) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.port(layer)).reshape(tuple(like.shape))).to(like.dtype)

    def prepared(self, swap: dict[str, str] | None = None, dtype: str | None = None) -> Call:
        """The call on the port's inputs (``swap``: slot -> another layer whose port tensor goes there), cast to ``dtype``."""
        import torch

        feeds = {**self.inputs, **(swap or {})}
        values = dict(self.call.slots())
        call = self.call.with_slots({slot: self._as_input(layer, values[slot]) for slot, layer in feeds.items()})
        if dtype is None:
            return call
        target = getattr(torch, dtype)
        if dtype not in self._casts:
            self._casts[dtype] = copy.deepcopy(self.call.fn).to(target) if self.call.module else self.call.fn
        cast = {slot: v.to(target) if v.is_floating_point() else v for slot, v in call.slots() if is_torch(v)}
        cast.update({slot: copy.deepcopy(v).to(target) for slot, v in call.slots() if isinstance(v, torch.nn.Module)})
        return replace(call.with_slots(cast), fn=self._casts[dtype])

    def run(self, change: Callable[[Call], Any] | None = None, dtype: str | None = None,
            swap: dict[str, str] | None = None) -> np.ndarray:
        """The sublayer's output (the layer's element of it) on the port's inputs, with ``change`` applied, as numpy."""
        import torch

        call = self.prepared(swap, dtype)
        with torch.no_grad():
            out = change(call) if change is not None else call()
        if self.element >= 0:
            out = out[self.element]
        return to_numpy(out)[0]


def find(run_reference: Callable[[Capture], None], target: str, port: Callable[[str], np.ndarray | None]
         ) -> Sublayer | None:
    """The sublayer of ``target``: ``run_reference(capture)`` runs the component's reference into a capture."""
    watch = Watch(target)
    try:
        with noting(watch):
            run_reference(watch)
    except Found:
        pass
    return Sublayer.of(watch, port)


def value(run_reference: Callable[[Capture], None], target: str) -> np.ndarray | None:
    """The reference's tensor of ``target`` in one more run (a run with a patch applied, say); None: never recorded."""
    watch = Watch(target)
    try:
        run_reference(watch)
    except Found:
        pass
    return to_numpy(watch.output)[0] if watch.output is not None else None
