"""Multi-process training: torchrun with 2 CPU processes (gloo) trains like one process with the
same global batch, rank 0 alone writes the run, a resumed run ends where an uninterrupted one
does, and a rank that fails ends the other with an error instead of a hang.

Every test starts Python processes that import torch (seconds each on a busy machine), so the
scenarios share launches: one torchrun launch of the command line, and one pair of worker
processes that trains, interrupts, resumes and fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from dmqn_core.config import ModelConfig
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.models.registry import build_model
from dmqn_core.runs.store import RunStore
from dmqn_core.training import distributed
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace

MODEL = {"embed_dim": 8, "mlp_hidden": [16], "n_codebooks": 2, "codebook_size": 8}
TRAIN = {"epochs": 1, "max_len": 60, "batch_size": 128, "seed": 5, "lr": 0.01, "inspect_users": 20}


def fresh_workspace(tiny_workspace: Workspace, path: Path) -> Workspace:
    """A workspace of its own holding a copy of the tiny set, so that its run store has only our runs."""
    ws = Workspace(path).ensure()
    shutil.copytree(tiny_workspace.dataset_path("tiny"), ws.dataset_path("tiny"))
    return ws


def quality(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "samples_per_s"}


def environment(**extra: str) -> dict[str, str]:
    """This process's environment without any torchrun variables it may have, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_the_torchrun_environment_decides_the_context():
    assert distributed.context_from_env({}) == distributed.SINGLE
    assert distributed.context_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == distributed.SINGLE
    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    context = distributed.context_from_env(torchrun)
    assert (context.rank, context.world_size, context.local_rank, context.active, context.is_main) == (
        3,
        4,
        1,
        True,
        False,
    )
    with pytest.raises(DmqnError, match="MASTER_ADDR is not set; start multi-process training with torchrun"):
        distributed.context_from_env({**torchrun, "MASTER_ADDR": ""})
    with pytest.raises(DmqnError, match="bad torchrun environment"):
        distributed.context_from_env({**torchrun, "RANK": "three"})
    # One process: every collective hands its input back, and from_main just runs the function.
    single = distributed.SINGLE
    assert distributed.broadcast(single, {"a": 1}) == {"a": 1} and distributed.gather(single, 2) == [2]
    assert distributed.all_reduce_sum(single, [1.5]) == [1.5] and distributed.from_main(single, lambda: 7) == 7


