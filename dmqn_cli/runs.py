"""``dmqn runs`` and ``dmqn runs show``: what the run store holds."""

from __future__ import annotations

import csv
import io
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
    handle_errors,
    open_workspace,
    plain,
    print_json,
)
from dmqn_cli.results import fitted_table, fmt, number
from dmqn_core.errors import printable
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RunRecord, RunStore, iter_param_rows

runs_app = typer.Typer(help="List runs, or show one run's parameters and metric history.", no_args_is_help=False)

# The fields of a run in --json and --csv, in this order; their names do not change.
RUN_FIELDS = (
    "run_id",
    "model",
    "dataset",
    "status",
    "epochs",
    "best_epoch",
    "best_valid_auc",
    "test_auc",
    "test_gauc",
    "test_logloss",
    "n_parameters",
    "seed",
    "train_seconds",
    "created_at",
    "finished_at",
    "error",
)

# The metrics of `dmqn runs show` in this order, any other after them.
_METRIC_ORDER = ("loss", "auc", "gauc", "logloss", "samples", "samples_per_s")

# What a narrow terminal (or a pipe: 80 columns) gives up first; run, model, data set, status and test AUC stay.
_DROPPABLE = ("train s", "test GAUC", "epochs", "created", "valid AUC")


def run_fields(record: RunRecord) -> dict[str, Any]:
    """A run as scripts read it: JSON numbers, ISO-8601 times, None (null) where there is no value."""
    return {
        "run_id": record.run_id,
        "model": record.model,
        "dataset": record.dataset,
        "status": record.status,
        "epochs": record.epochs_done,
        "best_epoch": record.best_epoch,
        "best_valid_auc": number(record.best_valid_auc),
        "test_auc": number(record.test_auc),
        "test_gauc": number(record.test_gauc),
        "test_logloss": number(record.test_logloss),
        "n_parameters": record.n_parameters,
        "seed": record.seed,
        "train_seconds": number(record.train_seconds),
        "created_at": record.created_at.isoformat(),
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        "error": record.error,
    }


def _csv(records: list[RunRecord]) -> str:
    out = io.StringIO()
    # None is written as an empty cell. Keyed by str: a checker would take the key type from RUN_FIELDS' literals.
    writer: csv.DictWriter[str] = csv.DictWriter(out, fieldnames=RUN_FIELDS, lineterminator="\n")
    writer.writeheader()
    # Control characters escaped as on the terminal: the CSV is read by people too, often unredirected.
    writer.writerows({k: printable(v) if isinstance(v, str) else v for k, v in run_fields(r).items()} for r in records)
    return out.getvalue()


def _runs_table(store: RunStore, records: list[RunRecord], wide: bool) -> Table:
    # Ids, models, statuses and numbers never wrap or shrink; only a long data set name wraps.
    columns = [
        Column("run", no_wrap=True),
        Column("model", no_wrap=True),
        Column("data set", overflow="fold"),
        Column("status", no_wrap=True),
        *(
            Column(header, justify="right", no_wrap=True)
            for header in ("epochs", "valid AUC", "test AUC", "test GAUC", "train s", "created")
        ),
    ]
    date = "%Y-%m-%d %H:%M" if wide else "%m-%d %H:%M"
    rows = [
        [
            plain(r.run_id),
            plain(r.model),
            plain(r.dataset),
            plain(r.status),
            str(r.epochs_done),
            fmt(r.best_valid_auc),
            fmt(r.test_auc),
            fmt(r.test_gauc),
            f"{r.train_seconds or 0:.0f}",
            r.created_at.strftime(date),
        ]
        for r in records
    ]
    return fitted_table(f"runs in {store.path}", columns, rows, droppable=_DROPPABLE, wide=wide)


def _history_table(history: list[tuple[int | None, str, str, float]], wide: bool) -> Table:
    """One row per epoch and split (epoch "eval": a later `dmqn eval`), one column per metric: a few columns
    however many epochs and metrics a run has."""
    names = sorted(
        {name for _, _, name, _ in history},
        key=lambda n: (_METRIC_ORDER.index(n) if n in _METRIC_ORDER else len(_METRIC_ORDER), n),
    )
    by_row: dict[tuple[str, str], dict[str, float]] = {}
    for epoch, split, name, value in history:
        by_row.setdefault(("eval" if epoch is None else str(epoch), split), {})[name] = value

    def cell(name: str, values: dict[str, float]) -> str:
        value = values.get(name)
        if name == "samples" and value is not None:
            return fmt(int(value))
        return fmt(value, 0) if name == "samples_per_s" else fmt(value)

    columns = [
        Column("epoch", justify="right", no_wrap=True),
        Column("split", no_wrap=True),
        *(Column(name.replace("_per_s", "/s"), justify="right", no_wrap=True) for name in names),
    ]
    rows = [[epoch, split, *(cell(name, values) for name in names)] for (epoch, split), values in by_row.items()]
    return fitted_table("metrics", columns, rows, droppable=("samples/s", "samples"), wide=wide)


