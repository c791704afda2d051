"""The ``runs`` table: one row per run (model, data set, status, parameters as JSON, summary metrics), and
the run directories whose lock tells a live run from a dead one.

A run recorded as running whose lock (RUN_LOCK in its directory) no process holds reads ``dead``
(RunRecord); the directory of a run killed before its row was written is removed here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dmqn_core.errors import DmqnError
from dmqn_core.runs.store.connection import StoreFile, utc_now
from dmqn_core.workspace import lock_is_held

RUN_COLUMNS = (
    "run_id",
    "model",
    "dataset",
    "dataset_path",
    "status",
    "created_at",
    "finished_at",
    "seed",
    "params",
    "n_parameters",
    "epochs_done",
    "best_epoch",
    "best_valid_auc",
    "test_auc",
    "test_gauc",
    "test_logloss",
    "train_seconds",
    "checkpoint",
    "error",
)
_UPDATABLE = set(RUN_COLUMNS) - {"run_id", "created_at"}

# The file in each run's directory that its training process holds locked (workspace.exclusive_lock).
RUN_LOCK = ".lock"
# A run lock that exclusive_lock created but has not written its pid into yet is that young; one still
# empty after this long was left by a process killed in that instant.
_UNWRITTEN_LOCK_SECONDS = 60.0


@dataclass
class RunRecord:
    """One row of ``runs``. ``status`` is as recorded, except that a run recorded as running whose
    lock no process holds (its process was killed with SIGKILL, or the machine went down) reads
    ``dead``: it can be resumed like an interrupted one."""

    run_id: str
    model: str
    dataset: str
    dataset_path: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    seed: int | None
    params: dict[str, Any]
    n_parameters: int | None
    epochs_done: int
    best_epoch: int | None
    best_valid_auc: float | None
    test_auc: float | None
    test_gauc: float | None
    test_logloss: float | None
    train_seconds: float
    checkpoint: str | None
    error: str | None


def new_run_id() -> str:
    """A sortable, human-typable id: UTC time plus four random hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


