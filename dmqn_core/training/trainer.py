"""The Trainer: Adam on binary cross-entropy (eq. 2), epoch after epoch, with named hooks around the loop.

The loop itself only trains and validates. What happens around it is a Hook each, called in the
order the hooks were given (dmqn_core.training.train puts them together): the checkpoints and the
run store's records, early stopping, the caller's stop (`dmqn tune`'s pruner), the ranks' agreement
under torchrun, and DMQN's codebook steps. Batches flow one way: the loader plans an epoch's batches
(BatchLoader.epoch), the trainer moves each to the device and hands it to the model.

Under torchrun every rank runs the same trainer on its part of every batch; ``model`` is then
wrapped in DistributedDataParallel for the training steps, whose backward all-reduces the gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from dmqn_core.data.batches import BatchLoader, EpochBatches
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.devices import autocast
from dmqn_core.errors import DmqnError, exception_summary
from dmqn_core.nn.interest_model import InterestModel
from dmqn_core.progress import Progress
from dmqn_core.runs.checkpoint import restore_weights
from dmqn_core.training import distributed
from dmqn_core.training.evaluate import evaluate_split
from dmqn_core.training.settings import TrainConfig

# On CUDA the steps' losses are read back every this-many steps and at the end of the epoch: reading a
# loss waits for the GPU to finish its step, and meanwhile the host could not queue the next one. The
# CPU has nothing to wait for, and under torchrun the loss is all-reduced every step anyway: every step.
CUDA_LOSS_READ_STEPS = 25


@dataclass
class TrainState:
    """Where a training stands: what a checkpoint carries to resume it (as a plain dict) and the result reports."""

    epoch: int = 0  # the last epoch done
    step: int = 0
    best_epoch: int | None = None
    best_valid_auc: float | None = None
    stale_epochs: int = 0  # epochs since the best one
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)  # epoch, train_loss, valid_auc of each epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        return cls(**values)

    def end_epoch(self, epoch: int, train: TrainedEpoch, valid_auc: float) -> bool:
        """Count a finished epoch; True if its validation AUC is the best so far."""
        self.train_seconds += train.seconds
        self.epoch = epoch
        improved = self.best_valid_auc is None or valid_auc > self.best_valid_auc
        if improved:
            self.best_epoch, self.best_valid_auc, self.stale_epochs = epoch, valid_auc, 0
        else:
            self.stale_epochs += 1
        self.history.append({"epoch": epoch, "train_loss": train.loss, "valid_auc": valid_auc})
        return improved


@dataclass
class TrainedEpoch:
    """One pass over the training split."""

    loss: float  # mean over the samples
    samples_per_s: float
    seconds: float


@dataclass
class EpochResult:
    """An epoch as the hooks see it once it is validated."""

    epoch: int  # 0: the one validation pass of a model with nothing to learn
    train: TrainedEpoch | None  # None for that pass
    valid: dict[str, float]  # the validation metrics, on rank 0 ({} on the other ranks)
    codeword_counts: np.ndarray | None  # (N, W) validation behaviors per codeword (codebook models, rank 0)
    improved: bool = False  # on rank 0: the best validation AUC so far


class Hook:
    """What happens around the epoch loop at one of its named points; each method is a no-op unless overridden.

    A hook is called on every rank it was given to; one that writes (the run store, the checkpoints)
    is given to rank 0 alone or checks ``trainer.context.is_main``.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch, once the weights are fresh or restored."""

    def on_validation_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        """An epoch is trained and validated: measure and record it."""

    def on_epoch_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        """Between epochs: change the model for the next one, save, decide whether to go on (``trainer.stop``)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch, before the test split."""

    def on_test_end(self, trainer: Trainer, test: dict[str, float]) -> None:
        """The test split is evaluated (``test`` holds its metrics on rank 0)."""


class Trainer:
    """Fits one model: ``fit()`` trains until the last epoch or a hook's stop, ``test()`` evaluates the test split.

    ``model`` is built and on ``device``; the optimiser is Adam when the model is trainable.
    """

    def __init__(
        self,
        model: InterestModel[Any],
        data: PreparedSet,
        config: TrainConfig,
        device: torch.device,
        context: distributed.Context,
        progress: Progress,
        hooks: Sequence[Hook] = (),
    ) -> None:
        self.model = model
        self.data = data
        self.config = config
        self.device = device
        self.context = context
        self.progress = progress
        self.hooks = list(hooks)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = (
            torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay) if model.trainable else None
        )
        self.state = TrainState()
        self.resumed = False  # restored from a checkpoint rather than starting from fresh weights
        self.stop_reason: str | None = None

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint: weights, optimiser moments, counters and the RNG (the GPU's too when
        the run trained on one and continues on one)."""
        restore_weights(self.model, checkpoint, path)
        try:
            if self.optimizer is not None and checkpoint["optimizer_state"]:
                self.optimizer.load_state_dict(checkpoint["optimizer_state"])
            self.state = TrainState.from_dict(checkpoint["train_state"])
            torch.set_rng_state(checkpoint["torch_rng"])
            if self.device.type == "cuda" and "cuda_rng" in checkpoint:
                torch.cuda.set_rng_state(checkpoint["cuda_rng"], self.device)
        except (ValueError, TypeError, RuntimeError, KeyError) as exc:
            raise DmqnError(f"checkpoint {path} is damaged or not this run's ({exception_summary(exc)})") from None
        self.resumed = True

    def stop(self, reason: str) -> None:
        """End the training after this epoch; ``reason`` is logged. The first reason given stands."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def fit(self) -> None:
        for hook in self.hooks:
            hook.on_fit_start(self)
        if self.optimizer is None:
            self._validate_untrained()
        else:
            self._fit_epochs(self.optimizer)
        for hook in self.hooks:
            hook.on_fit_end(self)

    def test(self) -> dict[str, float]:
        """The test split's metrics on rank 0 ({} on the other ranks)."""
        test, _ = self.evaluate("test")
        for hook in self.hooks:
            hook.on_test_end(self, test)
        return test

    def evaluate(self, split: str) -> tuple[dict[str, float], np.ndarray | None]:
        """Metrics and codeword counts of a split, on rank 0 (every rank predicts its part of every batch)."""
        cfg = self.config
        return evaluate_split(
            self.model,
            self.data,
            split,
            cfg.eval_batch_size,
            cfg.resolved_max_len,
            self.device,
            self.progress,
            context=self.context,
        )

    def _validate_untrained(self) -> None:
        """Nothing to learn (the popularity scorer): one validation pass is its only and best epoch, 0."""
        valid, counts = self.evaluate("valid")
        result = EpochResult(0, None, valid, counts)
        if self.context.is_main:
            self.state.best_epoch, self.state.best_valid_auc = 0, valid["auc"]
            result.improved = True
        for hook in self.hooks:
            hook.on_validation_end(self, result)
        self.state = distributed.broadcast(self.context, self.state)

    def _fit_epochs(self, optimizer: torch.optim.Optimizer) -> None:
        forward = self._forward()
        cfg, context = self.config, self.context
        loader = BatchLoader(
            self.data,
            "train",
            cfg.batch_size,
            cfg.resolved_max_len,
            shuffle=True,
            seed=cfg.seed,
            shard=(context.rank, context.world_size),
            popularity=self.model.config.match_features,
        )
        while self.state.epoch < cfg.epochs:
            epoch = self.state.epoch + 1
            batches = loader.epoch(epoch)
            self.model.set_epoch(epoch)
            if context.active:
                # Different Gumbel noise and dropout on every rank, a function of (seed, rank, epoch)
                # so that a resumed run continues exactly (one process restores its RNG state instead).
                torch.manual_seed(_rank_seed(cfg.seed, context.rank, epoch))
            trained = self.train_epoch(epoch, forward, optimizer, batches)
            valid, counts = self.evaluate("valid")
            result = EpochResult(epoch, trained, valid, counts)
            if context.is_main:
                result.improved = self.state.end_epoch(epoch, trained, valid["auc"])
                self.progress.log(
                    f"epoch {epoch}: train loss {trained.loss:.4f}, valid AUC {valid['auc']:.4f}"
                    f"{' (best)' if result.improved else ''}, {trained.samples_per_s:,.0f} samples/s"
                )
            for hook in self.hooks:
                hook.on_validation_end(self, result)
            for hook in self.hooks:
                hook.on_epoch_end(self, result)
            if self.stop_reason is not None:
                self.progress.log(self.stop_reason)
                break

    def _forward(self) -> torch.nn.Module:
        """What the training steps call: the model, or under torchrun its DistributedDataParallel wrapper."""
        if not self.context.active:
            return self.model
        # Every parameter of every registered model gets a gradient at every step
        # (tests/test_model_contract.py: test_gradients_reach_every_parameter), so DDP need not
        # search the graph for unused ones. The only buffers (ETA's and SDIM's SimHash planes)
        # are fixed; DDP's default broadcast of rank 0's buffers before each step is cheap and
        # would keep running statistics in step if a model ever had some.
        forward = DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            process_group=distributed.gradient_group(self.context, self.device),
            find_unused_parameters=False,
        )
        self.progress.log(
            f"training with {self.context.world_size} processes "
            f"({distributed.gradient_backend(self.context, self.device)}), "
            f"each on its part of every batch of {self.config.batch_size}"
        )
        return forward

    def train_epoch(
        self, epoch: int, forward: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: EpochBatches
    ) -> TrainedEpoch:
        """One pass over the training split's ``batches`` (the steps of epoch ``epoch``)."""
        context = self.context
        forward.train()
        self.progress.start(f"epoch {epoch}/{self.config.epochs}", len(batches))
        read_every = CUDA_LOSS_READ_STEPS if self.device.type == "cuda" and not context.active else 1
        losses = _LossMeter(context, self.progress, read_every)
        for batch, n, n_global in batches.steps():
            batch = batch.to(self.device)
            with autocast(self.device, self.config.precision):
                logits = forward(**batch.model_inputs())
                loss = F.binary_cross_entropy_with_logits(logits, batch.label)  # eq. 2
                objective = loss + self.model.auxiliary_loss()
            if context.active:
                # DDP averages the ranks' gradients: (1/W) Σ_r ∇(w_r·mean_r) with w_r = n_r·W/n is
                # Σ_r (n_r/n) ∇mean_r, the gradient of the mean over the whole batch of n samples, as
                # one process computes it, however unevenly the batch was split (a stand-in has n_r = 0).
                # The auxiliary losses (DIEN's L_aux, DMQN's usage regulariser) are means over a rank's
                # part, so they get the same weights: their global value becomes the samples-weighted
                # mean of the ranks' values, not the value over the whole batch.
                objective = objective * (n * context.world_size / n_global)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            self.state.step += 1
            losses.add(loss.detach(), n, n_global, self.state.step)
        losses.read()
        seconds = losses.seconds()
        self.progress.stop()
        return TrainedEpoch(losses.total / max(losses.samples, 1), losses.samples / max(seconds, 1e-9), seconds)


