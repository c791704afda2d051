"""``dmqn bench``: train every listed model under one budget and print Tables 2 and 3."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dmqn_cli.common import WorkspaceOption, console, err_console, fail, handle_errors, open_workspace
from dmqn_cli.options import (
    BatchSizeOption, ConfigOption, DeviceOption, DropoutOption, EmbedDimOption, EpochsOption, InspectUsersOption,
    LrOption, MaxLenOption, MiddleLenOption, PatienceOption, ShortLenOption, TopKOption, WeightDecayOption,
    collect_settings,
)
from dmqn_cli.progress import RichProgress
from dmqn_core.bench import (
    ALL_MODELS, TABLE2_COLUMNS, TABLE3_COLUMNS, BenchStep, describe_budget, resolve_models, run_bench,
    table2_cells, table3_cells,
)


def _rich_table(title: str, columns: tuple[str, ...], cells: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in cells:
        table.add_row(*row)
    return table


@handle_errors
def bench(
    data: str = typer.Argument(..., help="Prepared data set: a NAME inside the workspace or a path (see `dmqn prep`)."),
    models: str = typer.Option("all", "--models", help=f"Comma-separated models, or 'all' ({', '.join(ALL_MODELS)})."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Runs per model, with seeds 0 .. SEEDS-1."),
    name: Optional[str] = typer.Option(None, "--name", help="Bench name \\[default: the data set plus a hash of the budget, so the same command resumes]."),
    config: Optional[Path] = ConfigOption,
    epochs: Optional[int] = EpochsOption,
    batch_size: Optional[int] = BatchSizeOption,
    lr: Optional[float] = LrOption,
    weight_decay: Optional[float] = WeightDecayOption,
    max_len: Optional[int] = MaxLenOption,
    patience: Optional[int] = PatienceOption,
    device: Optional[str] = DeviceOption,
    inspect_users: Optional[int] = InspectUsersOption,
    embed_dim: Optional[int] = EmbedDimOption,
    short_len: Optional[int] = ShortLenOption,
    middle_len: Optional[int] = MiddleLenOption,
    top_k: Optional[int] = TopKOption,
    dropout: Optional[float] = DropoutOption,
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Train and evaluate every listed model under one budget; print and save Tables 2 and 3.

    Every model gets the same epochs, batch size, learning rate, embedding size and MLP, with early stopping
    on validation AUC. Each run is stored in the run store. Re-running the same command skips finished runs
    and resumes interrupted ones. The tables are written as Markdown and CSV under WORKSPACE/benches/NAME/.
    """
    ws = open_workspace(workspace)
    model_list = resolve_models(models)
    model_settings, train_settings = collect_settings(
        config,
        {"embed_dim": embed_dim, "short_len": short_len, "middle_len": middle_len, "top_k": top_k, "dropout": dropout},
        {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
         "max_len": max_len, "patience": patience, "device": device,
         "inspect_users": inspect_users},
    )
    if "seed" in train_settings:
        raise typer.BadParameter("a seed in the train table of --config does not apply to a bench; use --seeds")
    seed_list = list(range(seeds))

    with RichProgress() as progress:
        def show(step: BenchStep) -> None:
            where = f"[{step.index}/{step.total}] {step.model} seed {step.seed}"
            text = {"train": f"training (run {step.run_id})", "resume": f"resuming run {step.run_id}",
                    "done": f"finished earlier (run {step.run_id})", "failed": f"[red]failed[/]: {step.message}"}
            progress.log(f"[bold cyan]{where}[/] {text[step.action]}")

        try:
            report = run_bench(ws, data, model_list, seed_list, model_settings, train_settings, name=name,
                               progress=progress, on_step=show)
        except KeyboardInterrupt:
            raise fail("interrupted; run the same command again to resume the bench", code=130) from None

    console.print(f"bench [bold]{report.name}[/] on {report.dataset}: {report.trained} run(s) trained now, "
                  f"{report.reused} reused")
    console.print(f"budget: {describe_budget(report.budget, seed_list)}")
    console.print(f"machine: {report.machine}")
    console.print(_rich_table("Table 2: all models (test split, mean ± std over seeds)", TABLE2_COLUMNS,
                              table2_cells(report.table2())))
    if report.table3():
        console.print(_rich_table("Table 3: DMQN-simple vs DMQN (ICIM)", TABLE3_COLUMNS, table3_cells(report.table3())))
    console.print(f"tables: {report.directory}/table2.md, table2.csv, table3.md, table3.csv")
    if report.failures:
        for failure in report.failures:
            err_console.print(f"[bold red]failed:[/] {failure}", highlight=False)
        raise typer.Exit(1)
