"""``dmqn tune``: hyper-parameter search with Optuna, and ``dmqn tune --show`` of a study."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import optuna
import typer
from rich.table import Column

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
from dmqn_cli.options import SETTING_OPTIONS, ConfigOption, SettingFlags, collect_settings, setting_flags
from dmqn_cli.progress import RichProgress
from dmqn_cli.results import fitted_table, fmt, number
from dmqn_core.errors import DmqnError
from dmqn_core.models.registry import model_names
from dmqn_core.training.tune import TuneResult, show_study
from dmqn_core.training.tune import tune as run_study


@handle_errors
@setting_flags("tune")
def tune(
    data: Optional[str] = typer.Argument(
        None, help="Prepared data set: a NAME inside the workspace or a path (see `dmqn prep`)."
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Model to tune: {', '.join(model_names())}."),
    trials: int = typer.Option(
        20, "--trials", "-n", help="Finished trials the study should have in all (a resumed study runs the rest)."
    ),
    study: Optional[str] = typer.Option(
        None, "--study", help="Study name \\[default: DATA-MODEL]; a study tunes one model on one data set."
    ),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", help="Start no trial after this many seconds (the running one finishes)."
    ),
    storage: Optional[str] = typer.Option(
        None,
        "--storage",
        help="Optuna database URL (sqlite:///FILE, postgresql://...) \\[default: WORKSPACE/tune/studies.db].",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler and of every trial's run."),
    search_space: str = typer.Option(
        "default",
        "--space",
        help="default: the shared settings plus at most 3 of the model's own, the same breadth for every "
        "model (for comparisons); full: every knob (DMQN's quantizer mechanics too), for studies of one model.",
    ),
    workers: int = typer.Option(
        1, "--workers", help="Processes working on the study at once, this one included; they share the CPU threads."
    ),
    config: Optional[Path] = ConfigOption,
    flags: SettingFlags = SETTING_OPTIONS,
    show: Optional[str] = typer.Option(
        None, "--show", help="Print the study STUDY (best settings, every trial) instead of tuning."
    ),
    as_json: bool = JsonOption,
    wide: bool = WideOption,
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Search a model's hyper-parameters on a prepared set: each trial is a run (`dmqn runs` lists it).

    A TPE sampler picks each trial's learning rate, weight decay, dropout, embedding size and model knobs.

    A trial is scored by its best validation AUC. Settings in --config are fixed and not searched.

    --trials counts the finished trials of the whole study: after Ctrl-C or a kill, the same command resumes.

    --workers K runs K processes on the study, each with its share of the trials and of the threads. Processes
    on several machines may share one study through one --storage URL (a database server): each runs the same
    command and stops once the study has --trials finished trials (a trial running elsewhere at that moment
    still finishes). --show STUDY prints its best settings and trials (--json for scripts).
    """
    ws = open_workspace(workspace)
    if show is not None:
        result = show_study(ws, show, storage)
    else:
        if not data:
            raise DmqnError("name a prepared data set (DATA) to tune on, or --show STUDY")
        if not model:
            raise DmqnError(f"name the model to tune with --model; known: {', '.join(model_names())}")
        model_settings, train_settings = collect_settings(config, flags)
        # Optuna logs every trial at INFO level; the progress bar and the table say it instead.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with RichProgress() as progress:
            result = run_study(
                ws,
                data,
                model,
                trials,
                study=study,
                timeout=timeout,
                storage=storage,
                progress=progress,
                model_settings=model_settings,
                train_settings=train_settings,
                seed=seed,
                search_space=search_space,
                workers=workers,
            )
    if as_json:
        print_json(study_fields(result))
    else:
        print_study(result, wide)


def study_fields(result: TuneResult) -> dict[str, Any]:
    """A study as scripts read it; NaN and infinities become null."""
    fields = asdict(result)
    fields["best_value"] = number(result.best_value)
    fields["finished_trials"] = result.finished
    for row in fields["trials"]:
        row["value"] = number(row["value"])
    return fields


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_study(result: TuneResult, wide: bool) -> None:
    console.print(
        plain(
            f"study {result.study}: {result.model} on {result.dataset}, "
            f"{result.finished} finished trial(s), {result.new_trials} new"
        )
    )
    console.print(plain(f"storage: {result.storage}"), soft_wrap=True)
    if result.best_number is None:
        console.print(plain("no finished trial yet"))
    else:
        console.print(
            plain(f"best: trial {result.best_number}, valid AUC {fmt(result.best_value)}, run {result.best_run_id}")
        )
        settings = [
            [plain(section), plain(name), plain(_cell(value))]
            for section, values in (("model", result.best_model_settings), ("train", result.best_train_settings))
            for name, value in sorted(values.items())
        ]
        columns = [Column("table", no_wrap=True), Column("setting", no_wrap=True), Column("value", overflow="fold")]
        console.print(fitted_table("best settings", columns, settings))
    names = list(dict.fromkeys(name for row in result.trials for name in row.params))
    columns = [
        Column("trial", justify="right", no_wrap=True),
        Column("state", no_wrap=True),
        Column("valid AUC", justify="right", no_wrap=True),
        Column("run", no_wrap=True),
        *(Column(name, justify="right", no_wrap=True) for name in names),
    ]
    rows = [
        [
            str(row.number),
            plain(row.state),
            fmt(row.value),
            plain(row.run_id or "-"),
            *(plain(_cell(row.params.get(name))) for name in names),
        ]
        for row in result.trials
    ]
    # The last searched parameters go first; the first ones (lr, weight decay) matter most.
    table = fitted_table("trials", columns, rows, droppable=tuple(reversed(names)), wide=wide)
    console.print(table, crop=not wide)
