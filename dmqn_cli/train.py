"""``dmqn train``: train DMQN (or a baseline) on a prepared set, or resume a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dmqn_cli.common import WorkspaceOption, console, handle_errors, open_workspace
from dmqn_cli.options import SETTING_OPTIONS, ConfigOption, SettingFlags, collect_settings, setting_flags
from dmqn_cli.progress import RichProgress
from dmqn_cli.results import print_train_result
from dmqn_core.models.registry import model_names
from dmqn_core.training import distributed
from dmqn_core.training.train import train as train_model


@handle_errors
@setting_flags("train")
def train(
    data: Optional[str] = typer.Argument(
        None, help="Prepared data set: a NAME inside the workspace or a path (see `dmqn prep`)."
    ),
    model: str = typer.Option("dmqn", "--model", "-m", help=f"Model to train: {', '.join(model_names())}."),
    config: Optional[Path] = ConfigOption,
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        help="Continue the run RUN_ID (interrupted, failed or dead: see `dmqn runs`) from its last checkpoint.",
    ),
    flags: SettingFlags = SETTING_OPTIONS,
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Train a model on a prepared data set; checkpoints and metrics go to the workspace.

    Every value used (defaults, --config file, flags) is stored with the run; `dmqn runs show RUN_ID` lists them.
    Settings of the baselines not offered as flags (e.g. simhash_bits, session_gap) go in the \\[model] table of
    --config.

    Several processes: `torchrun --nproc-per-node N -m dmqn_cli train ...` trains with DistributedDataParallel
    (gloo on the CPU, NCCL on CUDA), each process on its part of every batch of --batch-size; rank 0
    writes the run and prints progress.

    A resumed run continues on the device it recorded; --device (auto included) moves it.
    """
    ws = open_workspace(workspace)
    model_settings, train_settings = collect_settings(config, flags)
    if resume and (data or config or model_settings):
        raise typer.BadParameter(
            "--resume continues a run with its own data and settings; pass only --epochs/--device with it"
        )
    if not resume and not data:
        raise typer.BadParameter("name a prepared data set (DATA) or --resume RUN_ID")
    if not distributed.context_from_env().is_main:
        # Another process of a torchrun launch: it trains its share silently, rank 0 reports.
        train_model(ws, data, model, model_settings, train_settings, resume=resume)
        return
    with RichProgress() as progress:
        result = train_model(ws, data, model, model_settings, train_settings, resume=resume, progress=progress)
    print_train_result(result)
    console.print(f"next: [bold]dmqn eval {result.run_id}[/]  ·  [bold]dmqn runs show {result.run_id}[/]")