class _LossMeter:
    """The steps' losses of one epoch, read back from the device a group of steps at a time.

    Under torchrun each step's loss is all-reduced: every rank sees the whole batch's loss, so the
    same progress and the same divergence check.
    """

    def __init__(self, context: distributed.Context, progress: Progress, read_every: int) -> None:
        self.context = context
        self.progress = progress
        self.read_every = read_every
        self.total = 0.0  # sum of the samples' losses read so far
        self.samples = 0
        self.started = time.perf_counter()
        self.unread: list[tuple[Tensor, int, int]] = []  # (loss, n, n_global) of the steps not read yet
        self.last_step = 0

    def add(self, loss: Tensor, n: int, n_global: int, step: int) -> None:
        self.unread.append((loss, n, n_global))
        self.last_step = step
        if len(self.unread) == self.read_every:
            self.read()

    def read(self) -> None:
        """Add the unread steps' losses: a DmqnError at the first that is not finite (training diverged)."""
        if not self.unread:
            return
        # One transfer for the unread steps; float32 values as float() would read them one by one.
        values = torch.stack([loss for loss, _, _ in self.unread]).tolist()
        first_step = self.last_step - len(self.unread) + 1
        for i, (value, (_, n, n_global)) in enumerate(zip(values, self.unread)):
            batch_loss = value * n
            if self.context.active:
                (batch_loss,) = distributed.all_reduce_sum(self.context, [batch_loss if n else 0.0])
                n = n_global
            self.total += batch_loss
            self.samples += n
            if not math.isfinite(batch_loss):
                raise DmqnError(
                    f"training diverged at step {first_step + i} (loss {batch_loss / n:.4g}); try a lower --lr"
                )
        elapsed = self.seconds()
        self.progress.advance(
            len(self.unread), loss=self.total / self.samples, samples_per_s=self.samples / max(elapsed, 1e-9)
        )
        self.unread.clear()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _rank_seed(seed: int, rank: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
