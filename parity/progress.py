"""Progress on stderr for anything that takes more than a moment: tqdm bars, quiet when not a terminal.

One :class:`Progress` per command. ``step(message)`` prints a line (what is being done);
``counter(label, total)`` is a bar over layers, chunks, blocks or steps with counts and elapsed
time. Both are silent with ``quiet`` (``--quiet``), and bars are silent when stderr is not a
terminal (CI logs get the step lines and the summaries, not carriage returns).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm


class Progress:
    def __init__(self, quiet: bool = False, bars: bool | None = None):
        self.quiet = quiet
        self.bars = (not quiet) and (sys.stderr.isatty() if bars is None else bars)

    def step(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    @contextmanager
    def counter(self, label: str, total: int | None = None, unit: str = "layer") -> Iterator["Counter"]:
        bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                   disable=not self.bars, mininterval=0.2)
        try:
            yield Counter(bar)
        finally:
            bar.close()


class Counter:
    def __init__(self, bar: tqdm):
        self.bar = bar

    def __call__(self, name: str) -> None:
        self.bar.set_postfix_str(name[-40:], refresh=False)
        self.bar.update(1)


SILENT = Progress(quiet=True)
