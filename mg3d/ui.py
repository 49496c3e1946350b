"""Terminal output: one rich console on stderr, and progress bars for anything longer than a moment."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


class LoggedProgress(Progress):
    """A rich Progress that, off a terminal (a log file, CI, a job in the background), where rich draws
    nothing until the end, prints a plain line per task every ``every`` seconds: description, count, elapsed
    time and the task's fields (loss, PSNR, ...)."""

    def __init__(self, *columns: Any, every: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.every = every
        self._logged: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if self.console.is_terminal:
            return
        now = time.monotonic()
        if now - self._logged.setdefault(task_id, now) < self.every:
            return
        self._logged[task_id] = now
        task = self._tasks[task_id]
        total = "" if task.total is None else f"/{task.total:g}"
        fields = "".join(f"  {k} {v:.5g}" if isinstance(v, float) else f"  {k} {v}" for k, v in task.fields.items())
        self.console.print(f"{task.description}: {task.completed:g}{total}, {task.elapsed or 0:.0f} s{fields}", markup=False)


def progress(every: float = 60.0) -> Progress:
    """A progress display: spinner, description, bar, count, elapsed and remaining time (and off a terminal,
    a plain line every ``every`` seconds: :class:`LoggedProgress`).

    Example:
        >>> with progress() as bar:                      # doctest: +SKIP
        ...     task = bar.add_task("decoding", total=70)
        ...     bar.advance(task)
    """
    return LoggedProgress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        every=every,
    )
