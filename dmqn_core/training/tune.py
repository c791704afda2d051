"""Hyper-parameter search with Optuna (`dmqn tune`): every trial is an ordinary training run.

A study lives in an Optuna database, by default ``WORKSPACE/tune/studies.db`` (SQLite); any
database Optuna supports can hold it instead. It records the data set (name and fingerprint) and
the model it was made for, and each trial records the run it trained (user attribute ``run_id``)
and that run's settings, so the run store needs no table of its own for studies. A study read
back must have them as `dmqn tune` writes them: a crafted or damaged database is one DmqnError.

Studies resume: a finished trial is in the database as soon as it ends, and ``trials`` counts the
finished trials of the whole study, so a study that was killed runs only the missing ones. Trials
of a process killed outright (SIGKILL, a power cut) stop sending their heartbeat and are marked
failed by the next trial that starts; failed trials do not count. Ctrl-C or SIGTERM ends the
call with the trial failed and its run interrupted (resumable), reported by the command alone.

Trials are pruned while they train: after every epoch ``train()`` hands the validation AUC to
the trial (its ``on_epoch`` hook), and Optuna's median pruner stops a trial whose AUC is below the
median of the earlier trials at that epoch. A pruned trial's run ends like an early-stopped one
(its best epoch so far is tested and the run finishes); the study records the trial as pruned.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError, exception_summary
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runs.store import new_run_id
from dmqn_core.training.search_spaces import space, split_settings, suggest
from dmqn_core.training.train import TrainResult, train
from dmqn_core.uris import quote_userinfo, redact_uri, scrub, uri_secrets
from dmqn_core.workspace import Workspace

# A trial's process writes a heartbeat this often (seconds); one silent for GRACE_PERIOD is dead.
HEARTBEAT_INTERVAL = 10
GRACE_PERIOD = 60
# The trials that count towards --trials: those that ended with a value.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_WORKERS = 64


@dataclass
class TrialRow:
    number: int
    state: str  # complete, pruned, failed, running, waiting
    value: float | None  # best validation AUC of its run
    run_id: str | None
    params: dict[str, Any]  # the searched settings its run used (weight_decay 0: none)


@dataclass
class TuneResult:
    study: str
    storage: str
    dataset: str
    model: str
    new_trials: int  # trials run by this call
    best_number: int | None
    best_value: float | None
    best_run_id: str | None
    # The settings the best run trained with, as `dmqn train` takes them.
    best_model_settings: dict[str, Any] = field(default_factory=dict)
    best_train_settings: dict[str, Any] = field(default_factory=dict)
    trials: list[TrialRow] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return sum(row.state in ("complete", "pruned") for row in self.trials)


def default_storage(workspace: Workspace) -> str:
    return f"sqlite:///{workspace.root / 'tune' / 'studies.db'}"


def _storage(workspace: Workspace, url: str | None) -> optuna.storages.RDBStorage:
    if url is None:
        (workspace.root / "tune").mkdir(parents=True, exist_ok=True)
        url = default_storage(workspace)
    # A database server's password may hold '@', '/', '?' or '#' unescaped; SQLAlchemy would take part of
    # it for the host. A SQLite URL names a file, whose path may hold an '@' that is no password's end.
    connect_url = url if url.split(":", 1)[0].lower().startswith("sqlite") else quote_userinfo(url)
    try:
        with warnings.catch_warnings():
            # The heartbeat is marked experimental since Optuna 2.9; it is what fails dead trials.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                connect_url,
                heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
                # Workers of one study write to one SQLite file: wait for its lock rather than fail at once.
                engine_kwargs={"connect_args": {"timeout": 60}} if connect_url.startswith("sqlite") else None,
            )
    except Exception as exc:  # SQLAlchemy's errors (a bad URL, a missing driver) have no common base here
        # Scrubbed before it is cut short, so that no part of a password survives the cut.
        detail = scrub(exception_summary(exc, limit=10_000), uri_secrets(url))[:200]
        raise DmqnError(f"cannot open the study storage {redact_uri(url)}: {detail}") from None


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
    if trials < 1:
        raise DmqnError(f"trials must be at least 1, got {trials}")
    if not 1 <= workers <= MAX_WORKERS:
        raise DmqnError(f"workers must be in 1 .. {MAX_WORKERS}, got {workers}")
    space(model_name, search_space)  # an unknown model or space fails before any study is touched
    if timeout is not None and timeout <= 0:
        raise DmqnError(f"timeout must be a positive number of seconds, got {timeout}")
    if not space(model_name, search_space):
        raise DmqnError(f"model {model_name!r} has no settings to tune")
    data = PreparedSet.open(workspace.dataset_path(dataset))
    dataset_name = data.meta.get("name") or Path(data.path).name
    study_name = study or f"{dataset_name}-{model_name}"
    fixed_model = dict(model_settings or {})
    # A trial is compared on its validation AUC; codeword inspection would only cost time.
    fixed_train = {"inspect_users": 0, "seed": seed, **(train_settings or {})}
    if epochs is not None:
        fixed_train["epochs"] = epochs

    rdb = _storage(workspace, storage)
    with _stored(rdb.url):
        the_study = optuna.create_study(
            storage=rdb, study_name=study_name, direction="maximize", load_if_exists=True, pruner=epoch_pruner()
        )
    attrs, recorded = _read_study(the_study, rdb.url)
    with _stored(rdb.url):
        _claim(the_study, attrs, dataset_name, data.fingerprint, model_name, search_space)
    finished = _count_finished(recorded)
    missing = trials - finished
    if max_new_trials is not None:
        missing = min(missing, max_new_trials)
    # Worker i runs shares[i] of the missing trials (the first ones one more), so that together they
    # run exactly the missing ones; each samples with its own seed.
    shares = [missing // workers + (i < missing % workers) for i in range(workers)]
    the_study.sampler = optuna.samplers.TPESampler(seed=seed + len(recorded))

    started = time.monotonic()
    ran = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal ran
        try:
            result, pruned = run_trial(trial)
        except BaseException:
            # Optuna logs a failed trial with its traceback before it raises the error again (Ctrl-C and
            # SIGTERM too); the command reports the error itself in one line ("interrupted" for a signal),
            # and the trial's run is already recorded as failed or interrupted. Restored after optimize().
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            raise
        ran += 1
        if pruned:
            # The run itself finished (its best epoch so far was tested); the study counts it as pruned.
            raise optuna.TrialPruned(f"valid AUC below the median of earlier trials at epoch {result.best_epoch}")
        return result.best_valid_auc

    def run_trial(trial: optuna.Trial) -> tuple[TrainResult, bool]:
        """Train the trial's run; its result and whether the pruner stopped it."""
        searched_model, searched_train = suggest(
            trial, model_name, fixed=set(fixed_model) | set(fixed_train), search_space=search_space
        )
        run_model = {**searched_model, **fixed_model}
        run_train = {**searched_train, **fixed_train}
        # Recorded before training, so that a trial whose process dies still names its run.
        run_id = new_run_id()
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("process", os.getpid())  # which worker ran it (--workers)
        trial.set_user_attr("model_settings", run_model)
        trial.set_user_attr("train_settings", run_train)
        progress.log(f"trial {trial.number}: run {run_id}, {_describe(trial.params)}")
        pruned = False

        def report(epoch: int, valid: dict[str, float]) -> bool:
            nonlocal pruned
            trial.report(valid["auc"], epoch)
            pruned = trial.should_prune()
            return pruned

        result = train(
            workspace,
            dataset,
            model_name,
            run_model,
            run_train,
            progress=_TrialLog(progress, trial.number),
            run_id=run_id,
            on_epoch=report,
        )
        return result, pruned

    def after_trial(done: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done_trials = done.get_trials(deepcopy=False)
        best, finished = _best(done_trials), _count_finished(done_trials)
        best_auc = f"{best.value:.4f}" if best else "-"
        progress.advance(1, best_auc=best_auc)
        progress.log(
            f"trial {trial.number} {_STATE_NAMES[trial.state]}: valid AUC "
            f"{'-' if trial.value is None else f'{trial.value:.4f}'}; {finished}/{trials} finished, "
            f"best {best_auc}, {time.monotonic() - started:.0f} s elapsed"
        )
        # With two processes on one study, the other's trials count too.
        if finished >= trials:
            done.stop()

    if missing > 0:
        progress.start(f"study {study_name}", total=trials)
        progress.advance(finished)  # the bar counts the study's finished trials
        verbosity = optuna.logging.get_verbosity()
        with _other_workers(
            workers,
            shares,
            dict(
                workspace=str(workspace.root),
                dataset=dataset,
                model_name=model_name,
                trials=trials,
                study=study_name,
                epochs=epochs,
                timeout=timeout,
                storage=storage,
                model_settings=model_settings,
                # The runs keep the study's seed; each worker's sampler gets its own (_start_workers).
                train_settings={"seed": seed, **(train_settings or {})},
                seed=seed,
                search_space=search_space,
            ),
        ) as helpers:
            try:
                if shares[0]:
                    # A failed trial (a DmqnError, Ctrl-C) is recorded as failed and ends the study's call:
                    # the same settings would fail again, and the user asked to stop.
                    the_study.optimize(objective, n_trials=shares[0], timeout=timeout, callbacks=[after_trial])
                _join_workers(helpers)
            finally:
                optuna.logging.set_verbosity(verbosity)
                progress.stop()
    else:
        progress.log(f"study {study_name} already has {trials} finished trial(s); nothing to run")
    return _summary(the_study, rdb.url, ran)


@contextmanager
def _other_workers(workers: int, shares: list[int], arguments: dict[str, Any]) -> Iterator[list[tuple[Any, Any]]]:
    """Processes 1 .. workers-1 of a study, each running its share of the trials: yields (process, its error
    pipe) of each; on leaving, the ones still running are stopped as SIGTERM stops a trial, and waited for.

    Spawned, not forked: a fork would copy torch's thread pools and this process's open store
    connections. Meanwhile each process, this one included, keeps 1/workers of torch's intra-op threads.
    """
    if workers == 1:
        yield []
        return
    import multiprocessing

    import torch

    previous = torch.get_num_threads()
    threads = max(1, previous // workers)
    torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")
    helpers: list[tuple[Any, Any]] = []
    try:
        for index in range(1, workers):
            if not shares[index]:
                continue
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker_main,
                args=({**arguments, "seed": arguments["seed"] + 7919 * index}, shares[index], threads, send),
                name=f"dmqn-tune-worker-{index}",
            )
            process.start()
            send.close()
            helpers.append((process, receive))
        yield helpers
    finally:
        for process, _ in helpers:
            if process.is_alive():
                process.terminate()
        for process, receive in helpers:
            process.join()
            receive.close()
        torch.set_num_threads(previous)


def _worker_main(arguments: dict[str, Any], share: int, threads: int, errors: Any) -> None:
    """Entry of a worker process: ``share`` trials of the study, its first error sent back in one line."""
    import signal

    import torch

    # SIGTERM (the parent stopping, a scheduler's limit) ends the trial as Ctrl-C would: its run is
    # marked interrupted and the trial failed, never left running.
    signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        tune(**{**arguments, "workspace": Workspace(arguments["workspace"])}, max_new_trials=share)
    except KeyboardInterrupt:
        errors.send("interrupted")
    except DmqnError as exc:
        errors.send(str(exc))
    finally:
        errors.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _join_workers(helpers: list[tuple[Any, Any]]) -> None:
    """Wait for the other workers; the first one's error as a DmqnError."""
    problems = []
    for process, receive in helpers:
        process.join()
        try:
            message = receive.recv() if receive.poll() else None
        except EOFError:  # closed without a message: the worker ran its share
            message = None
        if message is not None or process.exitcode:
            problems.append(f"{process.name}: {message or f'exited with code {process.exitcode}'}")
    if problems:
        raise DmqnError(f"{len(problems)} worker(s) of the study failed; first: {problems[0]}")


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


def show_study(workspace: Workspace, study: str, storage: str | None = None) -> TuneResult:
    """The summary of an existing study (best settings, every trial)."""
    the_study, url = _load(workspace, study, storage)
    return _summary(the_study, url, 0)


@dataclass
class TunedSettings:
    """The settings the best trial of a study searched, for training its model again (`dmqn bench --tuned`)."""

    study: str
    model: str
    fingerprint: str  # of the data set the study tuned on
    trial: int
    model_settings: dict[str, Any]
    train_settings: dict[str, Any]


def tuned_settings(workspace: Workspace, study: str, storage: str | None = None) -> TunedSettings:
    """The best trial's searched settings of ``study`` (the settings it fixed are left out)."""
    the_study, url = _load(workspace, study, storage)
    attrs, trials = _read_study(the_study, url)
    best = _best(trials)
    if best is None:
        raise DmqnError(f"study {study!r} has no finished trial yet")
    missing = [key for key in ("model", "fingerprint") if key not in attrs] + [
        f"trial {best.number}'s {key}" for key in ("model_settings", "train_settings") if key not in best.user_attrs
    ]
    if missing:
        raise _not_dmqn_study(the_study, url, f"it records no {', '.join(missing)}")
    model_name = attrs["model"]
    searched = _searched(best)
    unknown = set(searched) - {param.name for param in space(model_name, "full")}
    if unknown:
        raise _not_dmqn_study(
            the_study, url, f"trial {best.number} searched {', '.join(sorted(unknown))}, not settings of {model_name}"
        )
    model_settings, train_settings = split_settings(model_name, searched)
    return TunedSettings(study, model_name, attrs["fingerprint"], best.number, model_settings, train_settings)


def _load(workspace: Workspace, study: str, storage: str | None) -> tuple[optuna.Study, str]:
    """The study and the URL of its storage."""
    if storage is None and not (workspace.root / "tune" / "studies.db").exists():
        raise DmqnError(f"no study {study!r}: this workspace has no studies yet (see `dmqn tune`)")
    rdb = _storage(workspace, storage)
    with _stored(rdb.url):
        try:
            return optuna.load_study(study_name=study, storage=rdb), rdb.url
        except KeyError:
            known = optuna.get_all_study_names(rdb)
    raise DmqnError(f"no study {study!r} in {redact_uri(rdb.url)}; known: {', '.join(known) or 'none'}")


@contextmanager
def _stored(url: str) -> Iterator[None]:
    """Errors of the storage while a study is read or written become one line: a database that Optuna
    did not write as it does (a table of its name with other columns, a value that is not JSON, an unknown
    trial state) fails in Optuna or SQLAlchemy with whatever the broken part raises."""
    import sqlalchemy.exc  # loaded by the storage already; importing optuna does not load it

    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, LookupError, ValueError) as exc:
        # Scrubbed before it is cut short, so that no part of a password survives the cut.
        detail = scrub(exception_summary(exc, limit=10_000), uri_secrets(url))[:200]
        raise DmqnError(f"the study storage {redact_uri(url)} is damaged or not Optuna's ({detail})") from None


