"""Printing results of core functions as rich tables."""

from __future__ import annotations

import math

from rich.table import Table

from dmqn_cli.common import console
from dmqn_core.train import TrainResult


def fmt(value: float | int | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def metrics_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> Table:
    table = Table(title=title)
    for column in ("", "AUC", "GAUC", "logloss", "samples", "samples/s"):
        table.add_column(column, justify="right" if column else "left")
    for label, m in rows:
        table.add_row(label, fmt(m.get("auc")), fmt(m.get("gauc")), fmt(m.get("logloss")),
                      fmt(int(m["samples"])) if "samples" in m else "-", fmt(m.get("samples_per_s"), 0))
    return table


def print_train_result(result: TrainResult) -> None:
    console.print(f"run [bold]{result.run_id}[/]: {result.model} on {result.dataset}, "
                  f"{result.n_parameters:,} parameters, best epoch {result.best_epoch}, "
                  f"valid AUC {fmt(result.best_valid_auc)}, {result.train_seconds:.0f} s of training")
    console.print(metrics_table("test", [(result.model, result.test)]))
