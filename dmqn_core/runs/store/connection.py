"""The run store's file: one short connection per batch of statements, the schema check, and what
the table groups read and write through (StoreFile._read, StoreFile._write).

Writers open the file, write one batch in a transaction and close it again, so that a reader
(``dmqn runs``, ``dmqn inspect``) can open it read-only between writes of a training process; all SQL
takes parameters. Errors of a damaged or foreign file become one DmqnError naming it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from dmqn_core.errors import DmqnError
from dmqn_core.runs.store.schema import (
    CONNECTION_CONFIG,
    SCHEMA,
    SCHEMA_VERSION,
    reference_signatures,
    schema_problem,
)

# A writer holds DuckDB's file lock only for one short transaction; retry for this long.
_LOCK_WAIT_SECONDS = 30.0

# One statement of a batch: SQL and its parameters; a list of parameter lists runs it once per list.
Statement = tuple[str, Sequence | None]


def utc_now() -> datetime:
    """The time recorded in a row."""
    return datetime.now(timezone.utc)


class StoreFile:
    """The store file at ``path``, opened per call; the base of every table group of RunStore."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._checked: tuple[tuple, frozenset[str]] | None = None  # _check_schema's last answer

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only, config=CONNECTION_CONFIG)
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise DmqnError(f"cannot open run store {self.path}: {_first_line(exc)}") from None
                time.sleep(0.2)
            except duckdb.Error as exc:
                raise self._unusable(exc) from None

    @contextmanager
    def _connection(self, read_only: bool) -> Iterator[tuple[duckdb.DuckDBPyConnection, frozenset[str]]]:
        """A connection for one batch of statements, closed afterwards, and the tables of the schema
        that the file has (checked to be the run store's: see _check_schema).

        DuckDB reads most blocks of the file only when a statement needs them, so damage can
        surface in any statement, not only when connecting: such errors become one DmqnError
        naming the file. Errors of the statements themselves (the store's bugs) stay as they are.

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
        """The tables of SCHEMA that the file has; a DmqnError unless the file is empty or what SCHEMA
        describes: schema_info with one version and runs, each table of SCHEMA that is there with exactly its
        columns and constraints, no view in a table's place, and no macro, type or index of its own.

        A macro can shadow any function, even the catalog's (a table macro duckdb_tables() changes
        information_schema.tables), so the catalog is read by the system's qualified names and a file
        that defines one is refused. The answer is kept while the file and its WAL stay as they are:
        a connection costs one stat then, not the listing of every function.
        """
        key = _file_state(self.path)
        if self._checked is not None and self._checked[0] == key:
            return self._checked[1]
        problem, tables = schema_problem(con)
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

    def _write(self, statements: Iterable[Statement], frames: Mapping[str, pa.Table] | None = None) -> None:
        """Run the statements in one transaction; ``frames`` are Arrow tables the statements can
        select from by name (bulk inserts: DuckDB's executemany costs milliseconds per row)."""
        with self._connection(read_only=False) as (con, _):
            con.execute("BEGIN TRANSACTION")
            for sql in SCHEMA:
                con.execute(sql)
            if con.execute("SELECT count(*) FROM schema_info").fetchall()[0][0] == 0:
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
        # The file now holds what it held, checked, and the store's schema: the next connection need
        # not list the catalog again (the stat is taken after closing, which may fold the WAL into the file).
        self._checked = (_file_state(self.path), frozenset(reference_signatures()))

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


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
