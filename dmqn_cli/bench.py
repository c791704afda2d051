"""``dmqn bench``: train every listed model under one budget and print Tables 2 and 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Column, Table
from rich.text import Text

from dmqn_cli.common import (
    JsonOption,
    WideOption,
    WorkspaceOption,
    console,
    err_console,
    fail,
    handle_errors,
    open_workspace,
    plain,
    print_json,
)
from dmqn_cli.options import SETTING_OPTIONS, ConfigOption, SettingFlags, collect_settings, setting_flags
from dmqn_cli.progress import RichProgress
from dmqn_cli.results import fitted_table, number
from dmqn_core.training.bench import (
    ALL_MODELS,
    BOOTSTRAP_REPLICATES,
    TABLE3_COLUMNS,
    BenchReport,
    BenchStep,
    describe_budget,
    mean_std,
    resolve_models,
    run_bench,
    table2_cells,
    table2_columns,
    table3_cells,
)

# What a narrow terminal (or a pipe: 80 columns) gives up first; the model, test AUC and GAUC stay.
_DROPPABLE = (
    "infer/s",
    "train/s",
    "params",
    "logloss",
    "runs",
    "Δ GAUC 95% CI",
    "Δ GAUC",
    "GAUC",
    "Δ AUC vs dmqn-simple",
)


def _terminal_table(title: str, columns: tuple[str, ...], cells: list[list[str]], wide: bool) -> Table:
    # No cell wraps: a model name or a "mean ± std" is read whole or not shown.
    return fitted_table(
        title,
        [Column(c, justify="left" if i == 0 else "right", no_wrap=True) for i, c in enumerate(columns)],
        cells,
        droppable=_DROPPABLE,
        wide=wide,
    )


def _bench_json(report: BenchReport, seeds: list[int]) -> dict[str, Any]:
    """The bench for scripts: one row per model with the mean and sample std over the seeds (null: none)."""
    rows = []
    for row in report.table2():
        fields: dict[str, Any] = {"model": row.model, "runs": len(row.auc), "run_ids": row.run_ids}
        for name, values in (("auc", row.auc), ("gauc", row.gauc), ("logloss", row.logloss)):
            mean, std = mean_std(values)
            fields[f"{name}_mean"], fields[f"{name}_std"] = number(mean), number(std)
        rows.append(
            {
                **fields,
                "train_samples_per_s": number(row.train_samples_per_s),
                "infer_samples_per_s": number(row.infer_samples_per_s),
                "n_parameters": row.n_parameters,
                "best_epochs": row.best_epochs,
                "failed": row.failed,
                "against": None
                if row.against is None
                else {
                    f"delta_{metric}": {"delta": diff.delta, "low": diff.low, "high": diff.high}
                    for metric, diff in row.against.items()
                },
            }
        )
    return {
        "name": report.name,
        "dataset": report.dataset,
        "directory": str(report.directory),
        "seeds": seeds,
        "budget": report.budget,
        "machine": report.machine,
        "against_model": report.against,
        "trained": report.trained,
        "reused": report.reused,
        "rows": rows,
        "failures": report.failures,
    }


@handle_errors
@setting_flags("bench")
def bench(
    data: str = typer.Argument(..., help="Prepared data set: a NAME inside the workspace or a path (see `dmqn prep`)."),
    models: str = typer.Option("all", "--models", help=f"Comma-separated models, or 'all' ({', '.join(ALL_MODELS)})."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Runs per model, with seeds 0 .. SEEDS-1."),
    name: Optional[str] = typer.Option(
        None,
        "--name",
        help="Bench name \\[default: the data set plus a hash of the budget, so the same command resumes].",
    ),
    config: Optional[Path] = ConfigOption,
    flags: SettingFlags = SETTING_OPTIONS,
    tuned: Optional[str] = typer.Option(
        None,
        "--tuned",
        help="Comma-separated studies of `dmqn tune`: each one's model trains with its best trial's settings.",
    ),
    storage: Optional[str] = typer.Option(
        None, "--storage", help="Optuna database of the --tuned studies \\[default: WORKSPACE/tune/studies.db]."
    ),
    against: Optional[str] = typer.Option(
        None,
        "--against",
        metavar="MODEL",
        help="Add to every row its Δ test AUC and Δ GAUC against MODEL (one of --models), seeds averaged, "
        f"with a 95 % paired bootstrap interval over test users ({BOOTSTRAP_REPLICATES:,} replicates).",
    ),
    as_json: bool = JsonOption,
    wide: bool = WideOption,
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Train and evaluate every listed model under one budget; print and save Tables 2 and 3.

    Every model gets the same epochs, batch size, learning rate, embedding size and MLP, with early stopping
    on validation AUC. Each run is stored in the run store. Re-running the same command skips finished runs
    and resumes interrupted ones. The tables are written as Markdown and CSV under WORKSPACE/benches/NAME/.

    --tuned STUDY,...: each study's model trains with its best trial's searched settings; the rest is shared.

    --against MODEL: every other row gets its difference to MODEL (seeds averaged) in test AUC and GAUC, with
    the 95 % interval of a paired bootstrap over test users: both models are scored on the same resampled
    users, so the interval says how much the difference depends on which users are in the test set.

    --json prints {name, dataset, directory, seeds, budget, machine, against_model, trained, reused, rows,
    failures}, a row per model with model, runs, run_ids, auc_mean, auc_std, gauc_mean, gauc_std,
    logloss_mean, logloss_std, train_samples_per_s, infer_samples_per_s, n_parameters, best_epochs, failed
    and against ({delta_auc, delta_gauc}, each {delta, low, high}; null without --against) (null: no value);
    progress goes to stderr.
    """
    ws = open_workspace(workspace)
    model_list = resolve_models(models)
    model_settings, train_settings = collect_settings(config, flags)
    if "seed" in train_settings:
        raise typer.BadParameter("a seed in the train table of --config does not apply to a bench; use --seeds")
    seed_list = list(range(seeds))

    with RichProgress() as progress:

        def show(step: BenchStep) -> None:
            where = f"[{step.index}/{step.total}] {step.model} seed {step.seed}"
            outcome = {
                "train": plain(f"training (run {step.run_id})"),
                "resume": plain(f"resuming run {step.run_id}"),
                "done": plain(f"finished earlier (run {step.run_id})"),
                "failed": Text.assemble(("failed", "red"), plain(f": {step.message}")),
            }
            progress.log(Text.assemble((where, "bold cyan"), " ", outcome[step.action]))

        try:
            report = run_bench(
                ws,
                data,
                model_list,
                seed_list,
                model_settings,
                train_settings,
                name=name,
                progress=progress,
                on_step=show,
                tuned=[study.strip() for study in (tuned or "").split(",") if study.strip()],
                storage=storage,
                against=against,
            )
        except KeyboardInterrupt:
            raise fail("interrupted; run the same command again to resume the bench", code=130) from None

    if as_json:
        print_json(_bench_json(report, seed_list))
    else:
        console.print(
            Text.assemble(
                "bench ",
                plain(report.name, "bold"),
                plain(f" on {report.dataset}: {report.trained} run(s) trained now, {report.reused} reused"),
            )
        )
        console.print(plain(f"budget: {describe_budget(report.budget, seed_list)}"))
        console.print(plain(f"machine: {report.machine}"))
        console.print(
            _terminal_table(
                "Table 2: all models (test split, mean ± std over seeds"
                + (f"; Δ = model - {report.against}, paired bootstrap 95% CI)" if report.against else ")"),
                table2_columns(report.against),
                table2_cells(report.table2(), report.against),
                wide,
            ),
            crop=not wide,
        )
        if report.table3():
            console.print(
                _terminal_table(
                    "Table 3: DMQN-simple vs DMQN (ICIM)", TABLE3_COLUMNS, table3_cells(report.table3()), wide
                ),
                crop=not wide,
            )
        console.print(plain(f"tables: {report.directory}/table2.md, table2.csv, table3.md, table3.csv"))
    if report.failures:
        for failure in report.failures:
            err_console.print(Text.assemble(("failed:", "bold red"), " ", plain(failure)), highlight=False)
        raise typer.Exit(1)
