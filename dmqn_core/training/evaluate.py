"""Evaluation of trained runs: AUC, GAUC (user-weighted AUC) and logloss of a split."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dmqn_core.data.batches import BatchLoader, EpochBatches
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.devices import AUTO, autocast, check_precision, resolve_device
from dmqn_core.errors import DmqnError
from dmqn_core.nn.interest_model import InterestModel
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runs.run import Run
from dmqn_core.training import distributed
from dmqn_core.training.metrics import ctr_metrics
from dmqn_core.workspace import Workspace

SPLITS = ("train", "valid", "test")


@torch.no_grad()
def predict(
    model: InterestModel[Any],
    batches: EpochBatches,
    device: torch.device,
    progress: Progress | None = None,
    description: str = "predict",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Logits of every sample of the batches (this rank's part of them), with the model's codeword counts.

    Returns users, labels, logits, seconds and ``codeword_counts`` (N, W) summed over the
    distinct histories (None for models without codebooks). ``precision`` bf16 runs the forward
    under bf16 autocast (CUDA only, checked by the caller); training evaluates in fp32.
    """
    progress = progress or NullProgress()
    model.eval()
    users, labels, logits = [], [], []
    counts = None
    progress.start(description, len(batches))
    started = time.perf_counter()
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, precision):
            state = model.encode_user(
                batch.hist_item, batch.hist_category, batch.hist_behavior, batch.hist_mask, batch.hist_timestamp
            )
            out = model.score(state, batch.cand_item, batch.cand_category, batch.hist_index, batch.cand_popularity)
        batch_counts = model.codeword_counts(state)
        if batch_counts is not None:
            batch_counts = batch_counts.double().cpu()
            counts = batch_counts if counts is None else counts + batch_counts
        users.append(batch.user)
        labels.append(batch.label.cpu().numpy())
        logits.append(out.float().cpu().numpy())
        progress.advance(1)
    seconds = time.perf_counter() - started
    progress.stop()
    empty = np.zeros(0)
    return {
        "users": np.concatenate(users) if users else empty,
        "labels": np.concatenate(labels) if labels else empty,
        "logits": np.concatenate(logits) if logits else empty,
        "seconds": seconds,
        "codeword_counts": None if counts is None else counts.numpy(),
    }


def evaluate_split(
    model: InterestModel[Any],
    data: PreparedSet,
    split: str,
    batch_size: int,
    max_len: int,
    device: torch.device,
    progress: Progress | None = None,
    precision: str = "fp32",
    context: distributed.Context = distributed.SINGLE,
) -> tuple[dict[str, float], np.ndarray | None]:
    """AUC, GAUC, logloss and samples/s of one split; plus codeword counts when the model has codebooks.

    Under torchrun (``context``) every rank predicts its part of every batch; rank 0 gathers the
    logits, puts them back in one process's order and computes the metrics: the same metrics from
    the same logits. The other ranks get an empty dict and None.
    """
    loader = BatchLoader(
        data,
        split,
        batch_size,
        max_len,
        shard=(context.rank, context.world_size),
        popularity=model.config.match_features,
    )
    batches = loader.epoch()
    out = predict(model, batches, device, progress, description=f"{split} ", precision=precision)
    parts = distributed.gather(
        context,
        (batches.sample_order(), out["users"], out["labels"], out["logits"], out["codeword_counts"], out["seconds"]),
    )
    if parts is None:
        return {}, None
    place = np.argsort(batches.positions()[np.concatenate([p[0] for p in parts])], kind="stable")
    users, labels, logits = (np.concatenate([p[i] for p in parts])[place] for i in (1, 2, 3))
    metrics = ctr_metrics(users, labels, logits)
    metrics["samples_per_s"] = len(labels) / max(max(p[5] for p in parts), 1e-9)
    counts = [p[4] for p in parts if p[4] is not None]
    return metrics, (np.sum(counts, axis=0) if counts else None)


def evaluate_run(
    workspace: Workspace,
    run_id: str | None = None,
    split: str = "test",
    batch_size: int | None = None,
    device: str = AUTO,
    progress: Progress | None = None,
    precision: str = "fp32",
) -> tuple[str, dict[str, float]]:
    """Evaluate a run's best weights on a split, store the metrics (epoch NULL) and return them.

    ``device`` auto is this machine's (dmqn_core.devices), whatever the run trained on; ``precision`` bf16
    evaluates under bf16 autocast on CUDA, fp32 (the default) as training evaluates.
    """
    _check_split(split)
    device = resolve_device(device)
    check_precision(precision, device)
    run = Run.open(workspace, run_id)
    metrics, _ = evaluate_split(
        run.model(device),
        run.data,
        split,
        batch_size or int(run.train_settings["eval_batch_size"]),
        run.max_len,
        torch.device(device),
        progress,
        precision,
    )
    run.store.log_metrics(run.run_id, split, metrics, epoch=None)
    return run.run_id, metrics


def split_logits(run: Run, split: str = "test", device: str = AUTO, batch_size: int | None = None) -> np.ndarray:
    """The logits of a run's best weights for every sample of a split, in the split's own order (so that
    the logits of two runs on one prepared set pair up sample by sample); in fp32."""
    _check_split(split)
    device = resolve_device(device)
    model = run.model(device)
    loader = BatchLoader(
        run.data,
        split,
        batch_size or int(run.train_settings["eval_batch_size"]),
        run.max_len,
        popularity=model.config.match_features,
    )
    batches = loader.epoch()
    out = predict(model, batches, torch.device(device))
    logits = np.empty(loader.n_samples, dtype=np.float64)
    logits[batches.sample_order()] = out["logits"]
    return logits


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DmqnError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
