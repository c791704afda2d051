"""Printing results of core functions: rich tables that fit the terminal, and the values scripts get."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from rich import box
from rich.console import RenderableType
from rich.table import Column, Table
from rich.text import Text

from dmqn_cli.common import console, plain
from dmqn_core.devices import describe
from dmqn_core.training.train import TrainResult


def fmt(value: float | int | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def number(value: float | int | None) -> float | int | None:
    """A value as JSON can carry it: a plain int or float (not numpy's); None (null) for None, NaN and infinities."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def fitted_table(
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[RenderableType]],
    droppable: Sequence[str] = (),
    wide: bool = False,
) -> Table:
    """A compact table that fits the terminal (80 columns when piped) without cutting a cell short.

    The ``droppable`` columns (headers) go, in that order, until the rest fit; a caption names them.
    ``wide`` keeps every column and gives the table its natural width, wider than the terminal if need be
    (print it with crop=False).
    """
    keep = list(range(len(columns)))
    dropping = [i for header in droppable for i, column in enumerate(columns) if column.header == header]
    while True:
        table = Table(
            *(columns[i].copy() for i in keep),
            title=plain(title),
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            padding=(0, 1, 0, 0),
        )
        for row in rows:
            # A str cell would be read as Rich markup; every one is shown as plain() shows it.
            table.add_row(*(plain(row[i]) if isinstance(row[i], str) else row[i] for i in keep))
        natural = console.measure(table, options=console.options.update_width(100_000)).maximum
        if wide:
            table.width = natural
            return table
        if natural <= console.width or not dropping:
            break
        keep.remove(dropping.pop(0))
    hidden = [str(column.header) for i, column in enumerate(columns) if i not in keep]
    if hidden:
        table.caption = Text(f"hidden: {', '.join(hidden)} (--wide shows them)")
        table.caption_justify = "left"
    return table


def metrics_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> Table:
    table = Table(title=plain(title))
    for column in ("", "AUC", "GAUC", "logloss", "samples", "samples/s"):
        table.add_column(column, justify="right" if column else "left")
    for label, m in rows:
        table.add_row(
            plain(label),
            fmt(m.get("auc")),
            fmt(m.get("gauc")),
            fmt(m.get("logloss")),
            fmt(int(m["samples"])) if "samples" in m else "-",
            fmt(m.get("samples_per_s"), 0),
        )
    return table


def print_train_result(result: TrainResult) -> None:
    console.print(
        Text.assemble(
            "run ",
            (result.run_id, "bold"),
            plain(
                f": {result.model} on {result.dataset}, {result.n_parameters:,} parameters, "
                f"best epoch {result.best_epoch}, valid AUC {fmt(result.best_valid_auc)}, "
                f"{result.train_seconds:.0f} s of training on {describe(result.device)}"
                + ("" if result.precision == "fp32" else f" ({result.precision} autocast)")
            ),
        )
    )
    console.print(metrics_table("test", [(result.model, result.test)]))