def _read_study(study: optuna.Study, url: str) -> tuple[dict[str, Any], list[FrozenTrial]]:
    """The study's user attributes and trials, read once; a DmqnError unless they have the types
    `dmqn tune` records (a crafted study must not fail later with a KeyError or a TypeError)."""
    with _stored(url):
        attrs = study.user_attrs
        trials = study.get_trials(deepcopy=False)
        directions = study.directions
    if directions != [StudyDirection.MAXIMIZE]:
        raise _not_dmqn_study(study, url, "it does not maximise one value")
    for key in ("dataset", "fingerprint", "model", "space"):
        if not isinstance(attrs.get(key, ""), str):
            raise _not_dmqn_study(study, url, f"its {key} is not a text")
    for trial in trials:
        if not isinstance(trial.user_attrs.get("run_id", ""), str):
            raise _not_dmqn_study(study, url, f"trial {trial.number}'s run_id is not a text")
        for key in ("model_settings", "train_settings"):
            settings = trial.user_attrs.get(key, {})
            if not isinstance(settings, dict) or not all(isinstance(name, str) for name in settings):
                raise _not_dmqn_study(study, url, f"trial {trial.number}'s {key} is not a table of settings")
    return attrs, trials


def _not_dmqn_study(study: optuna.Study, url: str, why: str) -> DmqnError:
    return DmqnError(f"study {study.study_name!r} in {redact_uri(url)} was not made by `dmqn tune`: {why}")


