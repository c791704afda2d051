"""The run store: every run's parameters, metrics, codebook statistics and inspection sample in one DuckDB file.

The schema lives in this module only. Writers open the file, write one batch in a
transaction and close it again, so that a reader (``dmqn runs``, ``dmqn inspect``) can open
it read-only between writes of a training process; all SQL takes parameters. A file may be handed
over: it is opened with DuckDB's external access off (no statement can read or write another file) and
used only while its schema is this module's (RunStore._check_schema); anything else is one DmqnError.

Tables
------
``runs``            one row per run: model, data set, status, parameters (JSON), summary metrics.
``metrics``         (run_id, epoch, split, name, value): the history of every metric, per epoch;
                    epoch is NULL for evaluations made after training (``dmqn eval``).
``codebook_usage``  (run_id, epoch, codebook, used, dead, perplexity): utilisation of each
                    DMQN codebook on the validation histories after each epoch.
``codeword_counts`` (run_id, epoch, codebook, codeword, count): how many validation behaviors
                    each codeword received after each epoch (N·W rows per epoch).
``quantizer_stats`` (run_id, epoch, codebook, agreement, margin): DMQN's MCQM after each epoch, on the
                    real behaviors of a fixed validation sample: the share whose training-path codeword
                    (sampled as the run's options sample it) is the inference-path argmax, and the mean
                    gap between the best and second-best codeword score.
``icim_stats``      (run_id, epoch, layer, norm_ratio): |output - input| / |input| of each ICIM layer over
                    the non-empty clusters of the same sample (none for dmqn-simple).
``benches``         one row per ``dmqn bench``: its name, data set and settings (JSON).
``bench_runs``      (bench, model, seed, run_id): the run that trains each model and seed of a bench;
                    written before the run starts, so an interrupted bench finds it again.

Recorded at the end of a dmqn / dmqn-simple training, with the best checkpoint, for ``dmqn inspect``
and ``dmqn report`` (see dmqn_core.runs.inspection and docs/run-store.md). A sample of at most
``--inspect-users`` users with test samples (default 300) is recorded; every id is a raw id of the log.

``inspect_users``      (run_id, user_id, history_length, candidates): one row per sampled user; L behaviors
                       in the history the model encoded for the user's test samples, C test samples.
``inspect_behaviors``  (run_id, user_id, position, codebook, codeword, timestamp, item, category, behavior):
                       one row per behavior of that history and codebook (L·N rows per user), position 0
                       = oldest; codeword is the inference-path (argmax) assignment. Cluster sizes are
                       ``count(*) GROUP BY codebook, codeword``.
``inspect_candidates`` (run_id, user_id, candidate, item, category, label, score): the user's test samples
                       (C rows), score = predicted click probability.
``inspect_attention``  (run_id, user_id, candidate, codebook, codeword, weight): CTAM attention of each
                       candidate on each NON-EMPTY cluster (absent rows are empty clusters, weight 0);
                       the weights of a (candidate, codebook) sum to 1.
``codebook_vectors``   (run_id, codebook, codeword, vector FLOAT[D]): the codewords folded into the
                       behavior-embedding space (c W_2^T: a behavior e goes to argmax_w e · vector).
``item_vectors``       (run_id, item, category, popularity, vector FLOAT[D]): candidate embeddings (item +
                       category) of the most frequent items, at most 5,000 rows
                       (dmqn_core.runs.inspection.MAX_ITEM_VECTORS).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from dmqn_core.errors import DmqnError
from dmqn_core.workspace import lock_is_held

# 2: benches, bench_runs; 3: inspect_*, codebook_vectors, item_vectors; 4: quantizer_stats, icim_stats
SCHEMA_VERSION = 4

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS schema_info (version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id          VARCHAR PRIMARY KEY,
        model           VARCHAR NOT NULL,
        dataset         VARCHAR NOT NULL,
        dataset_path    VARCHAR NOT NULL,
        status          VARCHAR NOT NULL,      -- running | finished | failed | interrupted (see RunRecord)
        created_at      TIMESTAMPTZ NOT NULL,
        finished_at     TIMESTAMPTZ,
        seed            BIGINT,
        params          JSON NOT NULL,         -- every value the run actually used
        n_parameters    BIGINT,
        epochs_done     INTEGER DEFAULT 0,
        best_epoch      INTEGER,
        best_valid_auc  DOUBLE,
        test_auc        DOUBLE,
        test_gauc       DOUBLE,
        test_logloss    DOUBLE,
        train_seconds   DOUBLE DEFAULT 0,
        checkpoint      VARCHAR,
        error           VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id       VARCHAR NOT NULL,
        epoch        INTEGER,
        split        VARCHAR NOT NULL,         -- train | valid | test
        name         VARCHAR NOT NULL,
        value        DOUBLE,
        recorded_at  TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS codebook_usage (
        run_id      VARCHAR NOT NULL,
        epoch       INTEGER NOT NULL,
        codebook    INTEGER NOT NULL,
        used        INTEGER NOT NULL,
        dead        INTEGER NOT NULL,
        perplexity  DOUBLE NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS benches (
        bench       VARCHAR PRIMARY KEY,
        dataset     VARCHAR NOT NULL,
        created_at  TIMESTAMPTZ NOT NULL,
        settings    JSON NOT NULL          -- models, seeds and the shared budget
    )""",
    """CREATE TABLE IF NOT EXISTS bench_runs (
        bench    VARCHAR NOT NULL,
        model    VARCHAR NOT NULL,
        seed     BIGINT NOT NULL,
        run_id   VARCHAR NOT NULL,
        PRIMARY KEY (bench, model, seed)
    )""",
    """CREATE TABLE IF NOT EXISTS codeword_counts (
        run_id    VARCHAR NOT NULL,
        epoch     INTEGER NOT NULL,
        codebook  INTEGER NOT NULL,
        codeword  INTEGER NOT NULL,
        count     BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS quantizer_stats (
        run_id     VARCHAR NOT NULL,
        epoch      INTEGER NOT NULL,
        codebook   INTEGER NOT NULL,
        agreement  DOUBLE NOT NULL,            -- share of behaviors, 0..1
        margin     DOUBLE NOT NULL             -- mean best minus second-best score
    )""",
    """CREATE TABLE IF NOT EXISTS icim_stats (
        run_id      VARCHAR NOT NULL,
        epoch       INTEGER NOT NULL,
        layer       INTEGER NOT NULL,          -- 0 = the first HSTU layer
        norm_ratio  DOUBLE                     -- NULL when the sample had no non-empty cluster
    )""",
    """CREATE TABLE IF NOT EXISTS inspect_users (
        run_id          VARCHAR NOT NULL,
        user_id         BIGINT NOT NULL,       -- raw user id of the log
        history_length  INTEGER NOT NULL,      -- L: behaviors in the encoded history
        candidates      INTEGER NOT NULL       -- C: test samples
    )""",
    """CREATE TABLE IF NOT EXISTS inspect_behaviors (
        run_id     VARCHAR NOT NULL,
        user_id    BIGINT NOT NULL,
        position   INTEGER NOT NULL,           -- 0 = oldest behavior of the history
        codebook   INTEGER NOT NULL,
        codeword   INTEGER NOT NULL,
        timestamp  BIGINT NOT NULL,            -- unix seconds
        item       BIGINT NOT NULL,            -- raw ids
        category   BIGINT NOT NULL,
        behavior   VARCHAR NOT NULL            -- behavior type name (pv, buy, ...)
    )""",
    """CREATE TABLE IF NOT EXISTS inspect_candidates (
        run_id     VARCHAR NOT NULL,
        user_id    BIGINT NOT NULL,
        candidate  INTEGER NOT NULL,           -- 0..C-1
        item       BIGINT NOT NULL,
        category   BIGINT NOT NULL,
        label      TINYINT NOT NULL,
        score      FLOAT NOT NULL              -- predicted click probability
    )""",
    """CREATE TABLE IF NOT EXISTS inspect_attention (
        run_id     VARCHAR NOT NULL,
        user_id    BIGINT NOT NULL,
        candidate  INTEGER NOT NULL,
        codebook   INTEGER NOT NULL,
        codeword   INTEGER NOT NULL,           -- non-empty clusters only
        weight     FLOAT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS codebook_vectors (
        run_id    VARCHAR NOT NULL,
        codebook  INTEGER NOT NULL,
        codeword  INTEGER NOT NULL,
        vector    FLOAT[] NOT NULL             -- D values, folded into the behavior-embedding space
    )""",
    """CREATE TABLE IF NOT EXISTS item_vectors (
        run_id      VARCHAR NOT NULL,
        item        BIGINT NOT NULL,           -- raw ids
        category    BIGINT NOT NULL,
        popularity  BIGINT NOT NULL,           -- behaviors on the item in the prepared set
        vector      FLOAT[] NOT NULL           -- D values: the candidate embedding item + category
    )""",
]

