"""``dmqn train``: train DMQN (or a baseline) on a prepared set, or resume a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dmqn_cli.common import WorkspaceOption, console, handle_errors, open_workspace
from dmqn_cli.progress import RichProgress
from dmqn_cli.results import print_train_result
from dmqn_core.models import model_names
from dmqn_core.train import read_config_file, train as train_model

_MODEL = "Model"
_TRAIN = "Training"


@handle_errors
def train(
    data: Optional[str] = typer.Argument(None, help="Prepared data set: a NAME inside the workspace or a path (see `dmqn prep`)."),
    model: str = typer.Option("dmqn", "--model", "-m", help=f"Model to train: {', '.join(model_names())}."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file with [model] and [train] tables; flags override it (see examples/dmqn.toml)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the interrupted run RUN_ID from its last checkpoint."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum number of epochs [default: 8].", rich_help_panel=_TRAIN),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training samples per batch [default: 256].", rich_help_panel=_TRAIN),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate [default: 0.001].", rich_help_panel=_TRAIN),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Adam weight decay [default: 0].", rich_help_panel=_TRAIN),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Most recent behaviors kept per history [default: the data set's --max-len].", rich_help_panel=_TRAIN),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many epochs without a better validation AUC [default: 2].", rich_help_panel=_TRAIN),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of initialisation, shuffling and Gumbel noise [default: 0].", rich_help_panel=_TRAIN),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda [default: cpu].", rich_help_panel=_TRAIN),
    embed_dim: Optional[int] = typer.Option(None, "--embed-dim", help="Embedding and codeword dimension D [default: 32].", rich_help_panel=_MODEL),
    codebooks: Optional[int] = typer.Option(None, "--codebooks", help="Number of codebooks N [default: 4].", rich_help_panel=_MODEL),
    codebook_size: Optional[int] = typer.Option(None, "--codebook-size", help="Codewords per codebook W [default: 32].", rich_help_panel=_MODEL),
    tau: Optional[float] = typer.Option(None, "--tau", help="Gumbel-softmax temperature (eq. 6) [default: 1.0].", rich_help_panel=_MODEL),
    icim_layers: Optional[int] = typer.Option(None, "--icim-layers", help="HSTU layers in ICIM; 0 is DMQN-simple [default: 1].", rich_help_panel=_MODEL),
    icim_heads: Optional[int] = typer.Option(None, "--icim-heads", help="Attention heads of each HSTU layer [default: 2].", rich_help_panel=_MODEL),
    short_len: Optional[int] = typer.Option(None, "--short-len", help="Recent behaviors mean-pooled for the MLP [default: 50].", rich_help_panel=_MODEL),
    usage_loss_weight: Optional[float] = typer.Option(None, "--usage-loss-weight", help="Weight of the codebook-usage (anti-collapse) regulariser [default: 0].", rich_help_panel=_MODEL),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout in the MLP head [default: 0].", rich_help_panel=_MODEL),
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Train a model on a prepared data set; checkpoints and metrics go to the workspace.

    Every value used (defaults, --config file, flags) is stored with the run; `dmqn runs show RUN_ID` lists them.
    """
    ws = open_workspace(workspace)
    model_settings, train_settings = read_config_file(config) if config else ({}, {})
    flags_model = {"embed_dim": embed_dim, "n_codebooks": codebooks, "codebook_size": codebook_size, "tau": tau,
                   "icim_layers": icim_layers, "icim_heads": icim_heads, "short_len": short_len,
                   "usage_loss_weight": usage_loss_weight, "dropout": dropout}
    flags_train = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                   "max_len": max_len, "patience": patience, "seed": seed, "device": device}
    model_settings.update({k: v for k, v in flags_model.items() if v is not None})
    train_settings.update({k: v for k, v in flags_train.items() if v is not None})
    if resume and (data or config or model_settings):
        raise typer.BadParameter("--resume continues a run with its own data and settings; pass only --epochs/--device with it")
    if not resume and not data:
        raise typer.BadParameter("name a prepared data set (DATA) or --resume RUN_ID")
    with RichProgress() as progress:
        result = train_model(ws, data, model, model_settings, train_settings, resume=resume, progress=progress)
    print_train_result(result)
    console.print(f"next: [bold]dmqn eval {result.run_id}[/]  ·  [bold]dmqn runs show {result.run_id}[/]")
