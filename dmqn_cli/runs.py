"""``dmqn runs`` and ``dmqn runs show``: what the run store holds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dmqn_cli.common import WorkspaceOption, console, handle_errors, open_workspace
from dmqn_cli.results import fmt
from dmqn_core.runstore import RunStore, iter_param_rows

runs_app = typer.Typer(help="List runs, or show one run's parameters and metric history.", no_args_is_help=False)


@runs_app.callback(invoke_without_command=True)
@handle_errors
def list_runs(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Only runs on this data set."),
    model: Optional[str] = typer.Option(None, "--model", help="Only runs of this model."),
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """List runs: id, model, data set, status, best valid AUC, test AUC, duration."""
    if ctx.invoked_subcommand is not None:
        return
    store = RunStore(open_workspace(workspace).store_path)
    records = store.list_runs(dataset=dataset, model=model)
    if not records:
        console.print(f"no runs in {store.path} yet — try `dmqn quickstart` or `dmqn train`")
        return
    table = Table(title=f"runs in {store.path}")
    table.add_column("run", no_wrap=True)
    for column in ("model", "data set", "status", "epochs", "best valid AUC", "test AUC", "test GAUC", "train s", "created"):
        table.add_column(column)
    for r in records:
        table.add_row(r.run_id, r.model, r.dataset, r.status, str(r.epochs_done), fmt(r.best_valid_auc),
                      fmt(r.test_auc), fmt(r.test_gauc), f"{r.train_seconds or 0:.0f}",
                      r.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@runs_app.command("show")
@handle_errors
def show_run(
    run_id: Optional[str] = typer.Argument(None, help="Run to show \\[default: the latest run]."),
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Parameters, summary and per-epoch metric history of one run."""
    store = RunStore(open_workspace(workspace).store_path)
    record = store.get_run(store.resolve_run_id(run_id))
    console.print(f"[bold]run {record.run_id}[/]  {record.model} on {record.dataset}  status {record.status}"
                  f"  parameters {fmt(record.n_parameters)}")
    if record.error:
        console.print(f"[red]error:[/] {record.error}")
    params = Table(title="parameters", show_header=False)
    params.add_column("name")
    params.add_column("value")
    for name, value in iter_param_rows(record.params):
        params.add_row(name, str(value))
    console.print(params)
    history = store.metric_history(record.run_id)
    if history:
        names = sorted({(split, name) for _, split, name, _ in history})
        table = Table(title="metrics")
        table.add_column("epoch")
        for split, name in names:
            table.add_column(f"{split} {name}", justify="right")
        by_epoch: dict[object, dict[tuple[str, str], float]] = {}
        for epoch, split, name, value in history:
            by_epoch.setdefault("eval" if epoch is None else epoch, {})[(split, name)] = value
        for epoch, values in by_epoch.items():
            table.add_row(str(epoch), *[fmt(values.get(key)) if key[1] != "samples" else fmt(int(values[key])) if key in values else "-"
                                        for key in names])
        console.print(table)
    usage = store.codebook_usage(record.run_id)
    if usage:
        table = Table(title="codebook utilisation (validation behaviors)")
        for column in ("epoch", "codebook", "used", "dead", "perplexity"):
            table.add_column(column, justify="right")
        for epoch, codebook, used, dead, perplexity in usage:
            table.add_row(str(epoch), str(codebook), str(used), str(dead), f"{perplexity:.1f}")
        console.print(table)