# The inspection tables a run writes at the end of training, with their column order.
INSPECTION_COLUMNS: dict[str, tuple[str, ...]] = {
    "inspect_users": ("user_id", "history_length", "candidates"),
    "inspect_behaviors": ("user_id", "position", "codebook", "codeword", "timestamp", "item", "category", "behavior"),
    "inspect_candidates": ("user_id", "candidate", "item", "category", "label", "score"),
    "inspect_attention": ("user_id", "candidate", "codebook", "codeword", "weight"),
    "codebook_vectors": ("codebook", "codeword", "vector"),
    "item_vectors": ("item", "category", "popularity", "vector"),
}
_INSPECTION_TYPES: dict[str, pa.DataType] = {
    "user_id": pa.int64(),
    "history_length": pa.int32(),
    "candidates": pa.int32(),
    "position": pa.int32(),
    "codebook": pa.int32(),
    "codeword": pa.int32(),
    "timestamp": pa.int64(),
    "item": pa.int64(),
    "category": pa.int64(),
    "behavior": pa.string(),
    "candidate": pa.int32(),
    "label": pa.int8(),
    "score": pa.float32(),
    "weight": pa.float32(),
    "popularity": pa.int64(),
    "vector": pa.list_(pa.float32()),
}

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

# A writer holds DuckDB's file lock only for one short transaction; retry for this long.
_LOCK_WAIT_SECONDS = 30.0

# The file in each run's directory that its training process holds locked (workspace.exclusive_lock).
RUN_LOCK = ".lock"
# A run lock that exclusive_lock created but has not written its pid into yet is that young; one still
# empty after this long was left by a process killed in that instant.
_UNWRITTEN_LOCK_SECONDS = 60.0

# The file is opened with this: a file handed over must not make DuckDB read or write anything else
# (a view over read_csv('/etc/passwd'), COPY TO, ATTACH, extension installs). The store needs nothing
# outside its own file: Arrow frames registered from Python are not external access.
_CONFIG = {"enable_external_access": False}


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


def _now() -> datetime:
    return datetime.now(timezone.utc)


class RunStore:
    """Read and write ``runs.duckdb``. Cheap to construct; connections are opened per call.

    ``runs_dir`` holds a directory per run with its lock (RUN_LOCK); by default the workspace's
    ``runs/`` beside the store.
    """

    def __init__(self, path: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        self.runs_dir = Path(runs_dir) if runs_dir is not None else self.path.parent / "runs"
        self._checked: tuple[tuple, frozenset[str]] | None = None  # _check_schema's last answer

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

    # -- connections -------------------------------------------------------------------
    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only, config=_CONFIG)
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise DmqnError(f"cannot open run store {self.path}: {_first_line(exc)}") from None
                time.sleep(0.2)
            except duckdb.Error as exc:
                raise self._unusable(exc) from None

    @contextmanager
    def _connection(self, read_only: bool) -> Iterator[tuple[duckdb.DuckDBPyConnection, frozenset[str]]]:
        """A connection for one batch of statements, closed afterwards, and the tables of the schema
        that the file has (checked to be this module's: see _check_schema).

        DuckDB reads most blocks of the file only when a statement needs them, so damage can
        surface in any statement, not only when connecting: such errors become one DmqnError
        naming the file. Errors of the statements themselves (this module's bugs) stay as they are.

        A KeyboardInterrupt (Ctrl-C, or SIGTERM under dmqn_cli.common.handle_errors) that comes while
        DuckDB runs a statement stops the statement, and DuckDB raises RuntimeError("Query interrupted")
        in its place (as prep's queries do, dmqn_core.data.prep): it is raised as the KeyboardInterrupt
        again, so that a training records its run as interrupted, not failed.
        """
        con = self._connect(read_only)
        try:
            yield con, self._check_schema(con)
        except (duckdb.InterruptException, RuntimeError) as exc:
            if isinstance(exc, duckdb.InterruptException) or str(exc) == "Query interrupted":
                raise KeyboardInterrupt from None
            raise
        except (duckdb.IOException, duckdb.SerializationException, duckdb.InternalException) as exc:
            raise self._unusable(exc) from None
        except duckdb.Error as exc:
            if not str(exc).startswith("Corrupt"):
                raise
            raise self._unusable(exc) from None
        finally:
            con.close()

    def _check_schema(self, con: duckdb.DuckDBPyConnection) -> frozenset[str]:
        """The tables of SCHEMA that the file has; a DmqnError unless the file is empty or what this module
        writes: schema_info with one version and runs, each table of SCHEMA that is there with exactly its
        columns and constraints, no view in a table's place, and no macro, type or index of its own.

        A macro can shadow any function, even the catalog's (a table macro duckdb_tables() changes
        information_schema.tables), so the catalog is read by the system's qualified names and a file
        that defines one is refused. The answer is kept while the file and its WAL stay as they are:
        a connection costs one stat then, not the listing of every function.
        """
        key = _file_state(self.path)
        if self._checked is not None and self._checked[0] == key:
            return self._checked[1]
        problem, tables = _schema_problem(con)
        if problem is not None:
            raise DmqnError(f"{self.path} is not a dmqn run store ({problem}); move it aside to start a new one")
        self._checked = (key, tables)
        return tables

    def _unusable(self, exc: duckdb.Error) -> DmqnError:
        if isinstance(exc, duckdb.IOException):
            return DmqnError(f"cannot use run store {self.path}: {_first_line(exc)}")
        return DmqnError(
            f"run store {self.path} is damaged ({_first_line(exc)}); move it aside to start "
            "a new one, or put back a copy"
        )

    def _write(
        self, statements: Iterable[tuple[str, Sequence | None]], frames: Mapping[str, pa.Table] | None = None
    ) -> None:
        """Run the statements in one transaction; ``frames`` are Arrow tables the statements can
        select from by name (bulk inserts: DuckDB's executemany costs milliseconds per row)."""
        with self._connection(read_only=False) as (con, _):
            con.execute("BEGIN TRANSACTION")
            for sql in SCHEMA:
                con.execute(sql)
            if con.execute("SELECT count(*) FROM schema_info").fetchone()[0] == 0:
                con.execute("INSERT INTO schema_info VALUES (?)", [SCHEMA_VERSION])
            else:  # every version so far only added tables, which the statements above create
                con.execute("UPDATE schema_info SET version = ? WHERE version < ?", [SCHEMA_VERSION, SCHEMA_VERSION])
            for name, frame in (frames or {}).items():
                con.register(name, frame)
            for sql, params in statements:
                if params is not None and params and isinstance(params[0], (list, tuple)):
                    con.executemany(sql, params)
                else:
                    con.execute(sql, params or [])
            con.execute("COMMIT")
        # The file now holds what it held, checked, and this module's schema: the next connection need
        # not list the catalog again (the stat is taken after closing, which may fold the WAL into the file).
        self._checked = (_file_state(self.path), frozenset(_reference_signatures()))

    def _read(self, sql: str, params: Sequence | None = None, table: str = "runs") -> list[tuple]:
        """Rows of a read-only query; none while ``table`` does not exist yet (a store written before
        it was added to the schema gets it with its next write)."""
        return self._read_all([(sql, params, table)])[0]

    def _read_all(self, queries: Sequence[tuple[str, Sequence | None, str]]) -> list[list[tuple]]:
        """The rows of several (sql, params, table) queries, read through one read-only connection."""
        if not self.path.exists():
            return [[] for _ in queries]
        with self._connection(read_only=True) as (con, tables):
            return [
                con.execute(sql, params or []).fetchall() if table in tables else [] for sql, params, table in queries
            ]

    # -- runs --------------------------------------------------------------------------
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
                        _now(),
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
        self.update_run(run_id, status=status, finished_at=_now(), **fields)

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

    # -- metrics -----------------------------------------------------------------------
    def log_metrics(self, run_id: str, split: str, metrics: dict[str, float], epoch: int | None = None) -> None:
        now = _now()
        rows = [[run_id, epoch, split, name, float(value), now] for name, value in metrics.items()]
        if rows:
            self._write([("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)", rows)])

    def metric_history(self, run_id: str) -> list[tuple[int | None, str, str, float]]:
        """(epoch, split, name, value) in the order they were recorded."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT epoch, split, name, value FROM metrics WHERE run_id = ? "
                "ORDER BY recorded_at, epoch NULLS LAST, split, name",
                [run_id],
            )
        ]

    def log_codebook_usage(
        self, run_id: str, epoch: int, counts: Sequence[Sequence[int]], usage: Sequence[tuple[int, int, float]]
    ) -> None:
        """counts[codebook][codeword]; usage[codebook] = (used, dead, perplexity)."""
        count_rows = [[run_id, epoch, j, k, int(c)] for j, row in enumerate(counts) for k, c in enumerate(row)]
        usage_rows = [[run_id, epoch, j, int(u), int(d), float(p)] for j, (u, d, p) in enumerate(usage)]
        self._write(
            [
                ("INSERT INTO codeword_counts VALUES (?, ?, ?, ?, ?)", count_rows),
                ("INSERT INTO codebook_usage VALUES (?, ?, ?, ?, ?, ?)", usage_rows),
            ]
        )

    def codebook_usage(self, run_id: str) -> list[tuple[int, int, int, int, float]]:
        """(epoch, codebook, used, dead, perplexity) rows of a run."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT epoch, codebook, used, dead, perplexity FROM codebook_usage WHERE run_id = ? "
                "ORDER BY epoch, codebook",
                [run_id],
            )
        ]

    def log_quantizer_stats(
        self, run_id: str, epoch: int, codebooks: Sequence[tuple[float, float]], layers: Sequence[float]
    ) -> None:
        """codebooks[codebook] = (agreement, margin); layers[layer] = ICIM norm ratio (NaN is stored as NULL)."""
        codebook_rows = [[run_id, epoch, j, float(a), float(m)] for j, (a, m) in enumerate(codebooks)]
        layer_rows = [[run_id, epoch, i, None if math.isnan(r) else float(r)] for i, r in enumerate(layers)]
        statements = [("INSERT INTO quantizer_stats VALUES (?, ?, ?, ?, ?)", codebook_rows)]
        if layer_rows:  # dmqn-simple has no ICIM layer
            statements.append(("INSERT INTO icim_stats VALUES (?, ?, ?, ?)", layer_rows))
        self._write(statements)

    def quantizer_stats(self, run_id: str) -> list[tuple[int, int, float, float]]:
        """(epoch, codebook, agreement, margin) rows of a run."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT epoch, codebook, agreement, margin FROM quantizer_stats WHERE run_id = ? "
                "ORDER BY epoch, codebook",
                [run_id],
                table="quantizer_stats",
            )
        ]

    def icim_stats(self, run_id: str) -> list[tuple[int, int, float | None]]:
        """(epoch, layer, norm_ratio) rows of a run."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT epoch, layer, norm_ratio FROM icim_stats WHERE run_id = ? ORDER BY epoch, layer",
                [run_id],
                table="icim_stats",
            )
        ]

    def delete_epochs_after(self, run_id: str, epoch: int) -> None:
        """Forget what a crashed run logged past its last checkpoint, before resuming it."""
        self._write(
            [
                ("DELETE FROM metrics WHERE run_id = ? AND (epoch > ? OR epoch IS NULL)", [run_id, epoch]),
                ("DELETE FROM codebook_usage WHERE run_id = ? AND epoch > ?", [run_id, epoch]),
                ("DELETE FROM codeword_counts WHERE run_id = ? AND epoch > ?", [run_id, epoch]),
                ("DELETE FROM quantizer_stats WHERE run_id = ? AND epoch > ?", [run_id, epoch]),
                ("DELETE FROM icim_stats WHERE run_id = ? AND epoch > ?", [run_id, epoch]),
            ]
        )

    # -- benches -----------------------------------------------------------------------
    def register_bench(self, bench: str, dataset: str, settings: dict[str, Any]) -> None:
        """Record a bench; an existing one must have been started with the same settings."""
        text = json.dumps(settings, sort_keys=True)
        rows = self._read("SELECT settings FROM benches WHERE bench = ?", [bench], table="benches")
        if rows:
            if json.loads(rows[0][0]) != json.loads(text):
                raise DmqnError(f"bench {bench!r} already exists with other settings; choose another --name")
            return
        self._write([("INSERT INTO benches VALUES (?, ?, ?, ?)", [bench, dataset, _now(), text])])

    def bench_run(self, bench: str, model: str, seed: int) -> str | None:
        """The run id recorded for (bench, model, seed), if any."""
        rows = self._read(
            "SELECT run_id FROM bench_runs WHERE bench = ? AND model = ? AND seed = ?",
            [bench, model, seed],
            table="bench_runs",
        )
        return rows[0][0] if rows else None

    def set_bench_run(self, bench: str, model: str, seed: int, run_id: str) -> None:
        self._write(
            [
                ("DELETE FROM bench_runs WHERE bench = ? AND model = ? AND seed = ?", [bench, model, seed]),
                ("INSERT INTO bench_runs VALUES (?, ?, ?, ?)", [bench, model, seed, run_id]),
            ]
        )

    def has_run(self, run_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM runs WHERE run_id = ?", [run_id]))

    # -- inspection sample -------------------------------------------------------------
    def log_inspection(self, run_id: str, rows: Mapping[str, Mapping[str, Any]], replace: bool = False) -> None:
        """Insert rows into the inspection tables in one transaction.

        ``rows[table][column]`` holds the values of one column (the columns of INSPECTION_COLUMNS,
        run_id excluded; ``vector`` as an (M, D) array). With ``replace`` every inspection row of
        the run is deleted first, in the same transaction: a resumed run records its sample again.
        """
        unknown = set(rows) - set(INSPECTION_COLUMNS)
        if unknown:
            raise ValueError(f"not inspection tables: {sorted(unknown)}")
        statements: list[tuple[str, Sequence | None]] = []
        if replace:
            statements += [(f"DELETE FROM {table} WHERE run_id = ?", [run_id]) for table in INSPECTION_COLUMNS]
        frames = {}
        for table, columns in rows.items():
            frame = _arrow_frame(INSPECTION_COLUMNS[table], columns)
            if frame.num_rows == 0:
                continue
            frames[f"new_{table}"] = frame
            names = ", ".join(INSPECTION_COLUMNS[table])
            # Table and column names come from INSPECTION_COLUMNS, never from input; the run id is a parameter.
            statements.append((f"INSERT INTO {table} (run_id, {names}) SELECT ?, {names} FROM new_{table}", [run_id]))
        self._write(statements, frames)

    def inspected_users(self, run_id: str) -> list[tuple[int, int, int]]:
        """(user_id, history_length, candidates) of the run's recorded sample, by user id."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT user_id, history_length, candidates FROM inspect_users WHERE run_id = ? ORDER BY user_id",
                [run_id],
                table="inspect_users",
            )
        ]

    def inspected_user(self, run_id: str, user_id: int) -> tuple[list[tuple], list[tuple], list[tuple]] | None:
        """A recorded user's behavior rows (position, codebook, codeword, timestamp, item, category, behavior),
        candidate rows (candidate, item, category, label, score) and attention rows (candidate, codebook,
        codeword, weight); None when the user is not in the run's sample."""
        key = [run_id, int(user_id)]
        found, behaviors, candidates, attention = self._read_all(
            [
                ("SELECT 1 FROM inspect_users WHERE run_id = ? AND user_id = ?", key, "inspect_users"),
                (
                    "SELECT position, codebook, codeword, timestamp, item, category, behavior FROM inspect_behaviors "
                    "WHERE run_id = ? AND user_id = ? ORDER BY position, codebook",
                    key,
                    "inspect_behaviors",
                ),
                (
                    "SELECT candidate, item, category, label, score FROM inspect_candidates "
                    "WHERE run_id = ? AND user_id = ? ORDER BY candidate",
                    key,
                    "inspect_candidates",
                ),
                (
                    "SELECT candidate, codebook, codeword, weight FROM inspect_attention "
                    "WHERE run_id = ? AND user_id = ? ORDER BY candidate, codebook, codeword",
                    key,
                    "inspect_attention",
                ),
            ]
        )
        return (behaviors, candidates, attention) if found else None

    def codeword_counts(self, run_id: str, epoch: int) -> list[tuple[int, int, int]]:
        """(codebook, codeword, count) of one epoch's validation assignments."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT codebook, codeword, count FROM codeword_counts WHERE run_id = ? AND epoch = ? "
                "ORDER BY codebook, codeword",
                [run_id, epoch],
                table="codeword_counts",
            )
        ]

    def codeword_categories(self, run_id: str) -> list[tuple[int, int, int, int]]:
        """(codebook, codeword, category, behaviors) over every recorded user of the run, one GROUP BY."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT codebook, codeword, category, count(*) FROM inspect_behaviors WHERE run_id = ? "
                "GROUP BY codebook, codeword, category ORDER BY codebook, codeword, category",
                [run_id],
                table="inspect_behaviors",
            )
        ]

    def codebook_vectors(self, run_id: str) -> list[tuple[int, int, list[float]]]:
        """(codebook, codeword, vector) recorded at the end of training."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT codebook, codeword, vector FROM codebook_vectors WHERE run_id = ? ORDER BY codebook, codeword",
                [run_id],
                table="codebook_vectors",
            )
        ]

    def item_vectors(self, run_id: str) -> list[tuple[int, int, int, list[float]]]:
        """(item, category, popularity, vector) recorded at the end of training, most frequent first."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT item, category, popularity, vector FROM item_vectors WHERE run_id = ? "
                "ORDER BY popularity DESC, item",
                [run_id],
                table="item_vectors",
            )
        ]


def _arrow_frame(names: Sequence[str], columns: Mapping[str, Any]) -> pa.Table:
    """An Arrow table of the named columns, typed as the inspection tables store them."""
    if set(columns) != set(names):
        raise ValueError(f"expected columns {list(names)}, got {sorted(columns)}")
    arrays = []
    for name in names:
        kind = _INSPECTION_TYPES[name]
        if name == "vector":
            vectors = np.ascontiguousarray(columns[name], dtype=np.float32)
            flat = pa.array(vectors.reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]).cast(kind))
        elif kind == pa.string():
            arrays.append(pa.array(np.asarray(columns[name], dtype=str), type=kind))
        else:
            arrays.append(pa.array(np.asarray(columns[name]).astype(kind.to_pandas_dtype(), copy=False), type=kind))
    return pa.table(arrays, names=list(names))


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


def _file_state(path: Path) -> tuple:
    """What changes when the store file or its write-ahead log is written or replaced."""
    state = []
    for file in (path, path.with_name(path.name + ".wal")):
        try:
            st = file.stat()
        except FileNotFoundError:
            state.append(None)
        else:
            state.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(state)


# The catalog of the connection's own database, read by qualified names that no macro of the file can shadow.
_CATALOG_QUERIES = {
    "objects": "SELECT function_name, function_type FROM system.main.duckdb_functions() "
    "WHERE database_name = ? AND NOT internal "
    "UNION ALL SELECT type_name, 'type' FROM system.main.duckdb_types() WHERE database_name = ? AND NOT internal "
    "UNION ALL SELECT index_name, 'index' FROM system.main.duckdb_indexes() WHERE database_name = ? "
    "UNION ALL SELECT view_name, 'view' FROM system.main.duckdb_views() "
    "WHERE database_name = ? AND schema_name = 'main' AND NOT internal",
    "tables": "SELECT table_name FROM system.main.duckdb_tables() WHERE database_name = ? AND schema_name = 'main'",
    "columns": "SELECT table_name, column_name, data_type, column_default, is_nullable "
    "FROM system.main.duckdb_columns() WHERE database_name = ? AND schema_name = 'main' "
    "ORDER BY table_name, column_index",
    "constraints": "SELECT table_name, constraint_type, constraint_column_names "
    "FROM system.main.duckdb_constraints() WHERE database_name = ? AND schema_name = 'main'",
}


