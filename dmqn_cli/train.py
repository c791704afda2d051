"""``dmqn train``: train DMQN (or a baseline) on a prepared set, or resume a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dmqn_cli.common import WorkspaceOption, console, handle_errors, open_workspace
from dmqn_cli.options import (
    MODEL_PANEL,
    TRAIN_PANEL,
    AssignNoiseOption,
    BatchSizeOption,
    BehaviorTimeOption,
    ClusterCategoriesOption,
    CodebookInitOption,
    ConfigOption,
    DeadCodewordResetOption,
    DeviceOption,
    DropoutOption,
    EmbedDimOption,
    EpochsOption,
    InspectUsersOption,
    LrOption,
    MatchFeaturesOption,
    MaxLenOption,
    MiddleLenOption,
    PatienceOption,
    PrecisionOption,
    ShortLenOption,
    ShortTermOption,
    StraightThroughOption,
    TauDecayOption,
    TauMinOption,
    TauPlacementOption,
    TopKOption,
    WeightDecayOption,
    collect_settings,
)
from dmqn_cli.progress import RichProgress
from dmqn_cli.results import print_train_result
from dmqn_core.models.registry import model_names
from dmqn_core.training import distributed
from dmqn_core.training.train import train as train_model


@handle_errors
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
    epochs: Optional[int] = EpochsOption,
    batch_size: Optional[int] = BatchSizeOption,
    lr: Optional[float] = LrOption,
    weight_decay: Optional[float] = WeightDecayOption,
    max_len: Optional[int] = MaxLenOption,
    patience: Optional[int] = PatienceOption,
    seed: Optional[int] = typer.Option(
        None,
        "--seed",
        help="Seed of initialisation, shuffling and Gumbel noise \\[default: 0].",
        rich_help_panel=TRAIN_PANEL,
    ),
    device: Optional[str] = DeviceOption,
    precision: Optional[str] = PrecisionOption,
    inspect_users: Optional[int] = InspectUsersOption,
    embed_dim: Optional[int] = EmbedDimOption,
    codebooks: Optional[int] = typer.Option(
        None, "--codebooks", help="Number of codebooks N \\[default: 4].", rich_help_panel=MODEL_PANEL
    ),
    codebook_size: Optional[int] = typer.Option(
        None, "--codebook-size", help="Codewords per codebook W \\[default: 32].", rich_help_panel=MODEL_PANEL
    ),
    tau: Optional[float] = typer.Option(
        None,
        "--tau",
        help="Gumbel-softmax temperature (eq. 6) of the first epoch \\[default: 1.0].",
        rich_help_panel=MODEL_PANEL,
    ),
    assign_noise: Optional[str] = AssignNoiseOption,
    tau_placement: Optional[str] = TauPlacementOption,
    tau_decay: Optional[float] = TauDecayOption,
    tau_min: Optional[float] = TauMinOption,
    straight_through: Optional[str] = StraightThroughOption,
    codebook_init: Optional[str] = CodebookInitOption,
    dead_codeword_reset: Optional[bool] = DeadCodewordResetOption,
    icim_layers: Optional[int] = typer.Option(
        None, "--icim-layers", help="HSTU layers in ICIM; 0 is DMQN-simple \\[default: 1].", rich_help_panel=MODEL_PANEL
    ),
    icim_heads: Optional[int] = typer.Option(
        None, "--icim-heads", help="Attention heads of each HSTU layer \\[default: 2].", rich_help_panel=MODEL_PANEL
    ),
    short_len: Optional[int] = ShortLenOption,
    short_term: Optional[str] = ShortTermOption,
    match_features: Optional[bool] = MatchFeaturesOption,
    behavior_time: Optional[bool] = BehaviorTimeOption,
    cluster_categories: Optional[int] = ClusterCategoriesOption,
    middle_len: Optional[int] = MiddleLenOption,
    top_k: Optional[int] = TopKOption,
    usage_loss_weight: Optional[float] = typer.Option(
        None,
        "--usage-loss-weight",
        help="Weight of the codebook-usage (anti-collapse) regulariser \\[default: 0].",
        rich_help_panel=MODEL_PANEL,
    ),
    dropout: Optional[float] = DropoutOption,
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
    model_settings, train_settings = collect_settings(
        config,
        {
            "embed_dim": embed_dim,
            "n_codebooks": codebooks,
            "codebook_size": codebook_size,
            "tau": tau,
            "assign_noise": assign_noise,
            "tau_placement": tau_placement,
            "tau_decay": tau_decay,
            "tau_min": tau_min,
            "straight_through": straight_through,
            "codebook_init": codebook_init,
            "dead_codeword_reset": dead_codeword_reset,
            "icim_layers": icim_layers,
            "icim_heads": icim_heads,
            "short_len": short_len,
            "short_term": short_term,
            "match_features": match_features,
            "behavior_time": behavior_time,
            "cluster_categories": cluster_categories,
            "middle_len": middle_len,
            "top_k": top_k,
            "usage_loss_weight": usage_loss_weight,
            "dropout": dropout,
        },
        {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "max_len": max_len,
            "patience": patience,
            "seed": seed,
            "device": device,
            "precision": precision,
            "inspect_users": inspect_users,
        },
    )
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