def test_torchrun_trains_din_full_as_one_process_does(tiny_workspace, tmp_path):
    ws = fresh_workspace(tiny_workspace, tmp_path / "two")
    config = tmp_path / "small.toml"
    config.write_text(
        "[model]\nembed_dim = 8\nmlp_hidden = [16]\n[train]\n" + "".join(f"{k} = {v}\n" for k, v in TRAIN.items())
    )
    launch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "dmqn_cli",
            "train",
            "tiny",
            "--model",
            "din-full",
            "--config",
            str(config),
            "--workspace",
            str(ws.root),
        ],
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        reference_ws = fresh_workspace(tiny_workspace, tmp_path / "one")
        reference = train(reference_ws, "tiny", "din-full", MODEL, TRAIN)  # while torchrun starts
        stdout, stderr = launch.communicate(timeout=300)
    finally:
        if launch.poll() is None:  # torchrun and its workers, which share its new session
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
    assert launch.returncode == 0, stdout + stderr

    store = RunStore(ws.store_path)
    (record,) = store.list_runs()  # one run row, written by rank 0 alone
    assert record.status == "finished"
    assert record.params["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert stdout.count(f"run {record.run_id}") == 1  # rank 0 alone reports
    assert sorted(p.name for p in ws.runs_dir.iterdir()) == [record.run_id]
    assert {"checkpoint.pt", "best.pt"} <= {p.name for p in ws.run_dir(record.run_id).iterdir()}

    # din-full draws no random numbers in training, and the two processes' gradients, weighted
    # by their share of each batch and averaged, are the one-process gradient of the same batch.
    # Only the order of float32 sums differs (two half-batch means combined by the all-reduce,
    # each part padded to its own longest history), and what that order can change differs:
    #
    # Losses and metrics: the same weights give the same outputs to a few float32 ulps
    # (eps = 6e-8) per operation, and weights apart as below move a loss by gradient x difference,
    # which is small exactly where differences are large (next paragraph). Measured 4e-9 (AMD) and
    # 1.4e-8 (Intel Xeon) on the training loss, 2e-10 and 4.5e-8 on the test logloss, 0 on the
    # AUCs. Bounds: 1e-5 on the losses; 1e-4 on the AUCs, four of the 40,000 positive-negative
    # pairs swapping places between nearly tied scores.
    #
    # Weights: Adam moves a weight by about lr per step whatever its gradient's scale (m / sqrt(v)).
    # Where the gradient is well conditioned, the two runs' steps agree to about k * eps for a
    # computation k operations deep, so after S steps the weights agree to about S * k * eps of how
    # far they moved (S = 16 here: the Xeon's 1.5e-4, measured as below, is that with k = 150). Where the
    # gradient is a sum of terms that nearly cancel, its rounding is as large as itself and
    # m / sqrt(v) makes that a step of up to lr either way: such a weight can end as far as
    # 2 * lr * S = 0.32 from the other run's, more than the 0.19 a broken split gives (below), so no
    # per-weight bound both holds and tests anything (the largest difference was 6e-6 on an AMD
    # machine and 4.3e-4 on a Xeon, 1.8% of that weight's movement). The bound is on all weights:
    # the difference's L2 norm within 1% of the L2 norm of what training moved them: 65 times the
    # 1.5e-4 measured, and room for about three of the 34,000 weights to swing by a typical move.
    #
    # A wrong split fails each of these by far. Rank 0 training on its half of every batch alone
    # (no gradient all-reduce; or both ranks on rank 0's half) measured a training loss 1e-3 off,
    # a test AUC 0.04 off and weights apart by 117% of their movement.
    history = {(epoch, split, name): value for epoch, split, name, value in store.metric_history(record.run_id)}
    assert abs(history[(1, "train", "loss")] - reference.history[0]["train_loss"]) <= 1e-5
    assert abs(record.best_valid_auc - reference.best_valid_auc) <= 1e-4
    assert abs(record.test_auc - reference.test["auc"]) <= 1e-4
    assert abs(record.test_logloss - reference.test["logloss"]) <= 1e-5
    one = torch.load(reference_ws.run_dir(reference.run_id) / "best.pt", weights_only=True)["model_state"]
    two = torch.load(ws.run_dir(record.run_id) / "best.pt", weights_only=True)["model_state"]
    torch.manual_seed(TRAIN["seed"])  # the initial weights, as dmqn_core.training.train draws them
    start = build_model(
        "din-full",
        ModelConfig.from_dict(record.params["model"]),
        item_popularity=PreparedSet.open(record.dataset_path).item_popularity,
    ).state_dict()

    def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[name].double().flatten() for name in sorted(one)])

    moved = float((flat(one) - flat(start)).norm())
    apart = float((flat(one) - flat(two)).norm())
    assert moved > 0 and apart <= 0.01 * moved, (apart, moved)


