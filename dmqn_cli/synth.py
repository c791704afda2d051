"""``dmqn synth``: write a synthetic behavior log in the Taobao UserBehavior format."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer

from dmqn_cli.common import console, err_console, handle_errors
from dmqn_core.synth import write_log


class Scale(str, Enum):
    tiny = "tiny"
    small = "small"
    medium = "medium"


@handle_errors
def synth(
    out: Path = typer.Argument(
        ..., help="CSV file to write (replaced atomically if it exists).", show_default=False
    ),
    scale: Scale = typer.Option(
        Scale.small,
        "--scale",
        help="Size of the log: tiny (200 users, ~24k rows), small (1,500 users, ~370k rows) "
        "or medium (20,000 users, ~8M rows).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed and scale give the same bytes."),
) -> None:
    """Write a synthetic log (user_id,item_id,category_id,behavior_type,timestamp; no header)
    whose users revisit long-term interests with their own periods, for quick experiments."""
    start = time.perf_counter()
    with err_console.status(f"generating the {scale.value} synthetic log", spinner="dots"):
        summary = write_log(out, scale.value, seed)
    console.print(
        f"wrote {summary.rows:,} rows ({summary.users:,} users, {summary.items:,} items, "
        f"{summary.categories:,} categories) in {time.perf_counter() - start:.1f}s to {summary.path}",
        highlight=False,
        soft_wrap=True,
    )
