"""Training a run: Adam on binary cross-entropy (eq. 2), validation AUC each epoch, early stopping,
atomic checkpoints, resumable runs, everything recorded in the run store.

One code path trains every model of the registry (``dmqn_core.models.registry``): the same batches,
embeddings, MLP head, optimiser and budget, so that differences between runs come from the
sequence modules. ``train`` settles the run (a new one, or the one resumed) under its lock, builds
the model and hands it to the Trainer (trainer.py) with the hooks of this run (hooks.py,
codebooks.py); it records how the run ended when training fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dmqn_core.config import ModelConfig
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.devices import resolve_device
from dmqn_core.errors import DmqnError, exception_summary
from dmqn_core.models.dmqn.model import is_codebook_model
from dmqn_core.models.registry import build_model, model_names
from dmqn_core.nn.interest_model import InterestModel
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runs.checkpoint import CHECKPOINT, load_checkpoint
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RUN_LOCK, RunStore, new_run_id
from dmqn_core.training import distributed
from dmqn_core.training.codebooks import InspectionSample, codebook_hooks
from dmqn_core.training.hooks import CallerStop, Checkpoint, DistributedSync, EarlyStopping, EpochCallback, RunRecorder
from dmqn_core.training.settings import TrainConfig, check_train_config, read_config_file, resolve_configs
from dmqn_core.training.trainer import Hook, Trainer, count_parameters
from dmqn_core.workspace import Workspace, check_plain_name, exclusive_lock

# Callers import the settings' functions from here too, where they were before settings.py.
__all__ = [
    "EpochCallback",
    "TrainConfig",
    "TrainResult",
    "count_parameters",
    "read_config_file",
    "resolve_configs",
    "train",
]

# What a checkpoint needs to resume a run (load_checkpoint checks that they are there).
RESUME_KEYS = ("model_state", "optimizer_state", "train_state", "torch_rng")


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
    device: str = "cpu"  # where it trained (rank 0's device under torchrun)
    precision: str = "fp32"


def train(
    workspace: Workspace,
    dataset: str | None = None,
    model_name: str = "dmqn",
    model_settings: dict[str, Any] | None = None,
    train_settings: dict[str, Any] | None = None,
    resume: str | None = None,
    progress: Progress | None = None,
    run_id: str | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train ``model_name`` on a prepared set, or resume the run ``resume``; returns the summary.

    ``run_id`` names a new run in advance (a bench records it before training starts, so that
    it can find the run again after a kill). While a process trains a run it holds the run's
    lock: a second process resuming the same run fails at once instead of training it twice,
    and a run recorded as running whose lock nobody holds reads as dead (dmqn_core.runs.store).

    ``on_epoch(epoch, valid_metrics)`` is called on rank 0 after each epoch is recorded; when it
    returns True training stops there, as early stopping would (`dmqn tune`'s pruner uses it): the
    best epoch so far is evaluated on the test split and the run finishes.

    Every setting, the model and the data set are checked before a new run gets its directory,
    lock and run-store row, so a refused training leaves nothing behind; a run that fails after
    that is recorded as failed (interrupted after Ctrl-C or SIGTERM).

    Started by torchrun with more than one process (``dmqn_core.training.distributed``), every process
    calls this: they train one model with DistributedDataParallel, each on its part of every
    batch, and rank 0 alone holds the lock, writes the run store and checkpoints and reports
    progress. Every rank returns rank 0's result.
    """
    with distributed.process_group() as context, contextlib.ExitStack() as held:
        store = RunStore(workspace.store_path)  # used by rank 0 only: the other ranks never touch the store

        def claim_run() -> _Plan:  # on rank 0, which holds the lock until training ends
            if resume is not None:
                claimed = store.get_run(check_plain_name(resume, "run id")).run_id
                held.enter_context(exclusive_lock(workspace.run_dir(claimed) / RUN_LOCK, f"run {claimed}"))
                # Checked under the lock: no other process can be resuming the run meanwhile.
                return _plan_resume(workspace, claimed, train_settings, context)
            plan = _plan_new(workspace, store, dataset, model_name, model_settings, train_settings, run_id, context)
            held.enter_context(exclusive_lock(workspace.run_dir(plan.run_id) / RUN_LOCK, f"run {plan.run_id}"))
            return plan

        plan = distributed.from_main(context, claim_run)
        return _train(workspace, store, plan, progress if context.is_main else None, context, on_epoch)


