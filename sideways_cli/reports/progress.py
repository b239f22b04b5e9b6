"""What a command shows while it works: progress bars with ETA, one style for training and
evaluation, and log lines; neither with --quiet."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
Log = Callable[[str], None]  # where a command's log lines go


def silent(_: str) -> None:
    """A log that shows nothing: --quiet, and every process of a job but the one that reports."""


def console_log(console: Console, quiet: bool) -> Log:
    """``console``'s log lines, or none with --quiet."""
    return silent if quiet else console.print


def progress_bar(quiet: bool) -> Progress | nullcontext:
    """A live display to add tasks to (``None`` inside ``with`` when quiet). Rich allows one live
    display at a time, so work done inside a training run adds its task to the run's bar."""
    if quiet:
        return nullcontext()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=True)


def tracked(items: Iterable[T], bar: Progress | None, description: str) -> Iterator[T]:
    """Iterate ``items``, advancing a task of ``bar`` that is removed when done."""
    if bar is None:
        yield from items
        return
    total = len(items) if hasattr(items, "__len__") else None
    task = bar.add_task(description, total=total, info="")
    try:
        for item in items:
            yield item
            bar.advance(task)
    finally:
        bar.remove_task(task)
