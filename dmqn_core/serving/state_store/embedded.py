"""The embedded store (the default, ``WORKSPACE/cache/states.sqlite``, no server): one SQLite file in WAL
mode, a manifest table and a states table keyed by (version, user_id)."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from dmqn_core.errors import DmqnError
from dmqn_core.serving.state_store.contract import MANIFEST_FIELDS

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS manifest (
        version       TEXT PRIMARY KEY,     -- run id + checkpoint hash
        run_id        TEXT NOT NULL,
        dtype         TEXT NOT NULL,        -- float32 | float16
        n_codebooks   INTEGER NOT NULL,
        codebook_size INTEGER NOT NULL,
        dim           INTEGER NOT NULL,
        users         INTEGER NOT NULL,
        bytes         INTEGER NOT NULL,
        created_at    TEXT NOT NULL,        -- ISO 8601, UTC
        complete      INTEGER NOT NULL DEFAULT 1  -- 0 while an export is writing the version
    )""",
    """CREATE TABLE IF NOT EXISTS states (
        version  TEXT NOT NULL,
        user_id  INTEGER NOT NULL,          -- the raw user id of the log
        value    BLOB NOT NULL,             -- see dmqn_core.serving.state_codec
        PRIMARY KEY (version, user_id)
    )""",
]


# SQLite's primary result codes that are about the file or its disk rather than the statement:
# permission, busy past the timeout, read-only, I/O error, corrupt, full, cannot open, not a database.
_SQLITE_FILE_ERRORS = {3, 5, 8, 10, 11, 13, 14, 26}
_SQLITE_DAMAGED = {11, 26}

P = ParamSpec("P")
T = TypeVar("T")


def _file_errors(
    method: Callable[Concatenate[EmbeddedStateStore, P], T],
) -> Callable[Concatenate[EmbeddedStateStore, P], T]:
    """A problem with the SQLite file becomes a DmqnError naming it; a wrong statement stays a bug."""

    @functools.wraps(method)
    def wrapper(self: EmbeddedStateStore, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code is None or code & 0xFF not in _SQLITE_FILE_ERRORS:
                raise
            hint = "; delete it and run `dmqn export-cache` again" if code & 0xFF in _SQLITE_DAMAGED else ""
            raise DmqnError(f"cannot use the state cache {self.path}: {exc}{hint}") from None

    return wrapper


class EmbeddedStateStore:
    """States in one SQLite file (WAL mode), a key-value table on a B-tree.

    SQLite rather than DuckDB, which holds the run store: serving is a point lookup per
    request, which SQLite answers in tens of microseconds from its primary-key B-tree while
    DuckDB scans the table (about 20 ms per lookup for 900 users of 17 kB states, growing with
    the store), and in WAL mode a scorer keeps reading while an export writes, where DuckDB's
    file lock lets only one process write and no other process read meanwhile.
    The store keeps one connection open until close(); readers open the file read-only.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._con: sqlite3.Connection | None = None
        self._writable = False

    def describe(self) -> str:
        return str(self.path)

    def _connection(self, write: bool) -> sqlite3.Connection:
        if self._con is not None and (self._writable or not write):
            return self._con
        self.close()
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN ... COMMIT in put/clear).
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a killed process
            for sql in SCHEMA:
                con.execute(sql)
            if "complete" not in _columns(con, "manifest"):  # a cache written before the field existed
                con.execute("ALTER TABLE manifest ADD COLUMN complete INTEGER NOT NULL DEFAULT 1")
        else:
            if not self.path.exists():
                raise DmqnError(f"no state cache at {self.path} (run `dmqn export-cache` first)")
            # check_same_thread=False: `dmqn serve` reads through one store per thread and closes them all
            # from the thread that shuts down; each connection is still used by one thread at a time.
            con = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=60,
                isolation_level=None,
                check_same_thread=False,
            )
        self._con, self._writable = con, write
        return con

    def _transaction(self, statements: list[tuple[str, list]]) -> None:
        con = self._connection(write=True)
        con.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                if params and isinstance(params[0], (list, tuple)):
                    con.executemany(sql, params)
                else:
                    con.execute(sql, params)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:  # a failed COMMIT (disk full) may have rolled back already
                con.execute("ROLLBACK")
            raise

    def _has_tables(self) -> bool:
        if not self.path.exists():
            return False
        return (
            self._connection(write=False)
            .execute("SELECT count(*) FROM sqlite_master WHERE name = 'states'")
            .fetchone()[0]
            == 1
        )

    @_file_errors
    def put(self, version: str, rows: list[tuple[int, bytes]]) -> None:
        """Write (user_id, value) rows in one transaction, replacing earlier values of the same version."""
        if rows:
            self._transaction(
                [("INSERT OR REPLACE INTO states VALUES (?, ?, ?)", [(version, int(u), v) for u, v in rows])]
            )

    @_file_errors
    def users(self, version: str) -> set[int]:
        if not self._has_tables():
            return set()
        return {
            r[0]
            for r in self._connection(write=False).execute("SELECT user_id FROM states WHERE version = ?", [version])
        }

    @_file_errors
    def get(self, version: str, user_ids: Iterable[int]) -> dict[int, bytes]:
        con = self._connection(write=False)
        out = {}
        for user_id in user_ids:  # one primary-key lookup each: the serving path asks for one user
            row = con.execute(
                "SELECT value FROM states WHERE version = ? AND user_id = ?", [version, int(user_id)]
            ).fetchone()
            if row is not None:
                out[int(user_id)] = bytes(row[0])
        return out

    @_file_errors
    def write_manifest(
        self, version: str, run_id: str, dtype: str, shape: tuple[int, int, int], complete: bool = True
    ) -> tuple[int, int]:
        """Record (or refresh) a version's manifest from what is stored; returns (users, bytes)."""
        con = self._connection(write=True)
        users, size = con.execute(
            "SELECT count(*), coalesce(sum(length(value)), 0) FROM states WHERE version = ?", [version]
        ).fetchone()
        self._transaction(
            [
                (
                    f"INSERT OR REPLACE INTO manifest ({', '.join(('version', *MANIFEST_FIELDS))}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        version,
                        run_id,
                        dtype,
                        *shape,
                        users,
                        size,
                        datetime.now(timezone.utc).isoformat(),
                        int(complete),
                    ],
                )
            ]
        )
        return int(users), int(size)

    @_file_errors
    def clear(self, version: str) -> None:
        self._transaction(
            [("DELETE FROM states WHERE version = ?", [version]), ("DELETE FROM manifest WHERE version = ?", [version])]
        )

    @_file_errors
    def manifest(self, version: str) -> dict | None:
        if not self._has_tables():
            return None
        con = self._connection(write=False)
        # A reader opens the file read-only, so a cache from before the complete column keeps lacking it.
        fields = [f for f in MANIFEST_FIELDS if f in _columns(con, "manifest")]
        row = con.execute(f"SELECT {', '.join(fields)} FROM manifest WHERE version = ?", [version]).fetchone()
        if row is None:
            return None
        manifest = {"complete": 1, **dict(zip(fields, row))}
        manifest["complete"] = bool(manifest["complete"])
        return {name: manifest[name] for name in MANIFEST_FIELDS}

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


def _columns(con: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
