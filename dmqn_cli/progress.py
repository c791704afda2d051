"""Rich progress bars behind dmqn_core's Progress protocol."""

from __future__ import annotations

from typing import Any

from rich.console import RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dmqn_cli.common import err_console, plain
from dmqn_core.errors import printable


def _format_info(info: dict[str, Any]) -> str:
    parts = []
    for key, value in info.items():
        label = key.replace("_per_s", "/s").replace("_", " ")
        if isinstance(value, float):
            parts.append(f"{label} {value:,.0f}" if abs(value) >= 100 else f"{label} {value:.4f}")
        else:
            parts.append(f"{label} {value}")
    return printable("  ".join(parts))


class RichProgress:
    """One bar at a time on stderr (stdout stays clean for results); use as a context manager."""

    def __init__(self) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            # markup=False: a description or a value may quote a user's name.
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            # Not drawn into a file or a pipe, where a transient bar would only leave an empty line;
            # log() lines still go there.
            disable=not err_console.is_terminal,
        )
        self._task = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._progress.stop()

    def start(self, description: str, total: int | None) -> None:
        self.stop()
        self._task = self._progress.add_task(printable(description), total=total, info="")

    def advance(self, steps: int = 1, **info: Any) -> None:
        if self._task is None:
            return
        if info:
            self._progress.update(self._task, advance=steps, info=_format_info(info))
        else:  # the last info stays on the line
            self._progress.update(self._task, advance=steps)

    def stop(self) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None

    def log(self, message: RenderableType) -> None:
        """A line above the bar; a str is shown as plain() shows it (core messages quote names and paths)."""
        self._progress.console.print(plain(message) if isinstance(message, str) else message, highlight=False)