def _claim(
    study: optuna.Study, attrs: dict[str, Any], dataset: str, fingerprint: str, model_name: str, search_space: str
) -> None:
    """Record what a new study is for; refuse an existing study made for something else."""
    wanted = {"dataset": dataset, "fingerprint": fingerprint, "model": model_name, "space": search_space}
    if not attrs:
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        return
    if attrs.get("model") != model_name:
        raise DmqnError(f"study {study.study_name!r} tunes model {attrs.get('model')!r}, not {model_name!r}")
    if attrs.get("fingerprint") != fingerprint:
        raise DmqnError(
            f"study {study.study_name!r} was made for data set {attrs.get('dataset')!r} "
            f"(fingerprint {attrs.get('fingerprint')}), not {dataset!r} (fingerprint {fingerprint}); "
            "name another study with --study"
        )
    # Studies made before search spaces had names searched what is now "full".
    if attrs.get("space", "full") != search_space:
        raise DmqnError(
            f"study {study.study_name!r} searches the {attrs.get('space', 'full')!r} space, not {search_space!r}; "
            "name another study with --study"
        )


def _count_finished(trials: Sequence[FrozenTrial]) -> int:
    return sum(trial.state in FINISHED for trial in trials)


def _best(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: t.value) if complete else None


_STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def _summary(study: optuna.Study, storage_url: str, ran: int) -> TuneResult:
    attrs, trials = _read_study(study, storage_url)
    best = _best(trials)
    return TuneResult(
        study=study.study_name,
        storage=redact_uri(storage_url),  # results are shown: never a password
        dataset=attrs.get("dataset", ""),
        model=attrs.get("model", ""),
        new_trials=ran,
        best_number=best.number if best else None,
        best_value=best.value if best else None,
        best_run_id=best.user_attrs.get("run_id") if best else None,
        best_model_settings=dict(best.user_attrs.get("model_settings", {})) if best else {},
        best_train_settings=dict(best.user_attrs.get("train_settings", {})) if best else {},
        trials=[
            TrialRow(t.number, _STATE_NAMES[t.state], t.value, t.user_attrs.get("run_id"), _searched(t)) for t in trials
        ],
    )


def _searched(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The searched settings a trial's run used, by setting name: weight_decay 0 instead of Optuna's
    use_weight_decay False, in the order of the model's search space."""
    used = {**trial.user_attrs.get("model_settings", {}), **trial.user_attrs.get("train_settings", {})}
    searched = {}
    for name, value in trial.params.items():
        if name.startswith("use_") and not value:
            searched[name[len("use_") :]] = 0.0
        elif name in used:
            searched[name] = used[name]
    return searched


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}" for name, value in params.items()
    )
