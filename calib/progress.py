"""Progress on stderr (stdout stays clean for --json): a line per stage, bars within it.

On an interactive terminal each stage shows a transient spinner with its elapsed time, and the
loops inside it (calibration batches, layers, verification batches) add bars under it; each stage
then leaves one line with its time. Where stderr is not a terminal (a pipe, a log file, CI) only
those lines are written, one per stage, so a log shows where a long run is. `set_quiet(True)`
(`--quiet`) or the environment variable PTQ_NO_PROGRESS silences both; warnings and errors stay.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False)
_state: dict = {"quiet": False, "live": None}


def set_quiet(quiet: bool) -> None:
    """Silence the stage lines and bars of this process (the CLI's --quiet)."""
    _state["quiet"] = quiet


@contextmanager
def muted() -> Iterator[None]:
    """Nothing on stderr inside, warnings included (a calibration rank other than 0: rank 0 prints
    them); errors raised out of the block print as usual."""
    quiet, console.quiet = _state["quiet"], True
    _state["quiet"] = True
    try:
        yield
    finally:
        console.quiet, _state["quiet"] = False, quiet


def _silent() -> bool:
    return _state["quiet"] or bool(os.environ.get("PTQ_NO_PROGRESS"))


def _bars() -> bool:
    return not _silent() and sys.stderr.isatty()


def _columns() -> tuple:
    return (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


@contextmanager
def stage(name: str) -> Iterator[None]:
    """One named stage: a spinner (terminal) while it runs, then one line `ptq: NAME  S s` (any stderr)."""
    t0 = time.perf_counter()
    if _bars() and _state["live"] is None:
        with Progress(*_columns(), console=console, transient=True) as bar:
            _state["live"] = bar
            bar.add_task(name, total=None)
            try:
                yield
            finally:
                _state["live"] = None
    else:
        yield
    note(f"{name}  {time.perf_counter() - t0:.1f} s")


def note(text: str) -> None:
    """One plain progress line (`ptq: TEXT`), unless silenced."""
    if not _silent():
        console.print(f"ptq: {text}", markup=False, highlight=False, soft_wrap=True)


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield an `advance(n=1)` function; a bar under the running stage (or alone) on a terminal only."""
    live = _state["live"]
    if not _bars():
        yield lambda n=1: None
    elif live is not None:
        task = live.add_task(description, total=total)
        try:
            yield lambda n=1: live.advance(task, n)
        finally:
            live.remove_task(task)
    else:
        with Progress(*_columns(), console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
