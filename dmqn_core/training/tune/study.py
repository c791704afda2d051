"""Where a study lives and what it records: its storage, the checks on a study read back, its summary."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from dmqn_core.errors import DmqnError, exception_summary
from dmqn_core.training.search_spaces import space, split_settings
from dmqn_core.uris import quote_userinfo, redact_uri, scrub, uri_secrets
from dmqn_core.workspace import Workspace

# A trial's process writes a heartbeat this often (seconds); one silent for GRACE_PERIOD is dead.
HEARTBEAT_INTERVAL = 10
GRACE_PERIOD = 60
# The trials that count towards --trials: those that ended with a value.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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


def open_storage(workspace: Workspace, url: str | None) -> optuna.storages.RDBStorage:
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


def show_study(workspace: Workspace, study: str, storage: str | None = None) -> TuneResult:
    """The summary of an existing study (best settings, every trial)."""
    the_study, url = _load(workspace, study, storage)
    return summary(the_study, url, 0)


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
    attrs, trials = read_study(the_study, url)
    best = best_trial(trials)
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
    rdb = open_storage(workspace, storage)
    with stored(rdb.url):
        try:
            return optuna.load_study(study_name=study, storage=rdb), rdb.url
        except KeyError:
            known = optuna.get_all_study_names(rdb)
    raise DmqnError(f"no study {study!r} in {redact_uri(rdb.url)}; known: {', '.join(known) or 'none'}")


@contextmanager
def stored(url: str) -> Iterator[None]:
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


def read_study(study: optuna.Study, url: str) -> tuple[dict[str, Any], list[FrozenTrial]]:
    """The study's user attributes and trials, read once; a DmqnError unless they have the types
    `dmqn tune` records (a crafted study must not fail later with a KeyError or a TypeError)."""
    with stored(url):
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


def claim(
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


def count_finished(trials: Sequence[FrozenTrial]) -> int:
    return sum(trial.state in FINISHED for trial in trials)


def best_trial(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    # A complete trial of a one-objective study has a value; FrozenTrial types it optional for the others.
    return max(complete, key=lambda t: cast(float, t.value)) if complete else None


STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def summary(study: optuna.Study, storage_url: str, ran: int) -> TuneResult:
    attrs, trials = read_study(study, storage_url)
    best = best_trial(trials)
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
            TrialRow(t.number, STATE_NAMES[t.state], t.value, t.user_attrs.get("run_id"), _searched(t)) for t in trials
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
