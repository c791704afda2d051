"""``dmqn quickstart``: every stage on built-in synthetic data, in minutes, on a CPU."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from dmqn_cli.common import WorkspaceOption, console, handle_errors, open_workspace, plain
from dmqn_cli.progress import RichProgress
from dmqn_cli.results import metrics_table
from dmqn_core.quickstart import run_quickstart

SCALE_ENV = "DMQN_QUICKSTART_SCALE"


class Scale(str, Enum):
    tiny = "tiny"
    small = "small"
    medium = "medium"


@handle_errors
def quickstart(
    scale: Scale = typer.Option(
        Scale.small,
        "--scale",
        envvar=SCALE_ENV,
        help="Size of the synthetic log: tiny (seconds), small (a few minutes), medium.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the negatives and training."),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", help="Maximum DMQN epochs \\[default: 3 for tiny, 5 otherwise]."
    ),
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """synth → prep → train DMQN and the popularity baseline → eval, then what to try next."""
    ws = open_workspace(workspace)

    def say(line: str) -> None:
        console.print(plain(line))  # every line quotes a path or an id: never markup, never a raw escape

    say(f"workspace: {ws.root}")
    with RichProgress() as progress:
        result = run_quickstart(
            ws,
            scale.value,
            seed,
            epochs,
            progress=progress,
            on_step=lambda message: progress.log(plain(message, style="bold cyan")),
        )
    counts = result.prepared.meta["counts"]
    say(f"log:      {result.log.path} ({result.log.rows:,} rows, {result.log.users:,} users)")
    say(f"data set: {result.prepared.path} ({counts['users']:,} users, {sum(counts['samples'].values()):,} samples)")
    say(f"runs:     {ws.store_path} (pop {result.popularity.run_id}, dmqn {result.dmqn.run_id})")
    console.print(
        metrics_table("test split", [("item popularity", result.popularity.test), ("DMQN", result.dmqn_eval)])
    )
    lift = result.dmqn_eval["auc"] - result.popularity.test["auc"]
    say(
        f"DMQN test AUC {result.dmqn_eval['auc']:.4f} vs popularity {result.popularity.test['auc']:.4f} "
        f"({lift:+.4f}) in {result.seconds:.0f} s"
    )
    ws_flag = (
        "" if os.environ.get("DMQN_WORKSPACE") else f" -w {ws.root}" if ws.root != Path.cwd() / "dmqn-workspace" else ""
    )
    say("next:")
    if result.inspect_user is not None:
        say(
            f"  dmqn inspect --user {result.inspect_user}{ws_flag}   "
            "codeword assignments, clusters and attention of a user"
        )
        say(f"  dmqn report{ws_flag}   codebook utilisation, UMAP and attention heatmaps in one HTML file")
    say(f"  dmqn runs{ws_flag}                         every run and its metrics")
    say(f"  dmqn runs show {result.dmqn.run_id}{ws_flag}   parameters, epochs, codebook utilisation")
    say(f"  dmqn eval {result.dmqn.run_id} --split valid{ws_flag}")
    if result.inspect_candidates:
        items = ",".join(str(i) for i in result.inspect_candidates[:5])
        say(
            f"  dmqn export-cache {result.dmqn.run_id}{ws_flag} && dmqn score {result.dmqn.run_id} "
            f"--user {result.inspect_user} --items {items}{ws_flag}   cached user states, serving"
        )
    say(f"  dmqn train quickstart --model dmqn-simple{ws_flag}   the ablation without ICIM")
    say(
        f"  dmqn bench quickstart --models din-short,din-full,twin,dmqn-simple,dmqn --seeds 1{ws_flag}"
        "   DMQN against the baselines"
    )