def _table_signatures(con: duckdb.DuckDBPyConnection) -> dict[str, tuple]:
    """Each table of the connection's database: its columns (name, type, default, nullable) in order and
    its constraints (kind, columns)."""
    database = [con.execute("SELECT system.main.current_database()").fetchone()[0]]
    columns: dict[str, list] = {name: [] for (name,) in con.execute(_CATALOG_QUERIES["tables"], database).fetchall()}
    for table, *column in con.execute(_CATALOG_QUERIES["columns"], database).fetchall():
        if table in columns:  # the columns of views are listed too
            columns[table].append(tuple(column))
    constraints: dict[str, list] = {name: [] for name in columns}
    for table, kind, names in con.execute(_CATALOG_QUERIES["constraints"], database).fetchall():
        constraints[table].append((kind, tuple(names)))
    return {name: (tuple(columns[name]), tuple(sorted(constraints[name]))) for name in columns}


@functools.cache
def _reference_signatures() -> dict[str, tuple]:
    """The signatures of SCHEMA's tables, as the DuckDB in use makes them."""
    with duckdb.connect(config=_CONFIG) as con:
        for sql in SCHEMA:
            con.execute(sql)
        return _table_signatures(con)


def _schema_problem(con: duckdb.DuckDBPyConnection) -> tuple[str | None, frozenset[str]]:
    """What makes the connection's database something other than a run store this module wrote (None:
    nothing), and the tables of SCHEMA it has."""
    database = con.execute("SELECT system.main.current_database()").fetchone()[0]
    foreign = con.execute(_CATALOG_QUERIES["objects"], [database] * 4).fetchall()
    reference = _reference_signatures()
    for name, kind in foreign:
        if kind != "view":  # a macro, type or index could change what a statement does
            return f"it defines the {kind.replace('_', ' ')} {name!r}", frozenset()
        if name in reference:  # a view of another name is never read
            return f"{name} is a view, not a table", frozenset()
    signatures = _table_signatures(con)
    tables = frozenset(signatures) & set(reference)
    if not tables:
        if signatures or foreign:
            return "it holds tables of something else", tables
        return None, tables  # a new, empty file: the first write creates the schema
    for name in ("schema_info", "runs"):  # every version of the schema had both, made in one transaction
        if name not in tables:
            return f"it has no table {name}", tables
    for name in sorted(tables):
        if signatures[name] != reference[name]:
            return f"table {name} does not have the columns dmqn makes", tables
    versions = con.execute("SELECT version FROM schema_info").fetchall()
    if len(versions) != 1 or versions[0][0] < 1:
        return "schema_info does not hold one schema version", tables
    return None, tables


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def iter_param_rows(params: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Flatten nested parameters into ("a.b", value) rows for display."""
    for key in sorted(params):
        value = params[key]
        if isinstance(value, dict):
            yield from iter_param_rows(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