class RunTables(StoreFile):
    """The methods of RunStore that read and write ``runs`` and the run directories."""

    runs_dir: Path  # a directory per run, holding its lock (set by RunStore)

    def lock_path(self, run_id: str) -> Path:
        """The file a process training ``run_id`` holds locked."""
        return self.runs_dir / run_id / RUN_LOCK

    def remove_abandoned_run_dirs(self) -> None:
        """Remove the directories of new runs whose process was killed after taking the run's lock and
        before writing its row (SIGKILL in that second): nothing else would ever remove them.

        Only a directory that holds nothing but a lock file as exclusive_lock writes it (its holder's pid),
        which no process holds and whose run has no row, is removed. Each such lock is held while its run is
        looked up and the directory removed, so that no process can take it meanwhile; one that does so just
        before fails as a second trainer of the run would. Nothing is presumed dead that cannot be read.
        """
        if not self.runs_dir.is_dir():
            return
        with contextlib.ExitStack() as held:
            abandoned = [path for path in sorted(self.runs_dir.iterdir()) if _hold_abandoned_lock(path, held)]
            if not abandoned:
                return
            names = [path.name for path in abandoned]
            known = {row[0] for row in self._read("SELECT run_id FROM runs WHERE list_contains(?, run_id)", [names])}
            for path in abandoned:
                if path.name not in known:
                    with contextlib.suppress(OSError):  # something appeared in it meanwhile: leave it
                        (path / RUN_LOCK).unlink()
                        path.rmdir()

    def create_run(
        self,
        *,
        model: str,
        dataset: str,
        dataset_path: str,
        params: dict[str, Any],
        seed: int | None,
        n_parameters: int | None,
        run_id: str | None = None,
    ) -> str:
        run_id = run_id or new_run_id()
        self.remove_abandoned_run_dirs()
        self._write(
            [
                (
                    "INSERT INTO runs (run_id, model, dataset, dataset_path, status, created_at, seed, params, "
                    "n_parameters) "
                    "VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                    [
                        run_id,
                        model,
                        dataset,
                        dataset_path,
                        utc_now(),
                        seed,
                        json.dumps(params, sort_keys=True),
                        n_parameters,
                    ],
                )
            ]
        )
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not run columns: {sorted(unknown)}")
        if "params" in fields:
            fields["params"] = json.dumps(fields["params"], sort_keys=True)
        # Column names come from the fixed set above, never from user input.
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self._write([(f"UPDATE runs SET {assignments} WHERE run_id = ?", [*fields.values(), run_id])])

    def finish_run(self, run_id: str, status: str, **fields: Any) -> None:
        self.update_run(run_id, status=status, finished_at=utc_now(), **fields)

    def get_run(self, run_id: str) -> RunRecord:
        rows = self._read(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE run_id = ?", [run_id])
        if not rows:
            raise DmqnError(f"unknown run {run_id!r} in {self.path} (see `dmqn runs`)")
        return self._record(rows[0])

    def list_runs(self, dataset: str | None = None, model: str | None = None) -> list[RunRecord]:
        self.remove_abandoned_run_dirs()
        rows = self._read(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM runs "
            "WHERE (? IS NULL OR dataset = ?) AND (? IS NULL OR model = ?) ORDER BY created_at, run_id",
            [dataset, dataset, model, model],
        )
        return [self._record(row) for row in rows]

    def resolve_run_id(self, run_id: str | None, finished_only: bool = True) -> str:
        """The given run id, checked; or, when none is given, the latest finished run (the latest
        run of any status with ``finished_only=False``).

        A run still training, or one that failed or died, has no test metrics and maybe no weights:
        commands that default to "the latest run" want the latest one they can use.
        """
        if run_id:
            return self.get_run(run_id).run_id
        rows = self._read(
            "SELECT run_id FROM runs WHERE (NOT ? OR status = 'finished') "
            "ORDER BY created_at DESC, run_id DESC LIMIT 1",
            [finished_only],
        )
        if rows:
            return rows[0][0]
        if finished_only and self._read("SELECT 1 FROM runs LIMIT 1"):
            raise DmqnError(f"no finished run in {self.path} yet; name a run (see `dmqn runs`)")
        raise DmqnError(f"no runs in {self.path} yet (train one with `dmqn train`)")

    def _record(self, row: tuple) -> RunRecord:
        values = dict(zip(RUN_COLUMNS, row))
        values["params"] = json.loads(values["params"]) if values["params"] else {}
        if values["status"] == "running" and not lock_is_held(self.lock_path(values["run_id"])):
            values["status"] = "dead"
        return RunRecord(**values)

    def has_run(self, run_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM runs WHERE run_id = ?", [run_id]))


def _hold_abandoned_lock(run_dir: Path, held: contextlib.ExitStack) -> bool:
    """Whether ``run_dir`` is a directory that holds only a run lock whose holder is gone: a regular file
    with a pid (or nothing, when it is older than a live holder leaves it empty). Its lock is then taken
    until ``held`` closes."""
    lock = run_dir / RUN_LOCK
    try:
        if not stat.S_ISDIR(run_dir.lstat().st_mode) or os.listdir(run_dir) != [RUN_LOCK]:
            return False
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    held.callback(os.close, fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 20:
            return False
        # Read before locking: a trainer between creating its lock file and locking it must not find it locked.
        content = os.read(fd, 32)
        if not (content.isdigit() or not content and time.time() - info.st_mtime > _UNWRITTEN_LOCK_SECONDS):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its holder lives
    except OSError:
        return False
    return True


def iter_param_rows(params: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Flatten nested parameters into ("a.b", value) rows for display."""
    for key in sorted(params):
        value = params[key]
        if isinstance(value, dict):
            yield from iter_param_rows(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
