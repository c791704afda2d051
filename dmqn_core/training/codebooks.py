"""The hooks of a model with codebooks (DMQN, DMQN-simple): its codewords' k-means initialisation and
dead-codeword resets, the codebook use and quantizer diagnostics recorded every epoch, and the inspection
sample recorded at the end for `dmqn inspect` and `dmqn report`.

Each draws its random numbers from a generator of its own, seeded by (seed, epoch): the training's
stream stays untouched, so a run trains as it would without them and a resumed run does the same.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dmqn_core.data.batches import BatchLoader
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.models.dmqn.mcqm import CodebookUsage
from dmqn_core.models.dmqn.model import DMQN, QuantizerDiagnostics, is_codebook_model
from dmqn_core.nn.interest_model import InterestModel
from dmqn_core.runs.inspection import record_inspection
from dmqn_core.runs.store import RunStore
from dmqn_core.training import distributed
from dmqn_core.training.settings import TrainConfig
from dmqn_core.training.trainer import EpochResult, Hook, Trainer

# The quantizer diagnostics (quantizer_stats, icim_stats) are measured after every epoch on the distinct
# histories of the first this-many validation batches (of eval_batch_size samples): a fixed sample, the
# same every epoch, whose cost does not grow with the validation split.
DIAGNOSTIC_BATCHES = 4
# The behaviors k-means initialises the codewords from, and dead codewords are reset onto (bounded cost).
CODEBOOK_SAMPLE_BATCHES = 8
CODEBOOK_SAMPLE_BEHAVIORS = 65_536
# The generators' streams, one per use (spawn keys of the (seed, epoch) seed sequence).
_DIAGNOSTICS_STREAM = 1
_CODEWORDS_STREAM = 2


def codebook_hooks(model: InterestModel[Any], main: bool, store: RunStore, run_id: str) -> list[Hook]:
    """The codeword hooks ``model`` needs on this rank, as its settings ask: none without codebooks, the
    records on rank 0 only. (InspectionSample comes after the run's records; train.py adds it.)"""
    if not is_codebook_model(model):
        return []
    hooks: list[Hook] = []
    if model.config.codebook_init == "kmeans":
        hooks.append(KMeansInit(model))
    if main:
        hooks.append(CodebookDiagnostics(model, store, run_id))
    if model.config.dead_codeword_reset:
        hooks.append(DeadCodewordReset(model))
    return hooks


class KMeansInit(Hook):
    """codebook_init = "kmeans": a run that starts from fresh weights starts its codewords from k-means of
    the first training behaviors. Every rank reads the same unsharded batches with the same generator,
    so every rank gets the same codewords."""

    def __init__(self, model: DMQN) -> None:
        self.model = model

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.resumed:  # the checkpoint holds the codewords it trained
            return
        cfg = trainer.config
        self.model.quantizer.init_from_data(
            sample_behaviors(self.model, trainer.data, cfg, trainer.device, epoch=0),
            _generator(cfg.seed, 0, trainer.device, _CODEWORDS_STREAM),
        )
        trainer.progress.log("codewords initialised by k-means of the first training behaviors")


class CodebookDiagnostics(Hook):
    """Rank 0, after every epoch: the codebooks' use on the validation split (codebook_usage) and the
    quantizer diagnostics (quantizer_stats, icim_stats), written to the run store."""

    def __init__(self, model: DMQN, store: RunStore, run_id: str) -> None:
        self.model = model
        self.store = store
        self.run_id = run_id

    def on_validation_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        if epoch.codeword_counts is not None:
            usage = CodebookUsage.from_counts(np.rint(epoch.codeword_counts))
            self.store.log_codebook_usage(
                self.run_id,
                epoch.epoch,
                usage.counts.tolist(),
                list(zip(usage.counts.shape[1] - usage.dead, usage.dead, usage.perplexity)),
            )
        diagnostics = quantizer_diagnostics(self.model, trainer.data, trainer.config, trainer.device, epoch.epoch)
        if diagnostics is not None:
            self.store.log_quantizer_stats(
                self.run_id,
                epoch.epoch,
                list(zip(diagnostics.assignment.agreement.tolist(), diagnostics.assignment.margin.tolist())),
                diagnostics.icim_norm_ratio.tolist(),
            )


class DeadCodewordReset(Hook):
    """dead_codeword_reset, on every rank alike after every epoch: codewords with no validation behavior move
    onto training behaviors, before the epoch's checkpoint (best.pt keeps the evaluated ones)."""

    def __init__(self, model: DMQN) -> None:
        self.model = model

    def on_epoch_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        assert trainer.optimizer is not None  # called between epochs, which only a model that learns has
        counts = distributed.broadcast(trainer.context, epoch.codeword_counts)  # rank 0's
        if counts is None:  # no validation samples
            return
        cfg, device = trainer.config, trainer.device
        reset = reset_dead_codewords(
            self.model,
            trainer.optimizer,
            torch.as_tensor(np.rint(counts), device=device),
            sample_behaviors(self.model, trainer.data, cfg, device, epoch.epoch),
            _generator(cfg.seed, epoch.epoch, device, _CODEWORDS_STREAM),
        )
        trainer.progress.log(f"epoch {epoch.epoch}: reset {int(reset.sum())} dead codewords")


class InspectionSample(Hook):
    """Rank 0, once the test split is evaluated with the best weights: the codeword assignments and attention
    of a seeded sample of users, for `dmqn inspect` and `dmqn report` (dmqn_core.runs.inspection)."""

    def __init__(self, model: DMQN, store: RunStore, run_id: str) -> None:
        self.model = model
        self.store = store
        self.run_id = run_id

    def on_test_end(self, trainer: Trainer, test: dict[str, float]) -> None:
        cfg = trainer.config
        recorded = record_inspection(
            self.store, self.run_id, self.model, trainer.data, cfg.resolved_max_len, cfg.inspect_users, cfg.seed
        )
        trainer.progress.log(f"recorded {recorded} users for `dmqn inspect` and `dmqn report`")


def reset_dead_codewords(
    model: DMQN, optimizer: torch.optim.Optimizer, counts: Tensor, sample: Tensor, generator: torch.Generator
) -> Tensor:
    """Move the codewords with zero ``counts`` (N, W) onto behaviors of ``sample`` (M, D); returns the (N, W)
    bool mask of the codewords reset."""
    quantizer = model.quantizer
    reset = quantizer.reset_dead(counts, sample, generator)  # (N, W) bool
    # Adam's moments of a reset codeword belong to the codeword it was: zeroed, the row restarts like a
    # fresh parameter (Adam's step count is per tensor and stays). W_2 is shared by the codebook's
    # codewords and keeps its moments.
    moments = optimizer.state.get(quantizer.codebooks, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in moments:
            moments[key][reset] = 0.0
    return reset


@torch.no_grad()
def sample_behaviors(model: DMQN, data: PreparedSet, config: TrainConfig, device: torch.device, epoch: int) -> Tensor:
    """(M, D) embeddings of the real behaviors of the first training batches of ``epoch``'s order,
    at most CODEBOOK_SAMPLE_BATCHES batches and CODEBOOK_SAMPLE_BEHAVIORS behaviors (a bounded cost).

    A loader of its own, unsharded: every rank gets the same sample and the training loader's order is untouched.
    """
    loader = BatchLoader(data, "train", config.batch_size, config.resolved_max_len, shuffle=True, seed=config.seed)
    parts, total = [], 0
    for batch in itertools.islice(loader.epoch(epoch), CODEBOOK_SAMPLE_BATCHES):
        batch = batch.to(device)
        e = model.behaviors(
            batch.hist_item, batch.hist_category, batch.hist_behavior, batch.hist_mask, batch.hist_timestamp
        )
        parts.append(e[batch.hist_mask])  # (M_b, D) real behaviors only
        total += parts[-1].shape[0]
        if total >= CODEBOOK_SAMPLE_BEHAVIORS:
            break
    if not parts:
        return torch.zeros(0, model.quantizer.codebooks.shape[-1], device=device)
    return torch.cat(parts)[:CODEBOOK_SAMPLE_BEHAVIORS]


def quantizer_diagnostics(
    model: DMQN, data: PreparedSet, config: TrainConfig, device: torch.device, epoch: int
) -> QuantizerDiagnostics | None:
    """DMQN.quantizer_diagnostics over the first DIAGNOSTIC_BATCHES validation batches (None when the
    validation split is empty).

    The training-path codewords are sampled at the epoch's tau with noise from the generator of
    (seed, epoch), so that a resumed run measures the same.
    """
    model.eval()
    generator = _generator(config.seed, epoch, device, _DIAGNOSTICS_STREAM)
    loader = BatchLoader(data, "valid", config.eval_batch_size, config.resolved_max_len)
    total = None
    for batch in itertools.islice(loader.epoch(), DIAGNOSTIC_BATCHES):
        batch = batch.to(device)
        part = model.quantizer_diagnostics(
            batch.hist_item, batch.hist_category, batch.hist_behavior, batch.hist_mask, generator, batch.hist_timestamp
        )
        total = part if total is None else total + part
    return total


def _generator(seed: int, epoch: int, device: torch.device, stream: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, epoch], spawn_key=(stream,)).generate_state(1)[0]))
    return generator
