"""Options, output helpers and error handling shared by every command."""

from __future__ import annotations

import functools
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from dmqn_core.data.prepared import RAW_ID_RANGE
from dmqn_core.errors import DmqnError, printable
from dmqn_core.workspace import WORKSPACE_ENV, Workspace

console = Console()
err_console = Console(stderr=True)

WorkspaceOption = typer.Option(
    None,
    "--workspace",
    "-w",
    envvar=WORKSPACE_ENV,
    help="Workspace directory holding runs.duckdb, prepared data sets and checkpoints \\[default: ./dmqn-workspace].",
    show_default=False,
)
JsonOption = typer.Option(
    False, "--json", help="Print JSON for scripts instead of tables; nothing else goes to stdout."
)
WideOption = typer.Option(False, "--wide", help="Show every column, however wide the table gets.")
ComputeDeviceOption = typer.Option(
    "auto", "--device", help="auto, cpu, cuda or cuda:N; auto is CUDA where torch sees a GPU, else the CPU."
)

P = ParamSpec("P")
R = TypeVar("R")
# What a raw-id option holds: one id, or a list of them from a repeated option; None where not given.
Ids = TypeVar("Ids", int | None, list[int] | None)


def open_workspace(path: Optional[Path]) -> Workspace:
    return Workspace(path).ensure()


def _int64(value: int, param_hint: str | None = None) -> int:
    if value not in RAW_ID_RANGE:
        raise typer.BadParameter(f"{value} is outside the 64-bit range of ids", param_hint=param_hint)
    return value


def parse_id(text: str, what: str, param_hint: str) -> int:
    """A raw id typed by the user in a list or a file; typer.BadParameter unless it is an int64."""
    try:
        value = int(text)
    except ValueError:
        raise typer.BadParameter(f"{text.strip()!r} is not {what}", param_hint=param_hint) from None
    return _int64(value, param_hint)


def int64_ids(value: Ids) -> Ids:
    """Typer callback of a raw-id option (one id or a repeated option): each must be an int64."""
    for item in value if isinstance(value, list) else [] if value is None else [value]:
        _int64(item)
    return value


def print_json(value: Any) -> None:
    """One JSON document on stdout, nothing else (no Rich: it would wrap and colour the text)."""
    typer.echo(json.dumps(value, indent=2, allow_nan=False))


def plain(text: object, style: str = "") -> Text:
    """Text from users, logs or the run store as a terminal may show it: never Rich markup (a data set
    called '[red]x' is shown as typed), control characters escaped (dmqn_core.errors.printable)."""
    return Text(printable(str(text)), style=style)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    # A message quotes user input ('[model]', a name holding ESC or a newline, a row of a log).
    err_console.print(Text.assemble(("error:", "bold red"), " ", plain(message)), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _describe_os_error(exc: OSError) -> str:
    """'<strerror>: <file>' (or '<file> -> <file2>' for a rename), as the shell says it."""
    text = exc.strerror or str(exc)
    files = [os.fsdecode(name) for name in (exc.filename, exc.filename2) if name is not None]
    return f"{text}: {' -> '.join(files)}" if files else text


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn DmqnError (bad input, missing files, unknown ids) and OSError (a read-only or full disk,
    a name too long) into one line and exit code 1; any other exception is a bug and keeps its traceback.

    SIGTERM (a `kill`, a scheduler's time limit) is handled like Ctrl-C, so that a run being
    trained is marked interrupted and can be resumed, instead of being left "running".
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return func(*args, **kwargs)
        except DmqnError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            raise fail(_describe_os_error(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper
