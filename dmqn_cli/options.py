"""Model and training options shared by `dmqn train` and `dmqn bench`, and how they become settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from dmqn_core.config import ASSIGN_NOISES, CODEBOOK_INITS, SHORT_TERMS, STRAIGHT_THROUGH, TAU_PLACEMENTS
from dmqn_core.training.train import read_config_file

MODEL_PANEL = "Model"
TRAIN_PANEL = "Training"

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="TOML file with \\[model] and \\[train] tables; flags override it (see examples/dmqn.toml).",
)
EpochsOption = typer.Option(
    None, "--epochs", help="Maximum number of epochs \\[default: 8].", rich_help_panel=TRAIN_PANEL
)
BatchSizeOption = typer.Option(
    None, "--batch-size", help="Training samples per batch \\[default: 256].", rich_help_panel=TRAIN_PANEL
)
LrOption = typer.Option(None, "--lr", help="Adam learning rate \\[default: 0.001].", rich_help_panel=TRAIN_PANEL)
WeightDecayOption = typer.Option(
    None, "--weight-decay", help="Adam weight decay \\[default: 0].", rich_help_panel=TRAIN_PANEL
)
MaxLenOption = typer.Option(
    None,
    "--max-len",
    help="Most recent behaviors kept per history \\[default: the data set's --max-len].",
    rich_help_panel=TRAIN_PANEL,
)
PatienceOption = typer.Option(
    None,
    "--patience",
    help="Stop after this many epochs without a better validation AUC \\[default: 2].",
    rich_help_panel=TRAIN_PANEL,
)
DeviceOption = typer.Option(
    None,
    "--device",
    help="auto, cpu, cuda or cuda:N; auto is CUDA where torch sees a GPU, else the CPU, and the run records "
    "the device it resolved to \\[default: auto].",
    rich_help_panel=TRAIN_PANEL,
)
PrecisionOption = typer.Option(
    None,
    "--precision",
    help="fp32, or bf16: the training forward under bfloat16 autocast (CUDA only); validation and test stay "
    "fp32 \\[default: fp32].",
    rich_help_panel=TRAIN_PANEL,
)
InspectUsersOption = typer.Option(
    None,
    "--inspect-users",
    min=0,
    help="dmqn/dmqn-simple: users whose codeword assignments and attention are recorded at the end for "
    "`dmqn inspect` and `dmqn report`; 0 records nothing \\[default: 300].",
    rich_help_panel=TRAIN_PANEL,
)
EmbedDimOption = typer.Option(
    None, "--embed-dim", help="Embedding and codeword dimension D \\[default: 32].", rich_help_panel=MODEL_PANEL
)
ShortLenOption = typer.Option(
    None,
    "--short-len",
    help="Recent behaviors of the short-term features (DIN short, the MLP's recent mean) \\[default: 50].",
    rich_help_panel=MODEL_PANEL,
)
MiddleLenOption = typer.Option(
    None, "--middle-len", help="Behaviors seen by din-middle \\[default: 200].", rich_help_panel=MODEL_PANEL
)
TopKOption = typer.Option(
    None,
    "--top-k",
    help="Behaviors (TWIN V2: clusters) kept by the retrieval of SIM, ETA, TWIN, TWIN V2 \\[default: 50].",
    rich_help_panel=MODEL_PANEL,
)
ShortTermOption = typer.Option(
    None,
    "--short-term",
    help=f"Short-term interest of dmqn, dmqn-simple, sim, eta, sdim, twin, twin-v2: {', '.join(SHORT_TERMS)} "
    "(din: a DIN over the --short-len most recent behaviors and their mean; mean: their mean only) "
    "\\[default: din].",
    rich_help_panel=MODEL_PANEL,
)
MatchFeaturesOption = typer.Option(
    None,
    "--match-features/--no-match-features",
    help="Give every model the candidate's category and item counts in the history, the time since the "
    "latest of each and its popularity before the sample, as MLP inputs \\[default: yes].",
    rich_help_panel=MODEL_PANEL,
)
BehaviorTimeOption = typer.Option(
    None,
    "--behavior-time/--no-behavior-time",
    help="dmqn/dmqn-simple: add a time-gap embedding to every behavior before quantizing, as SIM and TWIN "
    "have \\[default: yes].",
    rich_help_panel=MODEL_PANEL,
)
ClusterCategoriesOption = typer.Option(
    None,
    "--cluster-categories",
    min=0,
    max=255,
    help="dmqn/dmqn-simple: categories every cluster keeps (its most frequent); CTAM adds the candidate "
    "category's share of a cluster to its attention and gives it to the MLP; 0 = off \\[default: 4].",
    rich_help_panel=MODEL_PANEL,
)
DropoutOption = typer.Option(
    None, "--dropout", help="Dropout in the MLP head \\[default: 0].", rich_help_panel=MODEL_PANEL
)

AssignNoiseOption = typer.Option(
    None,
    "--assign-noise",
    help=f"How MCQM picks a behavior's codeword while training: {' or '.join(ASSIGN_NOISES)}; gumbel samples "
    "argmax(scores + Gumbel noise) as eq. 6-7 do, none takes the argmax of the scores, as inference does "
    "\\[default: none].",
    rich_help_panel=MODEL_PANEL,
)
TauPlacementOption = typer.Option(
    None,
    "--tau-placement",
    help=f"Where tau acts: {' or '.join(TAU_PLACEMENTS)}; after_noise divides the noisy logits, (s + g) / tau "
    "(the sampled codeword ignores tau), before_noise samples from softmax(s / tau) \\[default: after_noise].",
    rich_help_panel=MODEL_PANEL,
)
TauDecayOption = typer.Option(
    None,
    "--tau-decay",
    help="Epoch e trains at max(tau-min, tau · tau-decay^(e-1)); below 1 with --tau-placement before_noise "
    "anneals toward the argmax \\[default: 1.0].",
    rich_help_panel=MODEL_PANEL,
)
TauMinOption = typer.Option(
    None,
    "--tau-min",
    help="Lowest temperature of the --tau-decay schedule; needed (> 0) when tau-decay < 1 \\[default: 0].",
    rich_help_panel=MODEL_PANEL,
)
StraightThroughOption = typer.Option(
    None,
    "--straight-through",
    help=f"Gradient of a cluster mean into the assignment: {' or '.join(STRAIGHT_THROUGH)}; plain e_l / n_k, "
    "centred (e_l - r_k) / n_k \\[default: plain].",
    rich_help_panel=MODEL_PANEL,
)

CodebookInitOption = typer.Option(
    None,
    "--codebook-init",
    help=f"Codewords at the start of a new run: {' or '.join(CODEBOOK_INITS)} (spherical k-means of the first "
    "training batches' behavior embeddings, per codebook) \\[default: random].",
    rich_help_panel=MODEL_PANEL,
)
DeadCodewordResetOption = typer.Option(
    None,
    "--dead-codeword-reset/--no-dead-codeword-reset",
    help="After each epoch, move codewords no validation behavior was assigned to onto behaviors of the "
    "busiest clusters \\[default: no].",
    rich_help_panel=MODEL_PANEL,
)


def collect_settings(
    config: Optional[Path], model_flags: dict[str, Any], train_flags: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings of a --config file, overridden by the flags that were given (None = not given)."""
    model_settings, train_settings = read_config_file(config) if config else ({}, {})
    model_settings.update({k: v for k, v in model_flags.items() if v is not None})
    train_settings.update({k: v for k, v in train_flags.items() if v is not None})
    return model_settings, train_settings
