"""Progress of a suite run: the runner reports `Step`s; `Display` shows them on the terminal.

A terminal gets a rich progress bar (step i/N, what is being computed, elapsed and ETA);
anything else (a pipe, a CI log) gets one plain line per step, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class Step:
    """Step `index` of `total` (1-based) is starting: `label` says what it computes."""

    index: int
    total: int
    label: str

    def __str__(self) -> str:
        return f"[{self.index}/{self.total}] {self.label}"


Progress = Callable[[Step], None]


@contextmanager
def display(stream: TextIO | None = None, *, tty: bool | None = None) -> Iterator[Progress]:
    """A `Progress` callback for the duration of the block: a rich bar on a terminal, plain
    `sway [i/N, 12 s] label` lines otherwise (`tty` overrides the detection, for tests)."""
    out = stream if stream is not None else sys.stderr
    if tty if tty is not None else out.isatty():
        with _bar(out) as show:
            yield show
        return
    start = time.monotonic()

    def line(step: Step) -> None:
        elapsed = time.monotonic() - start
        print(f"sway [{step.index}/{step.total}, {elapsed:.0f} s] {step.label}", file=out)
        out.flush()

    yield line


@contextmanager
def _bar(out: TextIO) -> Iterator[Progress]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )

    columns: list[Any] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    console = Console(file=out, force_terminal=True)
    with RichProgress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("loading model", total=None)

        def show(step: Step) -> None:
            bar.update(task, description=step.label, completed=step.index - 1, total=step.total)

        yield show
