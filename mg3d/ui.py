"""Terminal output: one rich console on stderr, and progress bars for anything longer than a moment."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


def progress() -> Progress:
    """A progress display: spinner, description, bar, count, elapsed and remaining time.

    Example:
        >>> with progress() as bar:                      # doctest: +SKIP
        ...     task = bar.add_task("decoding", total=70)
        ...     bar.advance(task)
    """
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
