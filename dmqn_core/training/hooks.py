"""The hooks every training has: its checkpoints, its records in the run store, the caller's stop (`dmqn
tune`'s pruner), the ranks' agreement under torchrun and early stopping. The codebook models' own hooks
are in codebooks.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import dmqn_core
from dmqn_core.runs.checkpoint import BEST, CHECKPOINT, load_checkpoint, restore_weights, save_checkpoint
from dmqn_core.runs.run import write_vocabulary
from dmqn_core.runs.store import RunStore
from dmqn_core.training import distributed
from dmqn_core.training.trainer import EpochResult, Hook, Trainer, count_parameters

# Called after each epoch with (epoch, validation metrics); True stops the training there.
EpochCallback = Callable[[int, dict[str, float]], bool]


class Checkpoint(Hook):
    """The run's two checkpoint files (dmqn_core.runs.checkpoint), written by rank 0: best.pt, the weights of
    the best validation epoch so far, and after every epoch checkpoint.pt, all a resumed run needs.
    After the last epoch every rank takes the best weights back for the test split."""

    def __init__(self, run_dir: Path, model_name: str) -> None:
        self.run_dir = run_dir
        self.model_name = model_name

    def on_validation_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        if trainer.context.is_main and epoch.improved:
            save_checkpoint({"model_state": trainer.model.state_dict(), "epoch": epoch.epoch}, self.run_dir / BEST)

    def on_epoch_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        if not trainer.context.is_main:
            return
        assert trainer.optimizer is not None  # called between epochs, which only a model that learns has
        model = trainer.model
        checkpoint = {
            "model_state": model.state_dict(),
            "optimizer_state": trainer.optimizer.state_dict(),
            "train_state": trainer.state.to_dict(),
            "torch_rng": torch.get_rng_state(),
            "model_name": self.model_name,
            "model_config": model.config.to_dict(),
            "train_config": asdict(trainer.config),
        }
        if trainer.device.type == "cuda":
            # Dropout and DIEN's negative sampling draw on the GPU's generator; a CPU run's checkpoint stays as it was.
            checkpoint["cuda_rng"] = torch.cuda.get_rng_state(trainer.device)
        save_checkpoint(checkpoint, self.run_dir / CHECKPOINT)

    def on_fit_end(self, trainer: Trainer) -> None:
        restore_weights(trainer.model, load_checkpoint(self.run_dir / BEST), self.run_dir / BEST)


class RunRecorder(Hook):
    """Rank 0's records of the training in the run store: the run's row when training (re)starts, then the
    metrics of every epoch and of the test split; ``finish`` marks the run finished."""

    def __init__(
        self, store: RunStore, run_id: str, run_dir: Path, new_run: bool, model_name: str, dataset_name: str
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.run_dir = run_dir
        self.new_run = new_run  # False: an existing run is resumed
        self.model_name = model_name
        self.dataset_name = dataset_name
        self.started = False  # this (re)start of the run is recorded as running

    def on_fit_start(self, trainer: Trainer) -> None:
        data, cfg = trainer.data, trainer.config
        params = {
            # A registry entry may fix settings (dmqn-simple has no ICIM): what the model really uses.
            "model": trainer.model.config.to_dict(),
            "train": asdict(cfg),
            "data": {
                "name": self.dataset_name,
                "path": str(data.path),
                "protocol": data.meta.get("protocol", {}),
                "fingerprint": data.fingerprint,
            },
            "versions": {"dmqn": dmqn_core.__version__, "torch": torch.__version__, "numpy": np.__version__},
            # How the latest (re)start trained: processes, and what carried their gradients.
            "distributed": {
                "world_size": trainer.context.world_size,
                "backend": distributed.gradient_backend(trainer.context, trainer.device),
            },
        }
        if self.new_run:
            self.store.create_run(
                model=self.model_name,
                dataset=self.dataset_name,
                dataset_path=str(data.path),
                params=params,
                seed=cfg.seed,
                n_parameters=count_parameters(trainer.model),
                run_id=self.run_id,
            )
        else:
            self.store.delete_epochs_after(self.run_id, trainer.state.epoch)
            self.store.update_run(self.run_id, status="running", error=None, params=params)
        self.started = True
        write_vocabulary(self.run_dir, data)  # so that the run serves without its prepared set (dmqn_core.runs.run)

    def on_validation_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        if epoch.train is not None:
            train = {"loss": epoch.train.loss, "samples_per_s": epoch.train.samples_per_s}
            self.store.log_metrics(self.run_id, "train", train, epoch=epoch.epoch)
        self.store.log_metrics(self.run_id, "valid", epoch.valid, epoch=epoch.epoch)

    def on_epoch_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        state = trainer.state
        self.store.update_run(
            self.run_id,
            epochs_done=epoch.epoch,
            best_epoch=state.best_epoch,
            best_valid_auc=state.best_valid_auc,
            train_seconds=state.train_seconds,
            checkpoint=str(self.run_dir / CHECKPOINT),
        )

    def on_test_end(self, trainer: Trainer, test: dict[str, float]) -> None:
        self.store.log_metrics(self.run_id, "test", test, epoch=trainer.state.best_epoch)

    def finish(self, trainer: Trainer, test: dict[str, float]) -> None:
        state = trainer.state
        self.store.finish_run(
            self.run_id,
            "finished",
            test_auc=test["auc"],
            test_gauc=test["gauc"],
            test_logloss=test["logloss"],
            best_epoch=state.best_epoch,
            best_valid_auc=state.best_valid_auc,
            train_seconds=state.train_seconds,
            checkpoint=str(self.run_dir / BEST),
        )


class CallerStop(Hook):
    """Rank 0: the caller's ``on_epoch(epoch, valid_metrics)`` after each epoch; True stops the training
    there, as early stopping would (`dmqn tune`'s pruner)."""

    def __init__(self, on_epoch: EpochCallback) -> None:
        self.on_epoch = on_epoch

    def on_epoch_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        if self.on_epoch(epoch.epoch, epoch.valid):
            trainer.stop(f"stopped after epoch {epoch.epoch} by the caller")


class DistributedSync(Hook):
    """Under torchrun, after the hooks of rank 0 alone: rank 0's state and stop decide for every rank, so
    that all ranks count the same epochs and stop after the same one."""

    def on_epoch_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        trainer.state = distributed.broadcast(trainer.context, trainer.state)
        trainer.stop_reason = distributed.broadcast(trainer.context, trainer.stop_reason)


class EarlyStopping(Hook):
    """Stop after ``patience`` epochs without a better validation AUC."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, epoch: EpochResult) -> None:
        if trainer.state.stale_epochs >= self.patience:
            trainer.stop(f"early stop: no better validation AUC for {self.patience} epochs")
