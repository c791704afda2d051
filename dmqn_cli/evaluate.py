"""``dmqn eval``: AUC, GAUC and logloss of a trained run on a split."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from dmqn_cli.common import (
    ComputeDeviceOption,
    JsonOption,
    WorkspaceOption,
    console,
    handle_errors,
    open_workspace,
    print_json,
)
from dmqn_cli.progress import RichProgress
from dmqn_cli.results import metrics_table, number
from dmqn_core.training.evaluate import evaluate_run


class Split(str, Enum):
    test = "test"
    valid = "valid"
    train = "train"


@handle_errors
def evaluate(
    run_id: Optional[str] = typer.Argument(None, help="Run to evaluate \\[default: the latest run]."),
    split: Split = typer.Option(Split.test, "--split", help="Which split of the run's data set."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Samples per inference batch \\[default: the run's eval batch size]."
    ),
    device: str = ComputeDeviceOption,
    precision: str = typer.Option(
        "fp32", "--precision", help="fp32, as training evaluates, or bf16: the forward under bfloat16 autocast (CUDA)."
    ),
    as_json: bool = JsonOption,
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Evaluate a run's best-validation weights; the metrics are printed and stored in the run store.

    --json prints {run_id, split, auc, gauc, logloss, samples, samples_per_s} (null: no value); the progress
    bar goes to stderr.
    """
    ws = open_workspace(workspace)
    with RichProgress() as progress:
        run, metrics = evaluate_run(ws, run_id, split.value, batch_size, device, progress, precision)
    if as_json:
        print_json(
            {
                "run_id": run,
                "split": split.value,
                "auc": number(metrics.get("auc")),
                "gauc": number(metrics.get("gauc")),
                "logloss": number(metrics.get("logloss")),
                "samples": int(metrics["samples"]) if "samples" in metrics else None,
                "samples_per_s": number(metrics.get("samples_per_s")),
            }
        )
        return
    console.print(metrics_table(f"run {run} · {split.value}", [(split.value, metrics)]))
