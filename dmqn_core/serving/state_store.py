"""Where exported user states live: an embedded SQLite file or a Redis server.

Both stores hold, per model version (run id + checkpoint hash), one value per user in the layout
of ``state_codec``, plus a manifest describing the version. Writing a user's value is atomic in
both (a transaction per batch in SQLite, one SET per key in Redis), so an interrupted export
never leaves a half-written user, only users that are missing, which ``--resume`` fills in.

Embedded (the default, ``WORKSPACE/cache/states.sqlite``, no server)::

    manifest(version PK, run_id, dtype, n_codebooks, codebook_size, dim, users, bytes, created_at, complete)
    states(version, user_id, value BLOB)   PRIMARY KEY (version, user_id)

Redis (``--to redis://[:PASSWORD@]host:port/db``; shown everywhere through ``redact_uri``; the password
is everything between ':' and the last '@', so it may hold '@', '/', '?' or '#' unescaped)::

    dmqn:<version>:<user_id>    string, the packed state
    dmqn:manifest:<version>     hash: run_id, dtype, n_codebooks, codebook_size, dim, users, bytes, created_at, complete

``complete`` is 0 from the moment an export starts writing a version until it has written every user, so
that a service switches to a version only once its export has finished (a manifest from before the
field existed reads as complete).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, TypeVar

from dmqn_core.errors import DmqnError
from dmqn_core.uris import quote_userinfo, redact_uri, scrub, uri_secrets

# Redis keeps an expire time as milliseconds since the epoch in a signed 64-bit integer and answers
# "invalid expire time" (SET ... EX, EXPIRE) when TTL * 1000 + now does not fit, i.e. from about
# 9.22e15 seconds on, less the time since 1970. 10**15 seconds (31 million years) leaves room for any clock.
MAX_TTL = 10**15

REDIS_SCHEMES = ("redis", "rediss", "unix")

MANIFEST_FIELDS = ("run_id", "dtype", "n_codebooks", "codebook_size", "dim", "users", "bytes", "created_at", "complete")

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


class StateStore(Protocol):
    """What export and scoring need from a store; ``describe`` names it in messages (never with a password)."""

    def describe(self) -> str: ...

    def put(self, version: str, rows: list[tuple[int, bytes]]) -> None: ...

    def users(self, version: str) -> set[int]: ...

    def get(self, version: str, user_ids: Iterable[int]) -> dict[int, bytes]: ...

    def write_manifest(
        self, version: str, run_id: str, dtype: str, shape: tuple[int, int, int], complete: bool = True
    ) -> tuple[int, int]: ...

    def manifest(self, version: str) -> dict | None: ...

    def clear(self, version: str) -> None: ...

    def close(self) -> None: ...


# SQLite's primary result codes that are about the file or its disk rather than the statement:
# permission, busy past the timeout, read-only, I/O error, corrupt, full, cannot open, not a database.
_SQLITE_FILE_ERRORS = {3, 5, 8, 10, 11, 13, 14, 26}
_SQLITE_DAMAGED = {11, 26}

M = TypeVar("M", bound=Callable)


def _file_errors(method: M) -> M:
    """A problem with the SQLite file becomes a DmqnError naming it; a wrong statement stays a bug."""

    @functools.wraps(method)
    def wrapper(self: EmbeddedStateStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code is None or code & 0xFF not in _SQLITE_FILE_ERRORS:
                raise
            hint = "; delete it and run `dmqn export-cache` again" if code & 0xFF in _SQLITE_DAMAGED else ""
            raise DmqnError(f"cannot use the state cache {self.path}: {exc}{hint}") from None

    return wrapper  # type: ignore[return-value]


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


class RedisStateStore:
    """States in a Redis server: ``dmqn:<version>:<user_id>`` strings and a ``dmqn:manifest:<version>`` hash.

    Batches go out as non-transactional pipelines (one round trip per batch; a transaction would
    buy nothing, as every SET is atomic on its own). With ``ttl`` every state and the manifest
    expire after that many seconds.
    """

    SCAN_COUNT = 10_000

    def __init__(self, url: str, ttl: int | None = None, timeout: float = 5.0, retries: int | None = None) -> None:
        """timeout: seconds for each connect and each reply; retries: attempts after a connection error or
        timeout, without backoff (None: redis-py's default, 10 with exponential backoff, which suits an
        export but would hold a request for a minute while the server is away)."""
        import redis  # redis-py; imported here so the embedded store works without touching it
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        check_ttl(ttl, url)
        self.url = redact_uri(url)  # the only form of the URL kept: it is what messages show
        self._secrets = uri_secrets(url)
        self.ttl = ttl
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        try:
            # TypeError: a query parameter redis-py does not know (redis://host/0?colour=1).
            # quote_userinfo: urllib, under from_url, would end the password at an unescaped '/', '?' or '#'
            # and connect to the rest of it as the host.
            retry = {} if retries is None else {"retry": Retry(NoBackoff(), retries)}
            self.client = redis.Redis.from_url(
                quote_userinfo(url), socket_connect_timeout=timeout, socket_timeout=timeout, **retry
            )
            self.client.ping()
        except (ValueError, TypeError) as exc:
            raise DmqnError(f"not a Redis URL: {self.url} ({self._scrub(exc)})") from None
        except redis.exceptions.AuthenticationError as exc:  # a ConnectionError to redis-py, yet the server answered
            raise DmqnError(f"Redis at {self.url} refused the connection: {self._scrub(exc)}") from None
        except self._errors as exc:
            raise DmqnError(f"cannot reach Redis at {self.url}: {self._scrub(exc)}") from None
        except redis.exceptions.RedisError as exc:
            raise DmqnError(f"Redis at {self.url} refused the connection: {self._scrub(exc)}") from None

    def _scrub(self, exc: Exception) -> str:
        """redis-py's message with every form of the password it might echo hidden."""
        return scrub(str(exc), self._secrets)

    def describe(self) -> str:
        return self.url

    @staticmethod
    def key(version: str, user_id: int) -> str:
        return f"dmqn:{version}:{int(user_id)}"

    @staticmethod
    def manifest_key(version: str) -> str:
        return f"dmqn:manifest:{version}"

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except self._errors as exc:
            raise DmqnError(f"lost the connection to Redis at {self.url} while {what}: {self._scrub(exc)}") from None

    def put(self, version: str, rows: list[tuple[int, bytes]]) -> None:
        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for user_id, value in rows:
                pipe.set(self.key(version, user_id), value, ex=self.ttl)
            pipe.execute()

        self._call("writing states", write)

    def _user_keys(self, version: str) -> Iterable[bytes]:
        prefix = f"dmqn:{version}:".encode()
        # SCAN's pattern treats * ? [ ] specially; a run id never contains them, the check keeps it so.
        if any(c in version for c in "*?[]\\"):
            raise DmqnError(f"invalid model version {version!r}")
        for key in self.client.scan_iter(match=prefix + b"*", count=self.SCAN_COUNT):
            if key[len(prefix) :].lstrip(b"-").isdigit():
                yield key

    def users(self, version: str) -> set[int]:
        n = len(f"dmqn:{version}:")
        return self._call("listing users", lambda: {int(k[n:]) for k in self._user_keys(version)})

    def get(self, version: str, user_ids: Iterable[int]) -> dict[int, bytes]:
        ids = [int(u) for u in user_ids]
        if not ids:
            return {}
        values = self._call("reading states", self.client.mget, [self.key(version, u) for u in ids])
        return {u: v for u, v in zip(ids, values) if v is not None}

    def write_manifest(
        self, version: str, run_id: str, dtype: str, shape: tuple[int, int, int], complete: bool = True
    ) -> tuple[int, int]:
        def count() -> tuple[int, int]:
            users = size = 0
            batch: list[bytes] = []
            for key in self._user_keys(version):
                batch.append(key)
                if len(batch) == self.SCAN_COUNT:
                    users, size = users + len(batch), size + self._sizes(batch)
                    batch = []
            return users + len(batch), size + self._sizes(batch)

        users, size = self._call("counting states", count)
        n_codebooks, codebook_size, dim = shape
        fields = {
            "run_id": run_id,
            "dtype": dtype,
            "n_codebooks": n_codebooks,
            "codebook_size": codebook_size,
            "dim": dim,
            "users": users,
            "bytes": size,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "complete": int(complete),
        }

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)  # the manifest is replaced whole or not at all
            pipe.delete(self.manifest_key(version))
            pipe.hset(self.manifest_key(version), mapping=fields)
            if self.ttl is not None:
                pipe.expire(self.manifest_key(version), self.ttl)
            pipe.execute()

        self._call("writing the manifest", write)
        return users, size

    def _sizes(self, keys: list[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(key)
        return sum(pipe.execute())

    def manifest(self, version: str) -> dict | None:
        raw = self._call("reading the manifest", self.client.hgetall, self.manifest_key(version))
        if not raw:
            return None
        fields = {"complete": "1", **{k.decode(): v.decode() for k, v in raw.items()}}
        for name in ("n_codebooks", "codebook_size", "dim", "users", "bytes"):
            fields[name] = int(fields[name])
        fields["complete"] = fields["complete"] == "1"
        return {name: fields[name] for name in MANIFEST_FIELDS}

    def clear(self, version: str) -> None:
        def delete() -> None:
            batch: list[bytes] = []
            for key in self._user_keys(version):
                batch.append(key)
                if len(batch) == self.SCAN_COUNT:
                    self.client.delete(*batch)
                    batch = []
            if batch:
                self.client.delete(*batch)
            self.client.delete(self.manifest_key(version))

        self._call("deleting states", delete)

    def close(self) -> None:
        self.client.close()


def _columns(con: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}


def is_redis_uri(uri: str | None) -> bool:
    return uri is not None and uri.split("://", 1)[0] in REDIS_SCHEMES


def check_ttl(ttl: int | None, uri: str | None) -> None:
    """Refuse a TTL that Redis would not take, or one for a store that is not Redis (the embedded
    store keeps states until replaced); the CLI calls it before anything is done."""
    if ttl is None:
        return
    if not 1 <= ttl <= MAX_TTL:
        raise DmqnError(f"--ttl must be 1 to {MAX_TTL:,} seconds (what Redis can expire), got {ttl}")
    if not is_redis_uri(uri):
        raise DmqnError("--ttl needs a Redis target (--to redis://...); the embedded store keeps states until replaced")


def open_state_store(
    default_path: Path,
    uri: str | None = None,
    ttl: int | None = None,
    timeout: float = 5.0,
    retries: int | None = None,
) -> EmbeddedStateStore | RedisStateStore:
    """None -> the embedded store at default_path; redis://, rediss://, unix:// -> Redis; else a SQLite file path.

    timeout and retries apply to Redis (see RedisStateStore)."""
    check_ttl(ttl, uri)
    if is_redis_uri(uri):
        return RedisStateStore(uri, ttl=ttl, timeout=timeout, retries=retries)
    if "://" in (uri or ""):
        raise DmqnError(f"unknown state store {redact_uri(uri)!r}: give redis://host:port/db or a file path")
    return EmbeddedStateStore(Path(uri) if uri else default_path)
