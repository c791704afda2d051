"""``dmqn bench``: every model under one budget, the paper's Tables 2 and 3 on any prepared set.

A bench is a name plus a budget (the resolved model and training settings, seed excluded).
Each (model, seed) pair of a bench is one ordinary run of the run store; the pair is recorded
in ``bench_runs`` before the run starts, so re-running the same command skips finished runs,
resumes interrupted ones from their last checkpoint and only trains what is missing. The
default name is derived from the data set and the budget, which is what makes "run the same
command again" resume. Models tuned by `dmqn tune` (``tuned``) bring their best settings into
the budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.models.registry import model_names
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runs.store import RunStore, new_run_id
from dmqn_core.training.bench_report import (
    AGAINST_COLUMNS,
    BOOTSTRAP_REPLICATES,
    BOOTSTRAP_SEED,
    TABLE2_COLUMNS,
    TABLE3_COLUMNS,
    TABLE3_MODELS,
    BenchReport,
    BenchRow,
    bench_row,
    compare_rows,
    describe_budget,
    format_mean_std,
    markdown_table,
    mean_std,
    table2_cells,
    table2_columns,
    table3_cells,
    write_tables,
)
from dmqn_core.training.train import resolve_configs, train
from dmqn_core.training.tune import TunedSettings, tuned_settings
from dmqn_core.workspace import Workspace, check_plain_name

# The rows and Tables 2 and 3 live in bench_report; their names stay importable from here.
__all__ = [
    "ALL_MODELS",
    "TABLE3_MODELS",
    "BOOTSTRAP_REPLICATES",
    "BOOTSTRAP_SEED",
    "resolve_models",
    "BenchRow",
    "BenchReport",
    "BenchStep",
    "budget_of",
    "default_bench_name",
    "machine_description",
    "run_bench",
    "compare_rows",
    "mean_std",
    "format_mean_std",
    "TABLE2_COLUMNS",
    "AGAINST_COLUMNS",
    "table2_columns",
    "TABLE3_COLUMNS",
    "table2_cells",
    "table3_cells",
    "markdown_table",
    "describe_budget",
    "write_tables",
]

# `--models all`, in the order of the paper's Table 2 (short sequences, retrieval, full sequence),
# with the history-free floor first and ETA (not in the paper's table) beside the other retrieval models.
ALL_MODELS = (
    "pop",
    "din-short",
    "dsin",
    "dien",
    "sim",
    "eta",
    "twin",
    "sdim",
    "din-middle",
    "twin-v2",
    "din-full",
    "dmqn-simple",
    "dmqn",
)


def resolve_models(text: str) -> list[str]:
    """'all' or a comma-separated list of registered models -> the list, duplicates removed."""
    known = model_names()
    if text.strip() == "all":
        return [m for m in ALL_MODELS if m in known] + [m for m in known if m not in ALL_MODELS]
    models = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in models if m not in known]
    if unknown:
        raise DmqnError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)} or 'all'")
    if not models:
        raise DmqnError("--models names no model")
    return models


@dataclass
class BenchStep:
    """What happens to one (model, seed) of a bench; passed to the on_step callback."""

    index: int
    total: int
    model: str
    seed: int
    action: str  # "train" | "resume" | "done" (finished earlier) | "failed"
    run_id: str
    message: str = ""


def budget_of(data: PreparedSet, model_settings: dict[str, Any], train_settings: dict[str, Any]) -> dict[str, Any]:
    """The resolved settings every model of the bench shares.

    The seed varies per run and inspect_users only sets what is recorded for the inspector, not
    what is trained, so both are left out (and a bench named before inspect_users existed resumes).
    The device is the resolved one (auto is no budget); the precision is kept only when it is not
    fp32, so that a bench named before --precision existed keeps its name and resumes.
    """
    if "seed" in train_settings:
        raise DmqnError("a bench sets the seed of each run itself; use --seeds")
    model_config, train_config = resolve_configs(data, model_settings, train_settings)
    model = model_config.to_dict()
    train_values = asdict(train_config)
    train_values.pop("seed")
    train_values.pop("inspect_users")
    if train_values["precision"] == "fp32":
        train_values.pop("precision")
    return {"model": model, "train": train_values}


def default_bench_name(dataset: str, data: PreparedSet, budget: dict[str, Any]) -> str:
    source = data.meta.get("source", {})
    fingerprint = json.dumps(
        {"budget": budget, "source": source.get("sha256"), "protocol": data.meta.get("protocol")}, sort_keys=True
    )
    return f"{dataset}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:8]}"


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {platform.system()}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def run_bench(
    workspace: Workspace,
    dataset: str,
    models: list[str],
    seeds: list[int],
    model_settings: dict[str, Any] | None = None,
    train_settings: dict[str, Any] | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    on_step: Callable[[BenchStep], None] | None = None,
    tuned: Sequence[str] = (),
    storage: str | None = None,
    against: str | None = None,
) -> BenchReport:
    """Train and evaluate every (model, seed) not finished yet, then write Tables 2 and 3.

    ``tuned`` names studies of `dmqn tune` (in ``storage``, by default the workspace's): the model of
    each trains with the settings its best trial searched, in place of the bench's own; everything
    else of the budget (epochs, batch size, max_len, ...) stays the same for every model.

    ``against`` (one of ``models``) adds to every other model's row its Δ test AUC and Δ GAUC against
    that model, with a paired bootstrap interval (compare_rows); it changes no run and is not part of
    the budget.
    """
    progress = progress or NullProgress()
    if not seeds:
        raise DmqnError("a bench needs at least one seed")
    if against is not None and against not in models:
        raise DmqnError(f"--against {against!r} is not one of the bench's models ({', '.join(models)})")
    model_settings, train_settings = dict(model_settings or {}), dict(train_settings or {})
    data = PreparedSet.open(workspace.dataset_path(dataset))
    dataset_name = data.meta.get("name") or Path(data.path).name
    budget, by_model = _plan(workspace, data, models, model_settings, train_settings, tuned, storage)
    # The name becomes the directory benches/NAME: a given one must not reach outside benches/.
    name = check_plain_name(default_bench_name(dataset_name, data, budget) if name is None else name, "bench name")
    store = RunStore(workspace.store_path)
    store.register_bench(name, dataset_name, budget)

    runs = _BenchRuns(workspace, store, name, dataset, progress, on_step or (lambda step: None))
    runs.train_missing(models, seeds, model_settings, train_settings, by_model)
    rows = [bench_row(store, model, [store.bench_run(name, model, seed) for seed in seeds]) for model in models]
    if against is not None:
        compare_rows(workspace, data, rows, against, budget["train"]["device"], progress)
    report = BenchReport(
        name=name,
        dataset=dataset_name,
        directory=workspace.root / "benches" / name,
        budget=budget,
        machine=machine_description(budget["train"]["device"]),
        rows=rows,
        trained=runs.trained,
        reused=runs.reused,
        failures=runs.failures,
        against=against,
    )
    write_tables(report, seeds)
    return report


def _plan(
    workspace: Workspace,
    data: PreparedSet,
    models: list[str],
    model_settings: dict[str, Any],
    train_settings: dict[str, Any],
    tuned: Sequence[str],
    storage: str | None,
) -> tuple[dict[str, Any], dict[str, TunedSettings]]:
    """The bench's budget and the tuned settings of each model of ``tuned``; every run they make is checked
    valid before any trains."""
    budget = budget_of(data, model_settings, train_settings)
    by_model = _tuned_models(workspace, data, models, tuned, storage)
    for settings in by_model.values():  # each tuned model's settings must make a valid run too
        resolve_configs(
            data, {**model_settings, **settings.model_settings}, {**train_settings, **settings.train_settings}
        )
    if by_model:
        # Part of the budget: the bench's default name changes with them, a named bench refuses others.
        budget["tuned"] = {
            model: {"study": t.study, "trial": t.trial, "model": t.model_settings, "train": t.train_settings}
            for model, t in by_model.items()
        }
    return budget, by_model


class _BenchRuns:
    """The (model, seed) runs of one bench, trained or resumed where not finished; counts what it did."""

    def __init__(
        self,
        workspace: Workspace,
        store: RunStore,
        name: str,
        dataset: str,
        progress: Progress,
        notify: Callable[[BenchStep], None],
    ) -> None:
        self.workspace = workspace
        self.store = store
        self.name = name
        self.dataset = dataset
        self.progress = progress
        self.notify = notify
        self.trained = 0
        self.reused = 0
        self.failures: list[str] = []

    def train_missing(
        self,
        models: list[str],
        seeds: list[int],
        model_settings: dict[str, Any],
        train_settings: dict[str, Any],
        by_model: dict[str, TunedSettings],
    ) -> None:
        total = len(models) * len(seeds)
        index = 0
        for seed in seeds:  # seed-major: an interrupted bench already has every model once
            for model in models:
                index += 1
                own = by_model.get(model)
                self.train_one(
                    index,
                    total,
                    model,
                    seed,
                    {**model_settings, **own.model_settings} if own else model_settings,
                    {**train_settings, **(own.train_settings if own else {}), "seed": seed},
                )

    def train_one(
        self,
        index: int,
        total: int,
        model: str,
        seed: int,
        model_settings: dict[str, Any],
        train_settings: dict[str, Any],
    ) -> None:
        """Train the run of ``model`` and ``seed`` (step ``index`` of ``total``), resume it, or skip it as
        finished."""
        run_id = self.store.bench_run(self.name, model, seed)
        record = self.store.get_run(run_id) if run_id and self.store.has_run(run_id) else None
        if record is not None and record.status == "finished":
            self.reused += 1
            self.notify(BenchStep(index, total, model, seed, "done", record.run_id))
            return
        try:
            if record is not None:
                self.notify(BenchStep(index, total, model, seed, "resume", record.run_id))
                train(self.workspace, resume=record.run_id, progress=self.progress)
            else:
                run_id = new_run_id()
                self.store.set_bench_run(self.name, model, seed, run_id)
                self.notify(BenchStep(index, total, model, seed, "train", run_id))
                train(
                    self.workspace,
                    self.dataset,
                    model,
                    model_settings,
                    train_settings,
                    progress=self.progress,
                    run_id=run_id,
                )
            self.trained += 1
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken model must not cost the rest of the bench
            message = f"{type(exc).__name__}: {exc}"
            self.failures.append(f"{model} seed {seed}: {message}")
            self.notify(BenchStep(index, total, model, seed, "failed", run_id or "", message))


def _tuned_models(
    workspace: Workspace, data: PreparedSet, models: list[str], studies: Sequence[str], storage: str | None
) -> dict[str, TunedSettings]:
    """The best settings of each study, by the model it tuned: one study per model, on this data set.

    A study of a model outside ``models`` is part of the budget but trains nothing here: that is what
    lets disjoint --models lists of one tuned bench run side by side under one --name, then one
    command with every model print the whole table. At least one study must tune a listed model.
    """
    by_model: dict[str, TunedSettings] = {}
    for study in dict.fromkeys(studies):
        settings = tuned_settings(workspace, study, storage)
        if settings.model in by_model:
            raise DmqnError(f"studies {by_model[settings.model].study!r} and {study!r} both tune {settings.model!r}")
        if settings.fingerprint != data.fingerprint:
            raise DmqnError(f"study {study!r} was tuned on another data set (fingerprint {settings.fingerprint})")
        by_model[settings.model] = settings
    if by_model and not set(by_model) & set(models):
        raise DmqnError(f"no study of --tuned tunes a model the bench trains ({', '.join(models)})")
    return by_model