@dataclass
class _Plan:
    """What rank 0 settles before training, from the arguments or the resumed run, for every rank."""

    run_id: str
    new_run: bool  # False: an existing run is resumed
    model_name: str
    dataset_name: str
    data_path: str
    model_config: ModelConfig
    train_config: TrainConfig
    resumed: bool  # a checkpoint exists to continue from


def _plan_new(
    workspace: Workspace,
    store: RunStore,
    dataset: str | None,
    model_name: str,
    model_settings: dict[str, Any] | None,
    train_settings: dict[str, Any] | None,
    run_id: str | None,
    context: distributed.Context,
) -> _Plan:
    if dataset is None:
        raise DmqnError("name a prepared data set to train on (see `dmqn prep`)")
    if model_name not in model_names():
        raise DmqnError(f"unknown model {model_name!r}; known: {', '.join(model_names())}")
    if run_id is not None:
        check_plain_name(run_id, "run id")
    data = PreparedSet.open(workspace.dataset_path(dataset))
    model_config, train_config = resolve_configs(data, model_settings or {}, train_settings or {})
    _check_world_size(train_config, context)
    _check_model_fits(model_name, model_config, data, train_config.device)
    run_id = run_id or new_run_id()
    if store.has_run(run_id):  # also opens the store: a damaged one fails before the run exists
        raise DmqnError(f"run {run_id} already exists; resume it with --resume {run_id}")
    return _Plan(
        run_id,
        True,
        model_name,
        data.meta.get("name") or Path(data.path).name,
        str(data.path),
        model_config,
        train_config,
        resumed=False,
    )


def _check_model_fits(model_name: str, model_config: ModelConfig, data: PreparedSet, device: str) -> None:
    """A DmqnError when the model's weights, gradients and Adam's two moments cannot fit in the
    device's memory: `--embed-dim 1099511627776` must be refused before the run exists, not found by
    the allocator. The model is built on the meta device, which allocates nothing."""
    try:
        with torch.device("meta"):
            model = build_model(model_name, model_config, item_popularity=data.item_popularity)
    except RuntimeError as exc:  # a tensor of more than 2^63 bytes: torch refuses to describe it
        if "overflow" not in str(exc):
            raise
        raise DmqnError(
            f"{model_name} with these settings is too large for any memory ({exception_summary(exc)})"
        ) from None
    n_values = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    needed = 4 * n_values * 4  # float32 weights, gradients and two Adam moments
    if device.startswith("cuda"):
        available = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > available:
        raise DmqnError(
            f"{model_name} with these settings has {n_values:,} weights, {needed / 2**30:,.1f} GiB with their "
            f"gradients and Adam's state: more than the {available / 2**30:,.1f} GiB of {device} memory"
        )


def _plan_resume(
    workspace: Workspace,
    run_id: str,
    train_settings: dict[str, Any] | None,
    context: distributed.Context,
) -> _Plan:
    run = Run.open(workspace, run_id)
    if run.record.status == "finished":
        raise DmqnError(f"run {run.run_id} already finished; nothing to resume")
    extra = dict(train_settings or {})
    if set(extra) - {"epochs", "device"}:
        raise DmqnError("a resumed run keeps its settings; only --epochs and --device may change")
    train_config = TrainConfig.from_dict({**run.train_settings, **extra})
    # The recorded device is the resolved one: a resumed run continues where it trained unless --device
    # says otherwise (--device auto resolves again, on this machine).
    if "device" not in extra and train_config.device.startswith("cuda") and not torch.cuda.is_available():
        raise DmqnError(
            f"run {run.run_id} trained on {train_config.device}, which this machine does not have; "
            "pass --device cpu (or auto) to continue it here"
        )
    train_config = dataclasses.replace(train_config, device=resolve_device(train_config.device))
    check_train_config(train_config)
    _check_world_size(train_config, context)
    return _Plan(
        run.run_id,
        False,
        run.model_name,
        run.record.dataset,
        str(run.data.path),
        run.config,
        train_config,
        resumed=run.checkpoint_path.exists(),
    )


def _check_world_size(train_config: TrainConfig, context: distributed.Context) -> None:
    if train_config.batch_size < context.world_size:
        raise DmqnError(
            f"batch-size {train_config.batch_size} is smaller than the {context.world_size} "
            "training processes; every process needs a part of each batch"
        )