# Runs as each of two processes, with the environment torchrun would give them: trains DMQN
# for two epochs, trains it again but interrupts both ranks at the start of the second epoch,
# resumes that run, then starts a run in which rank 1 fails at its first epoch. Rank 0 prints
# one JSON line of results before that last run. argv: workspace, model and train settings.
WORKER = r"""
import json, sys
import torch
import dmqn_core.training.distributed as distributed
from dmqn_core.training.train import train
from dmqn_core.training.trainer import Trainer
from dmqn_core.workspace import Workspace

ws, model, settings = Workspace(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
# Several runs in one launch: the caller opens the group once (dmqn_core.training.distributed.process_group).
torch.distributed.init_process_group("gloo")
context = distributed.context_from_env()
real_epoch = Trainer.train_epoch

def summary(result):
    return {"run_id": result.run_id, "test": result.test, "history": result.history}

def interrupt_second_epoch(*args, **kwargs):
    if args[1] == 2:  # the epoch (args[0] is the trainer)
        raise KeyboardInterrupt
    return real_epoch(*args, **kwargs)

def fail_on_rank_1(*args, **kwargs):
    if context.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return real_epoch(*args, **kwargs)

whole = train(ws, "tiny", "dmqn", model, settings)
Trainer.train_epoch = interrupt_second_epoch
try:
    train(ws, "tiny", "dmqn", model, settings, run_id="interrupted")
except KeyboardInterrupt:
    pass
Trainer.train_epoch = real_epoch
resumed = train(ws, resume="interrupted")
if context.is_main:
    print(json.dumps({"whole": summary(whole), "resumed": summary(resumed)}), flush=True)
Trainer.train_epoch = fail_on_rank_1
train(ws, "tiny", "dmqn", model, {**settings, "epochs": 1}, run_id="failing")
"""


def test_two_processes_train_dmqn_like_one_resume_exactly_and_fail_together(tiny_workspace, tmp_path):
    settings = {**TRAIN, "epochs": 2, "patience": 5}
    ws = fresh_workspace(tiny_workspace, tmp_path / "two")
    port = str(free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(ws.root), json.dumps(MODEL), json.dumps(settings)],
            env=environment(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        reference = train(fresh_workspace(tiny_workspace, tmp_path / "one"), "tiny", "dmqn", MODEL, settings)
        outputs = [w.communicate(timeout=240) for w in workers]
    finally:
        for w in workers:
            w.kill()
            w.wait()
    (stdout, stderr), _ = outputs
    assert stdout.strip(), stderr
    results = json.loads(stdout.strip().splitlines()[-1])
    whole, resumed = results["whole"], results["resumed"]

    # Two processes with the same seed train the same run: a run interrupted after epoch 1 and
    # resumed on two processes ends exactly where the uninterrupted one did (the gloo sums are
    # deterministic, and every rank's noise is a function of seed, rank and epoch).
    assert quality(resumed["test"]) == quality(whole["test"])
    assert resumed["history"] == whole["history"]
    store = RunStore(ws.store_path)
    runs = {r.run_id: r for r in store.list_runs()}
    assert runs[whole["run_id"]].status == runs["interrupted"].status == "finished"
    assert runs[whole["run_id"]].params["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert len(store.inspected_users(whole["run_id"])) == TRAIN["inspect_users"]  # rank 0 recorded the sample

    # DMQN draws Gumbel noise in training: the two processes' draws are not the one process's,
    # so the runs differ as two noise draws do. Measured on this set and budget: six one-process
    # runs that differ only in their noise (the same initial weights and batches) spread over
    # 0.006 in test AUC, 0.007 in best validation AUC and 0.002 in the second epoch's training
    # loss; the two-process run was 0.0025, 0.0008 and 0.0004 from the one-process run. The
    # bounds are about three times the spread.
    assert abs(whole["test"]["auc"] - reference.test["auc"]) <= 0.02
    assert abs(max(h["valid_auc"] for h in whole["history"]) - reference.best_valid_auc) <= 0.02
    for mine, theirs in zip(whole["history"], reference.history):
        assert abs(mine["train_loss"] - theirs["train_loss"]) <= 0.006

    # Rank 1 failed in the last run: rank 0 did not wait for it (its connection closed when it
    # died), recorded the failure and ended with an error, well before the 240 s above.
    assert [w.returncode for w in workers] != [0, 0] and workers[0].returncode != 0
    assert "rank 1 fails on purpose" in outputs[1][1]
    assert runs["failing"].status == "failed" and "Connection closed by peer" in runs["failing"].error
