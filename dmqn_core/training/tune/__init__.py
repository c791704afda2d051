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

The package: ``search`` runs the trials (``tune``), ``workers`` the other processes of a study,
``study`` where a study lives and how it is read back (``show_study``, ``tuned_settings``).
"""

from dmqn_core.training.tune.search import MAX_WORKERS, epoch_pruner, tune
from dmqn_core.training.tune.study import (
    FINISHED,
    GRACE_PERIOD,
    HEARTBEAT_INTERVAL,
    TrialRow,
    TunedSettings,
    TuneResult,
    default_storage,
    show_study,
    tuned_settings,
)

__all__ = [
    "FINISHED",
    "GRACE_PERIOD",
    "HEARTBEAT_INTERVAL",
    "MAX_WORKERS",
    "TrialRow",
    "TuneResult",
    "TunedSettings",
    "default_storage",
    "epoch_pruner",
    "show_study",
    "tune",
    "tuned_settings",
]
