"""The quickstart pipeline: synthetic log → prepared set → DMQN and the popularity baseline → eval."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmqn_core.data.prep import PrepResult, prepare
from dmqn_core.data.synth import SynthSummary, write_log
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runs.inspection import RunInspector, user_worth_inspecting
from dmqn_core.training.evaluate import evaluate_run
from dmqn_core.training.train import TrainResult, train
from dmqn_core.workspace import Workspace

DATASET = "quickstart"

# Budgets per scale, chosen so that `small` (the default) ends within 10 minutes on 2 CPU cores.
BUDGETS: dict[str, dict[str, Any]] = {
    "tiny": {"epochs": 3, "train_targets": 10},
    "small": {"epochs": 5, "train_targets": 10},
    "medium": {"epochs": 5, "train_targets": 10},
}


@dataclass
class QuickstartResult:
    log: SynthSummary
    prepared: PrepResult
    popularity: TrainResult
    dmqn: TrainResult
    dmqn_eval: dict[str, float]
    seconds: float
    # A user of DMQN's recorded inspection sample with a long history and test candidates (None: no sample).
    inspect_user: int | None
    inspect_candidates: list[int]  # that user's test candidates (raw item ids), for a `dmqn score` example


def run_quickstart(
    workspace: Workspace,
    scale: str = "small",
    seed: int = 0,
    epochs: int | None = None,
    progress: Progress | None = None,
    on_step: Callable[[str], None] | None = None,
) -> QuickstartResult:
    """Run every stage on built-in synthetic data; each stage's output stays in the workspace."""
    progress = progress or NullProgress()
    step = on_step or (lambda message: None)
    budget = BUDGETS[scale]
    started = time.perf_counter()
    workspace.ensure()

    log_path = workspace.root / "synthetic" / f"{scale}-seed{seed}.csv"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    step(f"1/5 synth: a {scale} synthetic log")
    log = write_log(log_path, scale, seed)

    step("2/5 prep: CTR samples with DuckDB")
    prepared = prepare(
        log_path,
        "taobao",
        DATASET,
        workspace=workspace,
        overwrite=True,
        seed=seed,
        train_targets=budget["train_targets"],
    )

    step("3/5 train: the item-popularity baseline")
    popularity = train(workspace, DATASET, "pop", train_settings={"seed": seed}, progress=progress)

    step("4/5 train: DMQN")
    dmqn = train(
        workspace,
        DATASET,
        "dmqn",
        train_settings={"seed": seed, "epochs": epochs or budget["epochs"]},
        progress=progress,
    )

    step("5/5 eval: DMQN on the test split")
    _, dmqn_eval = evaluate_run(workspace, dmqn.run_id, "test", progress=progress)
    inspect_user = user_worth_inspecting(workspace, dmqn.run_id)
    candidates = (
        [] if inspect_user is None else RunInspector(workspace, dmqn.run_id).user(inspect_user).candidate_item.tolist()
    )
    return QuickstartResult(
        log=log,
        prepared=prepared,
        popularity=popularity,
        dmqn=dmqn,
        dmqn_eval=dmqn_eval,
        seconds=time.perf_counter() - started,
        inspect_user=inspect_user,
        inspect_candidates=candidates,
    )
