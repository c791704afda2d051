"""``dmqn synth``: write a synthetic behavior log in the Taobao UserBehavior format, or compare one
with a real log."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Column

from dmqn_cli.common import JsonOption, console, handle_errors, plain, print_json
from dmqn_cli.progress import RichProgress
from dmqn_cli.results import fitted_table, number
from dmqn_core.data.log_stats import (
    COUNT_TOLERANCE,
    SHARE_TOLERANCE,
    Comparison,
    LogStatistics,
    compare,
    log_statistics,
    synthetic_log_statistics,
)
from dmqn_core.data.synth import write_log
from dmqn_core.errors import DmqnError


class Scale(str, Enum):
    tiny = "tiny"
    small = "small"
    medium = "medium"
    taobao = "taobao"


@handle_errors
def synth(
    out: Optional[Path] = typer.Argument(
        None,
        help="CSV file to write (replaced atomically if it exists). With --compare: a synthetic log to "
        "compare, read and not written.",
        show_default=False,
    ),
    scale: Scale = typer.Option(
        Scale.small,
        "--scale",
        help="Size of the log: tiny (200 users, ~21k rows), small (1,500 users, ~150k rows), "
        "medium (20,000 users with four times longer histories, ~8M rows) or taobao (the full "
        "UserBehavior shape: ~988k users, ~100M rows, ~3.7 GB, with a few malformed rows and "
        "out-of-range timestamps; written block by block in bounded memory, a few minutes).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed and scale give the same bytes."),
    real: Optional[Path] = typer.Option(
        None,
        "--compare",
        metavar="REAL.csv",
        help="Print the statistics of this real Taobao log beside a synthetic one's: OUT when given, else "
        "the log --scale and --seed make, generated into a temporary file that is removed (so what is "
        "measured is exactly what `dmqn synth` writes). Writes nothing.",
        show_default=False,
    ),
    json: bool = JsonOption,
) -> None:
    """Write a synthetic log (user_id,item_id,category_id,behavior_type,timestamp; no header) with
    the statistics of the real Taobao sample, or compare a synthetic log with a real one (--compare)."""
    if real is not None:
        synthetic = log_statistics(out) if out is not None else synthetic_log_statistics(scale.value, seed)
        real_stats = log_statistics(real)
        synthetic_name = str(out) if out is not None else f"synth --scale {scale.value} --seed {seed}"
        _print_comparison(str(real), real_stats, synthetic_name, synthetic, json)
        return
    if json:
        raise DmqnError("--json goes with --compare")
    if out is None:
        raise DmqnError("give the CSV file to write (or --compare REAL.csv to compare logs)")
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


def _print_comparison(
    real_name: str, real: LogStatistics, synthetic_name: str, synthetic: LogStatistics, as_json: bool
) -> None:
    rows = compare(real, synthetic)
    met = sum(row.within_target for row in rows)
    if as_json:
        print_json(
            {
                "real": _log_json(real_name, real),
                "synthetic": _log_json(synthetic_name, synthetic),
                "tolerance": {"share": SHARE_TOLERANCE, "count": COUNT_TOLERANCE},
                "figures": [
                    {
                        "key": row.figure.key,
                        "label": row.figure.label,
                        "kind": row.figure.kind,
                        "real": number(row.real),
                        "synthetic": number(row.synthetic),
                        "within_target": row.within_target,
                    }
                    for row in rows
                ],
                "within_target": met,
            }
        )
        return
    columns = [Column("figure"), Column("real", justify="right"), Column("synthetic", justify="right")]
    columns += [Column("target", justify="right"), Column("met")]
    table = fitted_table(
        "real vs synthetic",
        columns,
        [
            (row.figure.label, _value(row, row.real), _value(row, row.synthetic), _target(row), _met(row))
            for row in rows
        ],
    )
    console.print(table)
    for role, name, stats in (("real", real_name, real), ("synthetic", synthetic_name, synthetic)):
        console.print(
            plain(
                f"{role}: {name}: {stats.rows:,} rows, {stats.users:,} users, {stats.items:,} items, "
                f"{stats.categories:,} categories; {stats.last_clicks:,} last clicks after 20+ behaviors"
            ),
            highlight=False,
        )
    console.print(plain(f"{met} of {len(rows)} figures within target"), highlight=False)


def _log_json(name: str, stats: LogStatistics) -> dict:
    return {
        "log": name,
        "rows": stats.rows,
        "users": stats.users,
        "items": stats.items,
        "categories": stats.categories,
        "last_clicks": stats.last_clicks,
    }


def _value(row: Comparison, value: float) -> str:
    return f"{value:.3f}" if row.figure.kind == "share" else f"{value:,.1f}"


def _target(row: Comparison) -> str:
    return f"±{SHARE_TOLERANCE:.2f}" if row.figure.kind == "share" else f"±{COUNT_TOLERANCE:.0%}"


def _met(row: Comparison) -> str:
    return "yes" if row.within_target else "NO"
