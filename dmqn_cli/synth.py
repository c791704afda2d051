"""``dmqn synth``: write a synthetic behavior log in the Taobao UserBehavior format."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer

from dmqn_cli.common import console, handle_errors, plain
from dmqn_cli.progress import RichProgress
from dmqn_core.data.synth import write_log


class Scale(str, Enum):
    tiny = "tiny"
    small = "small"
    medium = "medium"
    taobao = "taobao"


@handle_errors
def synth(
    out: Path = typer.Argument(..., help="CSV file to write (replaced atomically if it exists).", show_default=False),
    scale: Scale = typer.Option(
        Scale.small,
        "--scale",
        help="Size of the log: tiny (200 users, ~24k rows), small (1,500 users, ~370k rows), "
        "medium (20,000 users, ~8M rows) or taobao (the full UserBehavior shape: ~988k users, "
        "~100M rows, ~3.7 GB, with a few malformed rows and out-of-range timestamps; written "
        "block by block in bounded memory, a few minutes).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed and scale give the same bytes."),
) -> None:
    """Write a synthetic log (user_id,item_id,category_id,behavior_type,timestamp; no header)
    whose users revisit long-term interests with their own periods, for quick experiments."""
    start = time.perf_counter()
    with RichProgress() as progress:
        summary = write_log(out, scale.value, seed, progress=progress)
    seconds = time.perf_counter() - start
    quirks = ""
    if summary.malformed or summary.out_of_range:
        quirks = (
            f"; {summary.malformed:,} malformed rows and {summary.out_of_range:,} timestamps "
            "outside the window, as in the real release"
        )
    console.print(
        plain(
            f"wrote {summary.rows:,} rows ({summary.users:,} users, {summary.items:,} items, "
            f"{summary.categories:,} categories{quirks}) in {seconds:.1f}s "
            f"({summary.rows / max(seconds, 1e-9):,.0f} rows/s) to {summary.path}"
        ),  # the path is the user's: brackets and escapes in it are text
        highlight=False,
        soft_wrap=True,
    )
