"""Named taps on intermediate MLX tensors.

Our MLX code calls ``tap("layer/name", x)`` at every point worth comparing. With no recorder
installed, a tap is one attribute lookup and returns ``x`` untouched, so production runs pay
nothing. A recorder (see ``parity.capture``) receives each tapped tensor in execution order.
A tap never changes the value flowing through the model. Values that cost real work to produce
only for a tap (attention probability maps) are computed when :func:`wants` says they were
requested (:func:`requesting`) and a recorder is installed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

_recorder: Callable[[str, Any], None] | None = None
_prefix: list[str] = []
_requested: frozenset[str] = frozenset()


def tap(name: str, x: Any) -> Any:
    """Hand ``x`` to the active recorder under ``name`` (prefixed by any active scopes); return ``x``."""
    if _recorder is not None:
        _recorder("/".join([*_prefix, name]), x)
    return x


def recording() -> bool:
    """True when a recorder is installed (lets callers skip work done only for taps)."""
    return _recorder is not None


def wants(extra: str) -> bool:
    """True while recording with the optional, costly tap ``extra`` requested (e.g. attention maps): compute it only then."""
    return _recorder is not None and extra in _requested


def tap_requested(name: str, x: Any) -> Any:
    """:func:`tap` for an optional layer only some components compare: recorded while ``name`` is requested."""
    if wants(name):
        tap(name, x)
    return x


@contextmanager
def requesting(*extras: str) -> Iterator[None]:
    """Ask for the optional taps ``extras`` inside the block (see :func:`wants`)."""
    global _requested
    previous, _requested = _requested, _requested | frozenset(extras)
    try:
        yield
    finally:
        _requested = previous


@contextmanager
def tap_scope(name: str) -> Iterator[None]:
    """Prefix every tap inside the block with ``name/`` (e.g. ``chunk1``)."""
    _prefix.append(name)
    try:
        yield
    finally:
        _prefix.pop()


@contextmanager
def muted() -> Iterator[None]:
    """No tap inside the block is recorded (work that belongs to another component, e.g. input preparation)."""
    global _recorder
    previous, _recorder = _recorder, None
    try:
        yield
    finally:
        _recorder = previous


@contextmanager
def renamed(rename: Callable[[str], str | None]) -> Iterator[None]:
    """Inside the block a tap is recorded under ``rename(full name)``, or not at all when that is None
    (a second path through the same code naming only the layers it is compared on, e.g. ``chunk1/...``)."""
    global _recorder
    outer = _recorder
    if outer is None:
        yield
        return

    def forward(name: str, x: Any) -> None:
        new = rename(name)
        if new is not None:
            outer(new, x)
    _recorder = forward
    try:
        yield
    finally:
        _recorder = outer


@contextmanager
def recorder(callback: Callable[[str, Any], None]) -> Iterator[None]:
    """Install ``callback(name, tensor)`` as the recorder for the duration of the block."""
    global _recorder
    previous, _recorder = _recorder, callback
    try:
        yield
    finally:
        _recorder = previous
