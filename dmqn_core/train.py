"""Training: Adam on binary cross-entropy (eq. 2), validation AUC each epoch, early stopping,
atomic checkpoints, resumable runs, everything recorded in the run store.

One code path trains every model of the registry (``dmqn_core.models``): the same batches,
embeddings, MLP head, optimiser and budget, so that differences between runs come from the
sequence modules.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import dmqn_core
from dmqn_core.batches import BatchLoader
from dmqn_core.config import ModelConfig
from dmqn_core.dmqn import DMQN
from dmqn_core.errors import DmqnError
from dmqn_core.evaluate import evaluate_split, load_checkpoint
from dmqn_core.inspection import record_inspection
from dmqn_core.models import build_model, model_names
from dmqn_core.prepared import PreparedSet
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.quantizer import CodebookUsage
from dmqn_core.runstore import RunStore, new_run_id
from dmqn_core.workspace import Workspace, atomic_write_bytes, exclusive_lock

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CHECKPOINT = "checkpoint.pt"   # everything needed to resume: model, optimiser, step, RNG, configs
BEST = "best.pt"               # the weights of the best validation epoch, used for test and eval


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 256
    eval_batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_len: int | None = None        # None: the prepared set's --max-len
    patience: int = 2                 # epochs without a better validation AUC before stopping
    seed: int = 0
    device: str = "cpu"
    # dmqn / dmqn-simple: users whose codeword assignments and attention are recorded at the end
    # of training for `dmqn inspect` and `dmqn report` (dmqn_core.inspection); 0 records nothing.
    inspect_users: int = 300

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return cls(**_checked(cls, values, "train"))


def _checked(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise DmqnError(f"unknown [{section}] setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dict(values)


def read_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The [model] and [train] tables of a TOML file (see examples/dmqn.toml)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise DmqnError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise DmqnError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"model", "train"})
    if unknown:
        raise DmqnError(f"config file {path}: unknown table(s) {', '.join(unknown)}; use [model] and [train]")
    return dict(document.get("model", {})), dict(document.get("train", {}))


def resolve_configs(data: PreparedSet, model_settings: dict[str, Any], train_settings: dict[str, Any]
                    ) -> tuple[ModelConfig, TrainConfig]:
    """Defaults, overridden by the given settings; vocabulary sizes come from the data."""
    vocab_fields = {"n_items", "n_categories", "n_behavior_types"}
    given = _checked(ModelConfig, model_settings, "model")
    if vocab_fields & set(given):
        raise DmqnError(f"{', '.join(sorted(vocab_fields & set(given)))} come(s) from the data set and cannot be set")
    if "mlp_hidden" in given:
        given["mlp_hidden"] = tuple(given["mlp_hidden"])
    model_config = ModelConfig(
        n_items=data.n_items + 1, n_categories=data.n_categories + 1,
        n_behavior_types=data.n_behavior_types + 1, **given,
    )
    train_config = TrainConfig.from_dict(train_settings)
    if train_config.max_len is None:
        train_config = dataclasses.replace(train_config, max_len=int(data.meta["protocol"]["max_len"]))
    _validate(train_config)
    return model_config, train_config


def _validate(cfg: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "eval_batch_size", "max_len"):
        if getattr(cfg, name) < 1:
            raise DmqnError(f"{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.inspect_users < 0:
        raise DmqnError(f"inspect-users must be 0 or more, got {cfg.inspect_users}")
    if cfg.lr <= 0:
        raise DmqnError(f"lr must be positive, got {cfg.lr}")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise DmqnError(f"device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise DmqnError("--device cuda was asked for but this torch build sees no CUDA device")


@dataclass
class TrainResult:
    run_id: str
    model: str
    dataset: str
    best_epoch: int | None
    best_valid_auc: float | None
    test: dict[str, float]
    train_seconds: float
    n_parameters: int
    history: list[dict[str, float]] = field(default_factory=list)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _save(obj: dict[str, Any], path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train(workspace: Workspace, dataset: str | None = None, model_name: str = "dmqn",
          model_settings: dict[str, Any] | None = None, train_settings: dict[str, Any] | None = None,
          resume: str | None = None, progress: Progress | None = None, run_id: str | None = None) -> TrainResult:
    """Train ``model_name`` on a prepared set, or resume the run ``resume``; returns the summary.

    ``run_id`` names a new run in advance (a bench records it before training starts, so that
    it can find the run again after a kill). While a process trains a run it holds the run's
    lock: a second process resuming the same run fails at once instead of training it twice.
    """
    if resume is not None:
        run_id = RunStore(workspace.store_path).get_run(resume).run_id
    else:
        run_id = run_id or new_run_id()
    with exclusive_lock(workspace.run_dir(run_id) / ".lock", f"run {run_id}"):
        return _train(workspace, dataset, model_name, model_settings, train_settings, resume, progress, run_id)


def _train(workspace: Workspace, dataset: str | None, model_name: str, model_settings: dict[str, Any] | None,
           train_settings: dict[str, Any] | None, resume: str | None, progress: Progress | None,
           run_id: str) -> TrainResult:
    progress = progress or NullProgress()
    store = RunStore(workspace.store_path)

    if resume is not None:
        record = store.get_run(resume)
        run_dir = workspace.run_dir(record.run_id)
        checkpoint = load_checkpoint(run_dir / CHECKPOINT) if (run_dir / CHECKPOINT).exists() else None
        if record.status == "finished":
            raise DmqnError(f"run {record.run_id} already finished; nothing to resume")
        data = PreparedSet.open(record.dataset_path)
        model_config = ModelConfig.from_dict(record.params["model"])
        extra = dict(train_settings or {})
        if set(extra) - {"epochs", "device"}:
            raise DmqnError("a resumed run keeps its settings; only --epochs and --device may change")
        train_config = TrainConfig.from_dict({**record.params["train"], **extra})
        _validate(train_config)
        model_name, run_id, dataset_name = record.model, record.run_id, record.dataset
    else:
        if dataset is None:
            raise DmqnError("name a prepared data set to train on (see `dmqn prep`)")
        if model_name not in model_names():
            raise DmqnError(f"unknown model {model_name!r}; known: {', '.join(model_names())}")
        data_path = workspace.dataset_path(dataset)
        data = PreparedSet.open(data_path)
        model_config, train_config = resolve_configs(data, model_settings or {}, train_settings or {})
        checkpoint = None
        dataset_name = data.meta.get("name") or Path(data.path).name

    device = torch.device(train_config.device)
    torch.manual_seed(train_config.seed)
    model = build_model(model_name, model_config, item_popularity=data.item_popularity).to(device)
    # A registry entry may fix settings (dmqn-simple has no ICIM): store what the model really uses.
    model_config = getattr(model, "config", model_config)
    n_parameters = count_parameters(model)
    params = {
        "model": model_config.to_dict(),
        "train": asdict(train_config),
        "data": {"name": dataset_name, "path": str(data.path), "protocol": data.meta.get("protocol", {})},
        "versions": {"dmqn": dmqn_core.__version__, "torch": torch.__version__, "numpy": np.__version__},
    }
    if resume is None:
        run_id = store.create_run(model=model_name, dataset=dataset_name, dataset_path=str(data.path),
                                  params=params, seed=train_config.seed, n_parameters=n_parameters,
                                  run_id=run_id)
    run_dir = workspace.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=train_config.lr, weight_decay=train_config.weight_decay) if trainable else None
    state = {"epoch": 0, "step": 0, "best_epoch": None, "best_valid_auc": None, "stale_epochs": 0,
             "train_seconds": 0.0, "history": []}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model_state"])
        if optimizer is not None and checkpoint.get("optimizer_state"):
            optimizer.load_state_dict(checkpoint["optimizer_state"])
        state.update(checkpoint["train_state"])
        torch.set_rng_state(checkpoint["torch_rng"])
        progress.log(f"resuming run {run_id} after epoch {state['epoch']}")
    if resume is not None:
        store.delete_epochs_after(run_id, state["epoch"])
        store.update_run(run_id, status="running", error=None, params=params)

    loader = BatchLoader(data, "train", train_config.batch_size, train_config.max_len,
                         shuffle=True, seed=train_config.seed)
    try:
        if optimizer is None:
            # Nothing to learn (the popularity scorer): one validation pass picks the "best epoch".
            metrics, _ = evaluate_split(model, data, "valid", train_config.eval_batch_size, train_config.max_len, device, progress)
            store.log_metrics(run_id, "valid", metrics, epoch=0)
            state.update(best_epoch=0, best_valid_auc=metrics["auc"])
            _save({"model_state": model.state_dict(), "epoch": 0}, run_dir / BEST)
        while optimizer is not None and state["epoch"] < train_config.epochs:
            epoch = state["epoch"] + 1
            loader.set_epoch(epoch)
            train_loss, samples_per_s, seconds = _train_epoch(model, loader, optimizer, device, progress, epoch,
                                                              train_config.epochs, state)
            valid, counts = evaluate_split(model, data, "valid", train_config.eval_batch_size, train_config.max_len, device, progress)
            state["train_seconds"] += seconds
            state["epoch"] = epoch
            improved = state["best_valid_auc"] is None or valid["auc"] > state["best_valid_auc"]
            if improved:
                state.update(best_epoch=epoch, best_valid_auc=valid["auc"], stale_epochs=0)
                _save({"model_state": model.state_dict(), "epoch": epoch}, run_dir / BEST)
            else:
                state["stale_epochs"] += 1
            state["history"].append({"epoch": epoch, "train_loss": train_loss, "valid_auc": valid["auc"]})
            store.log_metrics(run_id, "train", {"loss": train_loss, "samples_per_s": samples_per_s}, epoch=epoch)
            store.log_metrics(run_id, "valid", valid, epoch=epoch)
            if counts is not None:
                usage = CodebookUsage.from_counts(np.rint(counts))
                store.log_codebook_usage(run_id, epoch, usage.counts.tolist(),
                                         list(zip(usage.counts.shape[1] - usage.dead, usage.dead, usage.perplexity)))
            _save({"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                   "train_state": dict(state), "torch_rng": torch.get_rng_state(),
                   "model_name": model_name, "model_config": model_config.to_dict(),
                   "train_config": asdict(train_config)}, run_dir / CHECKPOINT)
            store.update_run(run_id, epochs_done=epoch, best_epoch=state["best_epoch"],
                             best_valid_auc=state["best_valid_auc"], train_seconds=state["train_seconds"],
                             checkpoint=str(run_dir / CHECKPOINT))
            progress.log(f"epoch {epoch}: train loss {train_loss:.4f}, valid AUC {valid['auc']:.4f}"
                         f"{' (best)' if improved else ''}, {samples_per_s:,.0f} samples/s")
            if state["stale_epochs"] >= train_config.patience:
                progress.log(f"early stop: no better validation AUC for {train_config.patience} epochs")
                break

        model.load_state_dict(load_checkpoint(run_dir / BEST)["model_state"])
        test, _ = evaluate_split(model, data, "test", train_config.eval_batch_size, train_config.max_len, device, progress)
        store.log_metrics(run_id, "test", test, epoch=state["best_epoch"])
        if isinstance(model, DMQN) and train_config.inspect_users > 0:
            recorded = record_inspection(store, run_id, model, data, train_config.max_len,
                                         train_config.inspect_users, train_config.seed)
            progress.log(f"recorded {recorded} users for `dmqn inspect` and `dmqn report`")
        store.finish_run(run_id, "finished", test_auc=test["auc"], test_gauc=test["gauc"],
                         test_logloss=test["logloss"], best_epoch=state["best_epoch"],
                         best_valid_auc=state["best_valid_auc"], train_seconds=state["train_seconds"],
                         checkpoint=str(run_dir / BEST))
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted", error="interrupted by the user")
        raise
    except Exception as exc:
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return TrainResult(run_id=run_id, model=model_name, dataset=dataset_name, best_epoch=state["best_epoch"],
                       best_valid_auc=state["best_valid_auc"], test=test, train_seconds=state["train_seconds"],
                       n_parameters=n_parameters, history=state["history"])


def _train_epoch(model: torch.nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer,
                 device: torch.device, progress: Progress, epoch: int, epochs: int,
                 state: dict[str, Any]) -> tuple[float, float, float]:
    """One pass over the training split; returns mean loss, samples/s and seconds."""
    model.train()
    progress.start(f"epoch {epoch}/{epochs}", len(loader))
    total_loss, total_samples = 0.0, 0
    started = time.perf_counter()
    for batch in loader:
        batch = batch.to(device)
        logits = model(**batch.model_inputs())
        loss = F.binary_cross_entropy_with_logits(logits, batch.label)        # eq. 2
        auxiliary = getattr(model, "auxiliary_loss", None)
        objective = loss + auxiliary() if auxiliary is not None else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        state["step"] += 1
        n = len(batch)
        total_loss += float(loss.detach()) * n
        total_samples += n
        elapsed = time.perf_counter() - started
        progress.advance(1, loss=total_loss / total_samples, samples_per_s=total_samples / max(elapsed, 1e-9))
        if not math.isfinite(float(loss.detach())):
            raise DmqnError(f"training diverged at step {state['step']} (loss {float(loss):.4g}); try a lower --lr")
    seconds = time.perf_counter() - started
    progress.stop()
    return total_loss / max(total_samples, 1), total_samples / max(seconds, 1e-9), seconds
