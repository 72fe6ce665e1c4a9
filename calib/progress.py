"""Progress bars on stderr (stdout stays clean for --json)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False)


def _enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("PTQ_NO_PROGRESS")


@contextmanager
def progress(description: str, total: int) -> Iterator["callable"]:
    """Yield an `advance(n=1)` function; shows a bar only on an interactive terminal."""
    if not _enabled():
        yield lambda n=1: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
