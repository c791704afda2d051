"""`dmqn tune`'s search: the missing trials of a study, each an ordinary training run, in this process and
its workers (the package docstring says how studies resume and trials are pruned)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runs.store import new_run_id
from dmqn_core.training.search_spaces import space, suggest
from dmqn_core.training.train import TrainResult, train
from dmqn_core.training.tune.study import (
    STATE_NAMES,
    TuneResult,
    best_trial,
    claim,
    count_finished,
    open_storage,
    read_study,
    stored,
    summary,
)
from dmqn_core.training.tune.workers import join_workers, other_workers
from dmqn_core.workspace import Workspace

MAX_WORKERS = 64


def tune(
    workspace: Workspace,
    dataset: str,
    model_name: str,
    trials: int,
    study: str | None = None,
    epochs: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    progress: Progress | None = None,
    model_settings: dict[str, Any] | None = None,
    train_settings: dict[str, Any] | None = None,
    seed: int = 0,
    search_space: str = "default",
    workers: int = 1,
    max_new_trials: int | None = None,
) -> TuneResult:
    """Run the study until it has ``trials`` finished trials (or ``timeout`` seconds have passed:
    no trial starts after that, the running one ends); returns the study's summary.

    ``model_settings`` and ``train_settings`` are fixed for every trial and left out of the search.
    ``seed`` seeds the sampler (each call with the number of trials already in the study added, so
    that a resumed study does not draw its first trials again) and every run. ``search_space``:
    "default" (the shared settings plus at most three of the model's own, as comparisons use) or
    "full"; a study keeps the space it was made with.

    ``workers`` > 1 runs that many processes on the study, this one included, each with its share
    of the missing trials and of the CPU threads (torch's intra-op threads divided among them).
    ``max_new_trials`` caps the trials this call runs (a worker's share).
    """
    progress = progress or NullProgress()
    _check_arguments(model_name, trials, workers, timeout, search_space)
    data = PreparedSet.open(workspace.dataset_path(dataset))
    dataset_name = data.meta.get("name") or Path(data.path).name
    study_name = study or f"{dataset_name}-{model_name}"
    fixed_model = dict(model_settings or {})
    # A trial is compared on its validation AUC; codeword inspection would only cost time.
    fixed_train = {"inspect_users": 0, "seed": seed, **(train_settings or {})}
    if epochs is not None:
        fixed_train["epochs"] = epochs

    the_study, url, recorded = _open_study(
        workspace, storage, study_name, dataset_name, data.fingerprint, model_name, search_space
    )
    finished = count_finished(recorded)
    missing = trials - finished
    if max_new_trials is not None:
        missing = min(missing, max_new_trials)
    # Worker i runs shares[i] of the missing trials (the first ones one more), so that together they
    # run exactly the missing ones; each samples with its own seed.
    shares = [missing // workers + (i < missing % workers) for i in range(workers)]
    the_study.sampler = optuna.samplers.TPESampler(seed=seed + len(recorded))
    if missing <= 0:
        progress.log(f"study {study_name} already has {trials} finished trial(s); nothing to run")
        return summary(the_study, url, 0)

    loop = _TrialLoop(workspace, dataset, model_name, search_space, fixed_model, fixed_train, trials, progress)
    worker_arguments = dict(
        workspace=str(workspace.root),
        dataset=dataset,
        model_name=model_name,
        trials=trials,
        study=study_name,
        epochs=epochs,
        timeout=timeout,
        storage=storage,
        model_settings=model_settings,
        # The runs keep the study's seed; each worker's sampler gets its own (other_workers).
        train_settings={"seed": seed, **(train_settings or {})},
        seed=seed,
        search_space=search_space,
    )
    progress.start(f"study {study_name}", total=trials)
    progress.advance(finished)  # the bar counts the study's finished trials
    _run_trials(the_study, loop, shares, worker_arguments, timeout, progress)
    return summary(the_study, url, loop.ran)


def _check_arguments(model_name: str, trials: int, workers: int, timeout: float | None, search_space: str) -> None:
    if trials < 1:
        raise DmqnError(f"trials must be at least 1, got {trials}")
    if not 1 <= workers <= MAX_WORKERS:
        raise DmqnError(f"workers must be in 1 .. {MAX_WORKERS}, got {workers}")
    space(model_name, search_space)  # an unknown model or space fails before any study is touched
    if timeout is not None and timeout <= 0:
        raise DmqnError(f"timeout must be a positive number of seconds, got {timeout}")
    if not space(model_name, search_space):
        raise DmqnError(f"model {model_name!r} has no settings to tune")


def _open_study(
    workspace: Workspace,
    storage: str | None,
    study_name: str,
    dataset_name: str,
    fingerprint: str,
    model_name: str,
    search_space: str,
) -> tuple[optuna.Study, str, list[FrozenTrial]]:
    """The study (created if new, claimed for this data set, model and space), its storage's URL and its
    trials so far."""
    rdb = open_storage(workspace, storage)
    with stored(rdb.url):
        the_study = optuna.create_study(
            storage=rdb, study_name=study_name, direction="maximize", load_if_exists=True, pruner=epoch_pruner()
        )
    attrs, recorded = read_study(the_study, rdb.url)
    with stored(rdb.url):
        claim(the_study, attrs, dataset_name, fingerprint, model_name, search_space)
    return the_study, rdb.url, recorded


def _run_trials(
    the_study: optuna.Study,
    loop: _TrialLoop,
    shares: list[int],
    worker_arguments: dict[str, Any],
    timeout: float | None,
    progress: Progress,
) -> None:
    """This process's share of the trials, beside the other workers' (started here, joined here)."""
    verbosity = optuna.logging.get_verbosity()
    with other_workers(len(shares), shares, worker_arguments) as helpers:
        try:
            if shares[0]:
                # A failed trial (a DmqnError, Ctrl-C) is recorded as failed and ends the study's call:
                # the same settings would fail again, and the user asked to stop.
                the_study.optimize(loop.objective, n_trials=shares[0], timeout=timeout, callbacks=[loop.after_trial])
            join_workers(helpers)
        finally:
            optuna.logging.set_verbosity(verbosity)
            progress.stop()


class _TrialLoop:
    """The trials of this process: each trains one run with the settings the sampler suggests (and the fixed
    ones), reports its validation AUC after every epoch, and ends the study once it has enough trials."""

    def __init__(
        self,
        workspace: Workspace,
        dataset: str,
        model_name: str,
        search_space: str,
        fixed_model: dict[str, Any],
        fixed_train: dict[str, Any],
        trials: int,
        progress: Progress,
    ) -> None:
        self.workspace = workspace
        self.dataset = dataset
        self.model_name = model_name
        self.search_space = search_space
        self.fixed_model = fixed_model
        self.fixed_train = fixed_train
        self.trials = trials
        self.progress = progress
        self.started = time.monotonic()
        self.ran = 0  # trials of this process that ended with a value

    def objective(self, trial: optuna.Trial) -> float:
        try:
            result, pruned = self.run_trial(trial)
        except BaseException:
            # Optuna logs a failed trial with its traceback before it raises the error again (Ctrl-C and
            # SIGTERM too); the command reports the error itself in one line ("interrupted" for a signal),
            # and the trial's run is already recorded as failed or interrupted. Restored after optimize().
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            raise
        self.ran += 1
        if pruned:
            # The run itself finished (its best epoch so far was tested); the study counts it as pruned.
            raise optuna.TrialPruned(f"valid AUC below the median of earlier trials at epoch {result.best_epoch}")
        # The first validation always sets it; were it missing, NaN fails the trial as None would (Optuna).
        return result.best_valid_auc if result.best_valid_auc is not None else float("nan")

    def run_trial(self, trial: optuna.Trial) -> tuple[TrainResult, bool]:
        """Train the trial's run; its result and whether the pruner stopped it."""
        searched_model, searched_train = suggest(
            trial,
            self.model_name,
            fixed=set(self.fixed_model) | set(self.fixed_train),
            search_space=self.search_space,
        )
        run_model = {**searched_model, **self.fixed_model}
        run_train = {**searched_train, **self.fixed_train}
        # Recorded before training, so that a trial whose process dies still names its run.
        run_id = new_run_id()
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("process", os.getpid())  # which worker ran it (--workers)
        trial.set_user_attr("model_settings", run_model)
        trial.set_user_attr("train_settings", run_train)
        self.progress.log(f"trial {trial.number}: run {run_id}, {_describe(trial.params)}")
        pruned = False

        def report(epoch: int, valid: dict[str, float]) -> bool:
            nonlocal pruned
            trial.report(valid["auc"], epoch)
            pruned = trial.should_prune()
            return pruned

        result = train(
            self.workspace,
            self.dataset,
            self.model_name,
            run_model,
            run_train,
            progress=_TrialLog(self.progress, trial.number),
            run_id=run_id,
            on_epoch=report,
        )
        return result, pruned

    def after_trial(self, done: optuna.Study, trial: FrozenTrial) -> None:
        done_trials = done.get_trials(deepcopy=False)
        best, finished = best_trial(done_trials), count_finished(done_trials)
        best_auc = f"{best.value:.4f}" if best else "-"
        self.progress.advance(1, best_auc=best_auc)
        self.progress.log(
            f"trial {trial.number} {STATE_NAMES[trial.state]}: valid AUC "
            f"{'-' if trial.value is None else f'{trial.value:.4f}'}; {finished}/{self.trials} finished, "
            f"best {best_auc}, {time.monotonic() - self.started:.0f} s elapsed"
        )
        # With two processes on one study, the other's trials count too.
        if finished >= self.trials:
            done.stop()


class _TrialLog(NullProgress):
    """Passes a trial's epoch lines on, prefixed with its number; its bars would replace the study's."""

    def __init__(self, progress: Progress, number: int) -> None:
        self._progress = progress
        self._number = number

    def log(self, message: str) -> None:
        self._progress.log(f"trial {self._number}: {message}")


def epoch_pruner() -> optuna.pruners.MedianPruner:
    """A trial stops at an epoch where its validation AUC is below the median of the earlier trials at that
    epoch; the first two trials always run to their end, and no trial is judged on its first epoch.

    Trials report epochs 1, 2, ... as Optuna's steps, and the pruner judges a step >= n_warmup_steps:
    2 leaves epoch 1 alone (1 would not).
    """
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}" for name, value in params.items()
    )
