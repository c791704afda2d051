"""``dmqn eval``: AUC, GAUC and logloss of a trained run on a split."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from dmqn_cli.common import WorkspaceOption, console, handle_errors, open_workspace
from dmqn_cli.progress import RichProgress
from dmqn_cli.results import metrics_table
from dmqn_core.evaluate import evaluate_run


class Split(str, Enum):
    test = "test"
    valid = "valid"
    train = "train"


@handle_errors
def evaluate(
    run_id: Optional[str] = typer.Argument(None, help="Run to evaluate \\[default: the latest run]."),
    split: Split = typer.Option(Split.test, "--split", help="Which split of the run's data set."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per inference batch \\[default: the run's eval batch size]."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Evaluate a run's best-validation weights; the metrics are printed and stored in the run store."""
    ws = open_workspace(workspace)
    with RichProgress() as progress:
        run, metrics = evaluate_run(ws, run_id, split.value, batch_size, device, progress)
    console.print(metrics_table(f"run {run} · {split.value}", [(split.value, metrics)]))