@runs_app.callback(invoke_without_command=True)
@handle_errors
def list_runs(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Only runs on this data set."),
    model: Optional[str] = typer.Option(None, "--model", help="Only runs of this model."),
    as_json: bool = JsonOption,
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV for scripts: a header row, then one row per run."),
    wide: bool = WideOption,
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """List runs: id, model, data set, status, epochs, best valid AUC, test AUC and GAUC, duration, creation time.

    A narrow terminal (or a pipe) shows the columns that fit; --wide shows all of them. --json prints a list of
    objects and --csv a table with the fields run_id, model, dataset, status, epochs, best_epoch, best_valid_auc,
    test_auc, test_gauc, test_logloss, n_parameters, seed, train_seconds, created_at, finished_at (ISO 8601)
    and error; a missing value is null (an empty cell).
    """
    if ctx.invoked_subcommand is not None:
        return
    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv")
    store = RunStore(open_workspace(workspace).store_path)
    records = store.list_runs(dataset=dataset, model=model)
    if as_json:
        print_json([run_fields(r) for r in records])
    elif as_csv:
        typer.echo(_csv(records), nl=False)
    elif not records:
        console.print(plain(f"no runs in {store.path} yet — try `dmqn quickstart` or `dmqn train`"))
    else:
        console.print(_runs_table(store, records, wide), crop=not wide)


@runs_app.command("show")
@handle_errors
def show_run(
    run_id: Optional[str] = typer.Argument(
        None, help="Run to show \\[default: the latest run, failed or dead ones included]."
    ),
    as_json: bool = JsonOption,
    wide: bool = WideOption,
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Parameters, summary and per-epoch metric history of one run.

    --json prints the fields of `dmqn runs --json` plus dataset_path, checkpoint, params (the settings used,
    nested), metrics (a list of {epoch, split, name, value}; epoch null for a later `dmqn eval`),
    codebook_usage (a list of {epoch, codebook, used, dead, perplexity}), quantizer_stats (a list of
    {epoch, codebook, agreement, margin}: the share of validation behaviors whose training-path codeword is
    the inference-path one, and the mean gap between the two best codeword scores) and icim_stats (a list of
    {epoch, layer, norm_ratio}: |output - input| / |input| of each ICIM layer); the last three are empty
    for models without codebooks.
    """
    run = Run.open(open_workspace(workspace), run_id, finished_only=False)
    record = run.record
    history = run.store.metric_history(record.run_id)
    usage = run.store.codebook_usage(record.run_id)
    quantizer = run.store.quantizer_stats(record.run_id)
    icim = run.store.icim_stats(record.run_id)
    if as_json:
        print_json(
            {
                **run_fields(record),
                "dataset_path": record.dataset_path,
                "checkpoint": record.checkpoint,
                "params": record.params,
                "metrics": [
                    {"epoch": epoch, "split": split, "name": name, "value": number(value)}
                    for epoch, split, name, value in history
                ],
                "codebook_usage": [
                    {"epoch": epoch, "codebook": codebook, "used": used, "dead": dead, "perplexity": number(perplexity)}
                    for epoch, codebook, used, dead, perplexity in usage
                ],
                "quantizer_stats": [
                    {"epoch": epoch, "codebook": codebook, "agreement": number(agreement), "margin": number(margin)}
                    for epoch, codebook, agreement, margin in quantizer
                ],
                "icim_stats": [
                    {"epoch": epoch, "layer": layer, "norm_ratio": number(ratio)} for epoch, layer, ratio in icim
                ],
            }
        )
        return
    console.print(
        Text.assemble(
            plain("run " + record.run_id, "bold"),
            plain(
                f"  {record.model} on {record.dataset}  status {record.status}  parameters {fmt(record.n_parameters)}"
            ),
        )
    )
    if record.error:
        console.print(Text.assemble(("error:", "red"), " ", plain(record.error)))
    params = Table(title="parameters", show_header=False)
    params.add_column("name")
    params.add_column("value", overflow="fold")  # a long path folds rather than losing its end
    for name, value in iter_param_rows(record.params):
        params.add_row(plain(name), plain(value))
    console.print(params)
    if history:
        console.print(_history_table(history, wide), crop=not wide)
    if usage:
        columns = [Column(c, justify="right") for c in ("epoch", "codebook", "used", "dead", "perplexity")]
        rows = [
            [str(epoch), str(codebook), str(used), str(dead), f"{perplexity:.1f}"]
            for epoch, codebook, used, dead, perplexity in usage
        ]
        console.print(fitted_table("codebook utilisation (validation behaviors)", columns, rows))
    if quantizer:
        columns = [Column(c, justify="right") for c in ("epoch", "codebook", "agreement", "margin")]
        rows = [
            [str(epoch), str(codebook), f"{agreement:.1%}", f"{margin:.3f}"]
            for epoch, codebook, agreement, margin in quantizer
        ]
        console.print(fitted_table("training vs inference codeword (validation sample)", columns, rows))
    if icim:
        columns = [Column(c, justify="right") for c in ("epoch", "layer", "|out - in| / |in|")]
        rows = [[str(epoch), str(layer), fmt(ratio)] for epoch, layer, ratio in icim]
        console.print(fitted_table("ICIM layers (validation sample)", columns, rows))
