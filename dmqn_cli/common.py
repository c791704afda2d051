"""Options and error handling shared by every command."""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer
from rich.console import Console

from dmqn_core.errors import DmqnError
from dmqn_core.workspace import WORKSPACE_ENV, Workspace

console = Console()
err_console = Console(stderr=True)

WorkspaceOption = typer.Option(
    None,
    "--workspace",
    "-w",
    envvar=WORKSPACE_ENV,
    help="Workspace directory holding runs.duckdb, prepared data sets and checkpoints "
    "\\[default: ./dmqn-workspace].",
    show_default=False,
)

F = TypeVar("F", bound=Callable)


def open_workspace(path: Optional[Path]) -> Workspace:
    return Workspace(path).ensure()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def handle_errors(func: F) -> F:
    """Turn DmqnError (bad input, missing files, unknown ids) into one line and exit code 1.

    SIGTERM (a `kill`, a scheduler's time limit) is handled like Ctrl-C, so that a run being
    trained is marked interrupted and can be resumed, instead of being left "running".
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return func(*args, **kwargs)
        except DmqnError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]