def _train(
    workspace: Workspace,
    store: RunStore,
    plan: _Plan,
    progress: Progress | None,
    context: distributed.Context,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    progress = progress or NullProgress()
    cfg = plan.train_config
    run_dir = workspace.run_dir(plan.run_id)
    recorder = RunRecorder(store, plan.run_id, run_dir, plan.new_run, plan.model_name, plan.dataset_name)
    try:
        # Rank 0 checked that the checkpoint exists; under torchrun the run directory must be on a
        # file system every rank sees (as the prepared set must).
        checkpoint = load_checkpoint(run_dir / CHECKPOINT, RESUME_KEYS) if plan.resumed else None
        data = PreparedSet.open(plan.data_path)
        device = distributed.rank_device(context, cfg.device)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = build_model(plan.model_name, plan.model_config, item_popularity=data.item_popularity).to(device)
        hooks = _hooks(plan, store, run_dir, recorder, model, context, on_epoch)
        trainer = Trainer(model, data, cfg, device, context, progress, hooks)
        if checkpoint is not None:
            trainer.restore(checkpoint, run_dir / CHECKPOINT)
            progress.log(f"resuming run {plan.run_id} after epoch {trainer.state.epoch}")
        trainer.fit()
        test = trainer.test()
        if context.is_main:
            recorder.finish(trainer, test)
        # The other ranks wait here for rank 0's records, so that all processes end together.
        test = distributed.broadcast(context, test)
        state = trainer.state
        return TrainResult(
            run_id=plan.run_id,
            model=plan.model_name,
            dataset=plan.dataset_name,
            best_epoch=state.best_epoch,
            best_valid_auc=state.best_valid_auc,
            test=test,
            train_seconds=state.train_seconds,
            n_parameters=count_parameters(model),
            history=state.history,
            device=str(device),
            precision=cfg.precision,
        )
    except KeyboardInterrupt:
        if context.is_main:
            _record_end(store, plan, run_dir, recorder.started, "interrupted", "interrupted by the user")
        raise
    except Exception as exc:
        if context.is_main:
            _record_end(store, plan, run_dir, recorder.started, "failed", f"{type(exc).__name__}: {exc}")
        if _out_of_memory(exc):  # batches too large for the machine: the user's to change, not a bug
            raise DmqnError(f"run {plan.run_id} ran out of memory ({exception_summary(exc)})") from None
        raise


def _hooks(
    plan: _Plan,
    store: RunStore,
    run_dir: Path,
    recorder: RunRecorder,
    model: InterestModel[Any],
    context: distributed.Context,
    on_epoch: EpochCallback | None,
) -> list[Hook]:
    """This rank's hooks, in the order they run at each point. A codebook model's steps come first: its
    k-means codewords before the run's row (an initialisation that fails leaves no run), its dead codewords
    reset before the checkpoint that keeps them. The files come before the run-store records that name them,
    the test metrics before the inspection sample, and last whether to go on: the caller's word, rank 0's
    word for every rank, then patience."""
    cfg, main = plan.train_config, context.is_main
    hooks = codebook_hooks(model, main, store, plan.run_id)
    hooks.append(Checkpoint(run_dir, plan.model_name))
    if main:
        hooks.append(recorder)
        if is_codebook_model(model) and cfg.inspect_users > 0:
            hooks.append(InspectionSample(model, store, plan.run_id))
        if on_epoch is not None:
            hooks.append(CallerStop(on_epoch))
    if context.active:
        hooks.append(DistributedSync())
    hooks.append(EarlyStopping(cfg.patience))
    return hooks


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (NumPy's MemoryError, torch's CPU allocator or CUDA)."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _record_end(store: RunStore, plan: _Plan, run_dir: Path, started: bool, status: str, error: str) -> None:
    """Rank 0, after training stopped with an error: record how the run ended.

    Before this (re)start was recorded nothing is: a resumed run keeps its status, and the
    directory of a new run, which holds nothing but its lock, is removed again.
    """
    with _signals_ignored():
        if not started:
            if plan.new_run:
                (run_dir / RUN_LOCK).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # something else was put there: leave it
                    run_dir.rmdir()
            return
        try:
            store.finish_run(plan.run_id, status, error=error)
        except (DmqnError, OSError):
            # A store that cannot be written now (read-only, disk full) must not hide the error that
            # stopped the run. Left "running", the run reads dead once this process lets its lock go,
            # and is resumable all the same.
            pass


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while a failed or interrupted run's status is written.

    When one training process fails, torchrun terminates the others at once, typically while
    rank 0 is recording the failure: a KeyboardInterrupt inside that write would roll it back
    and leave the run "running". The process is on its way out with its own error anyway.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread has handlers
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python, which stays replaced
                signal.signal(signum, handler)
