"""Training: Adam on binary cross-entropy (eq. 2), validation AUC each epoch, early stopping,
atomic checkpoints, resumable runs, everything recorded in the run store.

One code path trains every model of the registry (``dmqn_core.models.registry``): the same batches,
embeddings, MLP head, optimiser and budget, so that differences between runs come from the
sequence modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import dmqn_core
from dmqn_core.config import ModelConfig
from dmqn_core.data.batches import BatchLoader
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.declaration import COMMANDS, TRAIN_AND_BENCH, Between, check_declared, declared, setting
from dmqn_core.devices import AUTO, autocast, check_device, check_precision, resolve_device
from dmqn_core.errors import DmqnError, exception_summary
from dmqn_core.models.dmqn.mcqm import CodebookUsage
from dmqn_core.models.dmqn.model import QuantizerDiagnostics
from dmqn_core.models.registry import build_model, has_codebooks, model_names
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runs.checkpoint import BEST, CHECKPOINT, load_checkpoint, restore_weights, save_checkpoint
from dmqn_core.runs.inspection import record_inspection
from dmqn_core.runs.run import Run, write_vocabulary
from dmqn_core.runs.store import RUN_LOCK, RunStore, new_run_id
from dmqn_core.training import distributed
from dmqn_core.training.evaluate import evaluate_split, predict
from dmqn_core.training.metrics import ctr_metrics
from dmqn_core.workspace import Workspace, check_plain_name, exclusive_lock

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# What a checkpoint needs to resume a run (load_checkpoint checks that they are there).
RESUME_KEYS = ("model_state", "optimizer_state", "train_state", "torch_rng")

# DMQN's quantizer diagnostics (quantizer_stats, icim_stats) are measured after every epoch on the
# distinct histories of the first this-many validation batches (of eval_batch_size samples): a fixed
# sample, the same every epoch, whose cost does not grow with the validation split.
DIAGNOSTIC_BATCHES = 4
# The behaviors k-means initialises the codewords from, and dead codewords are reset onto (bounded cost).
CODEBOOK_SAMPLE_BATCHES = 8
CODEBOOK_SAMPLE_BEHAVIORS = 65_536
# On CUDA the steps' losses are read back every this-many steps and at the end of the epoch: reading a
# loss waits for the GPU to finish its step, and meanwhile the host could not queue the next one. The
# CPU has nothing to wait for, and under torchrun the loss is all-reduced every step anyway: every step.
CUDA_LOSS_READ_STEPS = 25


@dataclass
class TrainConfig:
    # Each field is a setting declared once (dmqn_core.declaration); "at least 1" and the like are the
    # words their messages have always used.
    epochs: int = setting(
        8,
        help="Maximum number of epochs.",
        flag="--epochs",
        commands=COMMANDS,
        low=1,
        expect="at least 1",
    )
    batch_size: int = setting(
        256,
        help="Training samples per batch.",
        flag="--batch-size",
        commands=TRAIN_AND_BENCH,
        low=1,
        expect="at least 1",
    )
    eval_batch_size: int = setting(
        1024, help="Samples per batch of validation and test.", flag=None, low=1, expect="at least 1"
    )
    lr: float = setting(
        1e-3,
        help="Adam learning rate.",
        flag="--lr",
        commands=TRAIN_AND_BENCH,
        low=0,
        low_open=True,
        expect="a positive number",
        search=Between(1e-4, 1e-2, log=True),
    )
    weight_decay: float = setting(
        0.0,
        help="Adam weight decay.",
        flag="--weight-decay",
        commands=TRAIN_AND_BENCH,
        low=0,
        expect="0 or a positive number",
        search=Between(1e-8, 1e-3, log=True, or_zero=True),
    )
    # None: the prepared set's --max-len.
    max_len: int | None = setting(
        None,
        help="Most recent behaviors kept per history.",
        flag="--max-len",
        commands=TRAIN_AND_BENCH,
        low=1,
        expect="at least 1",
        default_text="the data set's --max-len",
    )
    # 0 would stop every run after its first epoch, whatever its validation AUC.
    patience: int = setting(
        2,
        help="Stop after this many epochs without a better validation AUC.",
        flag="--patience",
        commands=TRAIN_AND_BENCH,
        low=1,
        expect="at least 1",
    )
    # NumPy's generators take seeds >= 0, the run store keeps them as BIGINT. A bench seeds its runs itself.
    seed: int = setting(
        0,
        help="Seed of initialisation, shuffling and Gumbel noise.",
        flag="--seed",
        low=0,
        high=2**63 - 1,
        expect="in 0 .. 2^63-1",
    )
    # dmqn_core.devices checks it (check_device) once resolved; a run stores the resolved device.
    device: str = setting(
        AUTO,
        help="auto, cpu, cuda or cuda:N; auto is CUDA where torch sees a GPU, else the CPU, and the run records "
        "the device it resolved to.",
        flag="--device",
        commands=COMMANDS,
    )
    # Evaluation is always fp32. Checked with the device it needs (check_precision).
    precision: str = setting(
        "fp32",
        help="fp32, or bf16: the training forward under bfloat16 autocast (CUDA only); validation and test stay fp32.",
        flag="--precision",
        commands=COMMANDS,
    )
    # For dmqn_core.runs.inspection.
    inspect_users: int = setting(
        300,
        help="dmqn/dmqn-simple: users whose codeword assignments and attention are recorded at the end for "
        "`dmqn inspect` and `dmqn report`; 0 records nothing.",
        flag="--inspect-users",
        commands=TRAIN_AND_BENCH,
        low=0,
        expect="0 or more",
        bounds_on_flag=True,
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return cls(**_checked(cls, values, "train"))


def _checked(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """``values`` with each one checked against the type of ``cls``'s field of that name.

    TOML and Python callers hand over any type; a wrong one must fail here, with the setting's
    name, not as a TypeError inside a model (or pass: True is an int to Python, 1 to range()).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise DmqnError(f"unknown [{section}] setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    return {name: _typed(value, hints[name], f"[{section}] setting {name}") for name, value in values.items()}


def _typed(value: Any, hint: Any, what: str) -> Any:
    """``value`` as a field of type ``hint`` holds it (an int given for a float becomes a float)."""
    options = typing.get_args(hint)
    if type(None) in options:  # X | None
        if value is None:
            return None
        (hint,) = [option for option in options if option is not type(None)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif hint is int:
        # Every integer setting ends up in an int64 (NumPy, torch, the run store's BIGINT): a larger
        # one would overflow there, after the run exists.
        if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            return value
        expected = "an integer" if not isinstance(value, int) or isinstance(value, bool) else "a 64-bit integer"
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    elif hint is str:
        if isinstance(value, str):
            return value
        expected = "a string"
    elif typing.get_origin(hint) is tuple:  # mlp_hidden: tuple[int, ...]
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        expected = "a list of integers"
    else:
        raise TypeError(f"{what}: no type check for {hint!r}; add one to _typed")
    try:
        shown = json.dumps(value)  # as TOML spells most values: true, "text", [1, 2]
    except (TypeError, ValueError):
        shown = repr(value)
    raise DmqnError(f"{what} must be {expected}, got {shown}")


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
    except UnicodeDecodeError as exc:  # TOML is UTF-8 text; a binary file fails before the parser
        raise DmqnError(f"config file {path} is not valid TOML: not UTF-8 text (byte {exc.start})") from None
    unknown = sorted(set(document) - {"model", "train"})
    if unknown:
        raise DmqnError(f"config file {path}: unknown table(s) {', '.join(unknown)}; use [model] and [train]")
    return dict(document.get("model", {})), dict(document.get("train", {}))


def resolve_configs(
    data: PreparedSet, model_settings: dict[str, Any], train_settings: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """Defaults, overridden by the given settings; vocabulary sizes come from the data."""
    vocab_fields = {item.name for item in declared(ModelConfig) if item.setting.from_data}
    given = _checked(ModelConfig, model_settings, "model")
    if vocab_fields & set(given):
        raise DmqnError(f"{', '.join(sorted(vocab_fields & set(given)))} come(s) from the data set and cannot be set")
    try:
        model_config = ModelConfig(
            n_items=data.n_items + 1,
            n_categories=data.n_categories + 1,
            n_behavior_types=data.n_behavior_types + 1,
            **given,
        )
    except ValueError as exc:  # ModelConfig's own range checks, for library callers a ValueError
        raise DmqnError(f"invalid model setting: {exc}") from None
    train_config = TrainConfig.from_dict(train_settings)
    if train_config.max_len is None:
        train_config = dataclasses.replace(train_config, max_len=data.max_len)
    train_config = dataclasses.replace(train_config, device=resolve_device(train_config.device))
    _validate(train_config)
    return model_config, train_config


def _validate(cfg: TrainConfig) -> None:
    check_declared(cfg, DmqnError, dashed=True)
    check_device(cfg.device)  # resolved by the caller: auto is no device to train on
    check_precision(cfg.precision, cfg.device)


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


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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


# Called after each epoch with (epoch, validation metrics); True stops the training there.
EpochCallback = Callable[[int, dict[str, float]], bool]


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
    _validate(train_config)
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
    main = context.is_main
    run_id, model_name, dataset_name, model_config, train_config = (
        plan.run_id,
        plan.model_name,
        plan.dataset_name,
        plan.model_config,
        plan.train_config,
    )
    run_dir = workspace.run_dir(run_id)
    started = False  # rank 0 has recorded this (re)start of the run as running
    try:
        # Rank 0 checked that the checkpoint exists; under torchrun the run directory must be on a
        # file system every rank sees (as the prepared set must).
        checkpoint = load_checkpoint(run_dir / CHECKPOINT, RESUME_KEYS) if plan.resumed else None
        data = PreparedSet.open(plan.data_path)

        device = distributed.rank_device(context, train_config.device)
        torch.manual_seed(train_config.seed)  # the same initial weights on every rank
        model = build_model(model_name, model_config, item_popularity=data.item_popularity).to(device)
        # A registry entry may fix settings (dmqn-simple has no ICIM): store what the model really uses.
        model_config = getattr(model, "config", model_config)
        n_parameters = count_parameters(model)
        params = {
            "model": model_config.to_dict(),
            "train": asdict(train_config),
            "data": {
                "name": dataset_name,
                "path": str(data.path),
                "protocol": data.meta.get("protocol", {}),
                "fingerprint": data.fingerprint,
            },
            "versions": {"dmqn": dmqn_core.__version__, "torch": torch.__version__, "numpy": np.__version__},
            # How the latest (re)start trained: processes, and what carried their gradients.
            "distributed": {"world_size": context.world_size, "backend": distributed.gradient_backend(context, device)},
        }

        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = (
            torch.optim.Adam(trainable, lr=train_config.lr, weight_decay=train_config.weight_decay)
            if trainable
            else None
        )
        state = {
            "epoch": 0,
            "step": 0,
            "best_epoch": None,
            "best_valid_auc": None,
            "stale_epochs": 0,
            "train_seconds": 0.0,
            "history": [],
        }
        if checkpoint is not None:
            _restore(checkpoint, run_dir / CHECKPOINT, model, optimizer, state, device)
            progress.log(f"resuming run {run_id} after epoch {state['epoch']}")
        elif getattr(getattr(model, "config", None), "codebook_init", "random") == "kmeans":
            # Every rank reads the same unsharded batches with the same generator: the same codewords.
            model.quantizer.init_from_data(
                _sample_behaviors(model, data, train_config, device, epoch=0),
                _generator(train_config.seed, 0, device),
            )
            progress.log("codewords initialised by k-means of the first training behaviors")
        if main:
            if plan.new_run:
                store.create_run(
                    model=model_name,
                    dataset=dataset_name,
                    dataset_path=str(data.path),
                    params=params,
                    seed=train_config.seed,
                    n_parameters=n_parameters,
                    run_id=run_id,
                )
            else:
                store.delete_epochs_after(run_id, state["epoch"])
                store.update_run(run_id, status="running", error=None, params=params)
        started = True
        if main:
            write_vocabulary(run_dir, data)  # so that the run serves without its prepared set (dmqn_core.runs.run)

        forward = model
        if context.active and optimizer is not None:
            # Every parameter of every registered model gets a gradient at every step
            # (tests/test_model_contract.py: test_gradients_reach_every_parameter), so DDP need not
            # search the graph for unused ones. The only buffers (ETA's and SDIM's SimHash planes)
            # are fixed; DDP's default broadcast of rank 0's buffers before each step is cheap and
            # would keep running statistics in step if a model ever had some.
            forward = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                process_group=distributed.gradient_group(context, device),
                find_unused_parameters=False,
            )
            progress.log(
                f"training with {context.world_size} processes "
                f"({distributed.gradient_backend(context, device)}), "
                f"each on its part of every batch of {train_config.batch_size}"
            )

        loader = BatchLoader(
            data,
            "train",
            train_config.batch_size,
            train_config.max_len,
            shuffle=True,
            seed=train_config.seed,
            shard=(context.rank, context.world_size),
            popularity=model_config.match_features,
        )
        if optimizer is None:
            # Nothing to learn (the popularity scorer): one validation pass picks the "best epoch".
            metrics, _ = _evaluate(model, data, "valid", train_config, device, progress, context)
            if main:
                store.log_metrics(run_id, "valid", metrics, epoch=0)
                state.update(best_epoch=0, best_valid_auc=metrics["auc"])
                save_checkpoint({"model_state": model.state_dict(), "epoch": 0}, run_dir / BEST)
            state = distributed.broadcast(context, state)
        while optimizer is not None and state["epoch"] < train_config.epochs:
            epoch = state["epoch"] + 1
            loader.set_epoch(epoch)
            if hasattr(model, "set_epoch"):  # DMQN: the tau schedule (ModelConfig.tau_decay)
                model.set_epoch(epoch)
            if context.active:
                # Different Gumbel noise and dropout on every rank, a function of (seed, rank, epoch)
                # so that a resumed run continues exactly (one process restores its RNG state instead).
                torch.manual_seed(_rank_seed(train_config.seed, context.rank, epoch))
            train_loss, samples_per_s, seconds = _train_epoch(
                forward,
                loader,
                optimizer,
                device,
                progress,
                epoch,
                train_config.epochs,
                state,
                context,
                train_config.precision,
            )
            valid, counts = _evaluate(model, data, "valid", train_config, device, progress, context)
            if main:
                diagnostics = (
                    _quantizer_diagnostics(model, data, train_config, device, epoch)
                    if hasattr(model, "quantizer_diagnostics")
                    else None
                )
                improved = _record_epoch(
                    store,
                    run_id,
                    run_dir,
                    model,
                    model_name,
                    model_config,
                    optimizer,
                    train_config,
                    state,
                    epoch,
                    train_loss,
                    samples_per_s,
                    seconds,
                    valid,
                    counts,
                    diagnostics,
                )
                progress.log(
                    f"epoch {epoch}: train loss {train_loss:.4f}, valid AUC {valid['auc']:.4f}"
                    f"{' (best)' if improved else ''}, {samples_per_s:,.0f} samples/s"
                )
            if getattr(getattr(model, "config", None), "dead_codeword_reset", False):
                counts = distributed.broadcast(context, counts)
                _reset_dead_codewords(model, optimizer, data, train_config, device, epoch, counts, progress)
                if main:  # the checkpoint resumes from the reset codewords; best.pt keeps the evaluated ones
                    _save_resume_checkpoint(run_dir, model, model_name, model_config, optimizer, train_config, state)
            stop = main and on_epoch is not None and bool(on_epoch(epoch, valid))
            # Rank 0's bookkeeping decides for everyone: all ranks stop after the same epoch.
            state = distributed.broadcast(context, state)
            if distributed.broadcast(context, stop):
                progress.log(f"stopped after epoch {epoch} by the caller")
                break
            if state["stale_epochs"] >= train_config.patience:
                progress.log(f"early stop: no better validation AUC for {train_config.patience} epochs")
                break

        restore_weights(model, load_checkpoint(run_dir / BEST), run_dir / BEST)
        test, _ = _evaluate(model, data, "test", train_config, device, progress, context)
        if main:
            store.log_metrics(run_id, "test", test, epoch=state["best_epoch"])
            if has_codebooks(model_name) and train_config.inspect_users > 0:
                recorded = record_inspection(
                    store, run_id, model, data, train_config.max_len, train_config.inspect_users, train_config.seed
                )
                progress.log(f"recorded {recorded} users for `dmqn inspect` and `dmqn report`")
            store.finish_run(
                run_id,
                "finished",
                test_auc=test["auc"],
                test_gauc=test["gauc"],
                test_logloss=test["logloss"],
                best_epoch=state["best_epoch"],
                best_valid_auc=state["best_valid_auc"],
                train_seconds=state["train_seconds"],
                checkpoint=str(run_dir / BEST),
            )
        # The other ranks wait here for rank 0's records, so that all processes end together.
        test = distributed.broadcast(context, test)
    except KeyboardInterrupt:
        if main:
            _record_end(store, plan, run_dir, started, "interrupted", "interrupted by the user")
        raise
    except Exception as exc:
        if main:
            _record_end(store, plan, run_dir, started, "failed", f"{type(exc).__name__}: {exc}")
        if _out_of_memory(exc):  # batches too large for the machine: the user's to change, not a bug
            raise DmqnError(f"run {run_id} ran out of memory ({exception_summary(exc)})") from None
        raise
    return TrainResult(
        run_id=run_id,
        model=model_name,
        dataset=dataset_name,
        best_epoch=state["best_epoch"],
        best_valid_auc=state["best_valid_auc"],
        test=test,
        train_seconds=state["train_seconds"],
        n_parameters=n_parameters,
        history=state["history"],
        device=str(device),
        precision=train_config.precision,
    )


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (NumPy's MemoryError, torch's CPU allocator or CUDA)."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _restore(
    checkpoint: dict[str, Any],
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    device: torch.device,
) -> None:
    """Continue from a checkpoint: weights, optimiser moments, counters and the RNG (the GPU's too when
    the run trained on one and continues on one)."""
    restore_weights(model, checkpoint, path)
    try:
        if optimizer is not None and checkpoint["optimizer_state"]:
            optimizer.load_state_dict(checkpoint["optimizer_state"])
        state.update(checkpoint["train_state"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in checkpoint:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise DmqnError(f"checkpoint {path} is damaged or not this run's ({exception_summary(exc)})") from None


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


def _record_epoch(
    store: RunStore,
    run_id: str,
    run_dir: Path,
    model: torch.nn.Module,
    model_name: str,
    model_config: ModelConfig,
    optimizer: torch.optim.Optimizer,
    train_config: TrainConfig,
    state: dict[str, Any],
    epoch: int,
    train_loss: float,
    samples_per_s: float,
    seconds: float,
    valid: dict[str, float],
    counts: np.ndarray | None,
    diagnostics: QuantizerDiagnostics | None,
) -> bool:
    """Rank 0's end of an epoch: update ``state``, write best.pt, the checkpoint and the run store; True if improved."""
    state["train_seconds"] += seconds
    state["epoch"] = epoch
    improved = state["best_valid_auc"] is None or valid["auc"] > state["best_valid_auc"]
    if improved:
        state.update(best_epoch=epoch, best_valid_auc=valid["auc"], stale_epochs=0)
        save_checkpoint({"model_state": model.state_dict(), "epoch": epoch}, run_dir / BEST)
    else:
        state["stale_epochs"] += 1
    state["history"].append({"epoch": epoch, "train_loss": train_loss, "valid_auc": valid["auc"]})
    store.log_metrics(run_id, "train", {"loss": train_loss, "samples_per_s": samples_per_s}, epoch=epoch)
    store.log_metrics(run_id, "valid", valid, epoch=epoch)
    if counts is not None:
        usage = CodebookUsage.from_counts(np.rint(counts))
        store.log_codebook_usage(
            run_id,
            epoch,
            usage.counts.tolist(),
            list(zip(usage.counts.shape[1] - usage.dead, usage.dead, usage.perplexity)),
        )
    if diagnostics is not None:
        store.log_quantizer_stats(
            run_id,
            epoch,
            list(zip(diagnostics.assignment.agreement.tolist(), diagnostics.assignment.margin.tolist())),
            diagnostics.icim_norm_ratio.tolist(),
        )
    _save_resume_checkpoint(run_dir, model, model_name, model_config, optimizer, train_config, state)
    store.update_run(
        run_id,
        epochs_done=epoch,
        best_epoch=state["best_epoch"],
        best_valid_auc=state["best_valid_auc"],
        train_seconds=state["train_seconds"],
        checkpoint=str(run_dir / CHECKPOINT),
    )
    return improved


def _save_resume_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    model_name: str,
    model_config: ModelConfig,
    optimizer: torch.optim.Optimizer,
    train_config: TrainConfig,
    state: dict[str, Any],
) -> None:
    checkpoint = {
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "train_state": dict(state),
        "torch_rng": torch.get_rng_state(),
        "model_name": model_name,
        "model_config": model_config.to_dict(),
        "train_config": asdict(train_config),
    }
    device = next(model.parameters()).device
    if device.type == "cuda":
        # Dropout and DIEN's negative sampling draw on the GPU's generator; a CPU run's checkpoint stays as it was.
        checkpoint["cuda_rng"] = torch.cuda.get_rng_state(device)
    save_checkpoint(checkpoint, run_dir / CHECKPOINT)


def _generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """A generator of its own for the codebook init (epoch 0) and resets: the global stream stays untouched."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, epoch], spawn_key=(2,)).generate_state(1)[0]))
    return generator


@torch.no_grad()
def _sample_behaviors(
    model: torch.nn.Module, data: PreparedSet, train_config: TrainConfig, device: torch.device, epoch: int
) -> Tensor:
    """(M, D) embeddings of the real behaviors of the first training batches of ``epoch``'s order,
    at most CODEBOOK_SAMPLE_BATCHES batches and CODEBOOK_SAMPLE_BEHAVIORS behaviors (a bounded cost).

    A loader of its own, unsharded: every rank gets the same sample and the training loader's order is untouched.
    """
    loader = BatchLoader(
        data, "train", train_config.batch_size, train_config.max_len, shuffle=True, seed=train_config.seed
    )
    loader.set_epoch(epoch)
    parts, total = [], 0
    for batch in itertools.islice(loader, CODEBOOK_SAMPLE_BATCHES):
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


def _reset_dead_codewords(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: PreparedSet,
    train_config: TrainConfig,
    device: torch.device,
    epoch: int,
    counts: np.ndarray | None,
    progress: Progress,
) -> Tensor | None:
    """dead_codeword_reset, on every rank alike: codewords with no validation behavior move onto training behaviors.

    Returns the (N, W) bool mask of the codewords reset (None without validation counts).
    """
    if counts is None:
        return None
    quantizer = model.quantizer
    reset = quantizer.reset_dead(
        torch.as_tensor(np.rint(counts), device=device),
        _sample_behaviors(model, data, train_config, device, epoch),
        _generator(train_config.seed, epoch, device),
    )  # (N, W) bool
    # Adam's moments of a reset codeword belong to the codeword it was: zeroed, the row restarts like a
    # fresh parameter (Adam's step count is per tensor and stays). W_2 is shared by the codebook's
    # codewords and keeps its moments.
    moments = optimizer.state.get(quantizer.codebooks, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in moments:
            moments[key][reset] = 0.0
    progress.log(f"epoch {epoch}: reset {int(reset.sum())} dead codewords")
    return reset


def _rank_seed(seed: int, rank: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def _quantizer_diagnostics(
    model: torch.nn.Module, data: PreparedSet, train_config: TrainConfig, device: torch.device, epoch: int
) -> QuantizerDiagnostics | None:
    """Rank 0, after an epoch: DMQN.quantizer_diagnostics over the first DIAGNOSTIC_BATCHES validation batches
    (None when the validation split is empty).

    The training-path codewords are sampled at the epoch's tau with noise from a generator of their
    own, seeded by (seed, epoch): measuring draws nothing from the global generator, so a run trains
    exactly as it would without the measurement, and a resumed run measures the same.
    """
    model.eval()
    generator = torch.Generator(device=device)
    seed = np.random.SeedSequence([train_config.seed, epoch], spawn_key=(1,)).generate_state(1)[0]
    generator.manual_seed(int(seed))
    loader = BatchLoader(data, "valid", train_config.eval_batch_size, train_config.max_len)
    total = None
    for batch in itertools.islice(loader, DIAGNOSTIC_BATCHES):
        batch = batch.to(device)
        part = model.quantizer_diagnostics(
            batch.hist_item, batch.hist_category, batch.hist_behavior, batch.hist_mask, generator, batch.hist_timestamp
        )
        total = part if total is None else total + part
    return total


def _evaluate(
    model: torch.nn.Module,
    data: PreparedSet,
    split: str,
    train_config: TrainConfig,
    device: torch.device,
    progress: Progress,
    context: distributed.Context,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics of a split (and codeword counts for models with codebooks), on rank 0.

    Under torchrun every rank predicts its part of every evaluation batch; rank 0 gathers the
    logits, puts them back in one process's order and computes the metrics. The other ranks
    get an empty dict and None.
    """
    if not context.active:
        return evaluate_split(model, data, split, train_config.eval_batch_size, train_config.max_len, device, progress)
    loader = BatchLoader(
        data,
        split,
        train_config.eval_batch_size,
        train_config.max_len,
        shard=(context.rank, context.world_size),
        popularity=model.config.match_features,
    )
    out = predict(model, loader, device, progress, description=f"{split} ")
    parts = distributed.gather(
        context,
        (loader.sample_order(), out["users"], out["labels"], out["logits"], out["codeword_counts"], out["seconds"]),
    )
    if parts is None:
        return {}, None
    # Each sample's place in one process's order: the same metrics from the same logits.
    position = np.empty(loader.n_samples, dtype=np.int64)
    for begin, idx in zip(range(0, loader.n_samples, loader.batch_size), loader.batch_indices()):
        position[idx] = np.arange(begin, begin + len(idx))
    place = np.argsort(position[np.concatenate([p[0] for p in parts])], kind="stable")
    users, labels, logits = (np.concatenate([p[i] for p in parts])[place] for i in (1, 2, 3))
    metrics = ctr_metrics(users, labels, logits)
    metrics["samples_per_s"] = len(labels) / max(max(p[5] for p in parts), 1e-9)
    counts = [p[4] for p in parts if p[4] is not None]
    return metrics, (np.sum(counts, axis=0) if counts else None)


def _train_epoch(
    model: torch.nn.Module,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    progress: Progress,
    epoch: int,
    epochs: int,
    state: dict[str, Any],
    context: distributed.Context = distributed.SINGLE,
    precision: str = "fp32",
) -> tuple[float, float, float]:
    """One pass over the training split; returns mean loss, samples/s and seconds.

    ``model`` is the DDP wrapper under torchrun: its backward all-reduces (averages) the gradients.
    """
    module = model.module if isinstance(model, DistributedDataParallel) else model
    model.train()
    progress.start(f"epoch {epoch}/{epochs}", len(loader))
    total_loss, total_samples = 0.0, 0
    read_every = CUDA_LOSS_READ_STEPS if device.type == "cuda" and not context.active else 1
    unread: list[tuple[Tensor, int, int]] = []  # (loss, n, n_global) of the steps whose loss is not read yet
    started = time.perf_counter()

    def read_losses() -> None:
        nonlocal total_loss, total_samples
        # One transfer for the unread steps; float32 values as float() would read them one by one.
        values = torch.stack([loss for loss, _, _ in unread]).tolist()
        first_step = state["step"] - len(unread) + 1
        for i, (value, (_, n, n_global)) in enumerate(zip(values, unread)):
            batch_loss = value * n
            if context.active:
                # Every rank sees the whole batch's loss: the same progress and the same divergence check.
                (batch_loss,) = distributed.all_reduce_sum(context, [batch_loss if n else 0.0])
                n = n_global
            total_loss += batch_loss
            total_samples += n
            if not math.isfinite(batch_loss):
                raise DmqnError(
                    f"training diverged at step {first_step + i} (loss {batch_loss / n:.4g}); try a lower --lr"
                )
        elapsed = time.perf_counter() - started
        progress.advance(len(unread), loss=total_loss / total_samples, samples_per_s=total_samples / max(elapsed, 1e-9))
        unread.clear()

    for batch, n, n_global in loader.steps():
        batch = batch.to(device)
        with autocast(device, precision):
            logits = model(**batch.model_inputs())
            loss = F.binary_cross_entropy_with_logits(logits, batch.label)  # eq. 2
            auxiliary = getattr(module, "auxiliary_loss", None)
            objective = loss + auxiliary() if auxiliary is not None else loss
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
        state["step"] += 1
        unread.append((loss.detach(), n, n_global))
        if len(unread) == read_every:
            read_losses()
    if unread:
        read_losses()
    seconds = time.perf_counter() - started
    progress.stop()
    return total_loss / max(total_samples, 1), total_samples / max(seconds, 1e-9), seconds
