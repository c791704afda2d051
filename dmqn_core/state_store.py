"""Where exported user states live: an embedded DuckDB file or a Redis server.

Both stores hold, per model version (run id + checkpoint hash), one value per user in the layout
of ``state_codec``, plus a manifest describing the version. Writing a user's value is atomic in
both (a transaction per batch in DuckDB, one SET per key in Redis), so an interrupted export
never leaves a half-written user, only users that are missing, which ``--resume`` fills in.

Embedded (the default, ``WORKSPACE/cache/states.duckdb``, no server)::

    manifest(version PK, run_id, dtype, n_codebooks, codebook_size, dim, users, bytes, created_at)
    states(version, user_id, value BLOB)   PRIMARY KEY (version, user_id)

Redis (``--to redis://host:port/db``)::

    dmqn:<version>:<user_id>    string, the packed state
    dmqn:manifest:<version>     hash: run_id, dtype, n_codebooks, codebook_size, dim, users, bytes, created_at
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Protocol

import duckdb

from dmqn_core.errors import DmqnError

MANIFEST_FIELDS = ("run_id", "dtype", "n_codebooks", "codebook_size", "dim", "users", "bytes", "created_at")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS manifest (
        version       VARCHAR PRIMARY KEY,  -- run id + checkpoint hash
        run_id        VARCHAR NOT NULL,
        dtype         VARCHAR NOT NULL,     -- float32 | float16
        n_codebooks   INTEGER NOT NULL,
        codebook_size INTEGER NOT NULL,
        dim           INTEGER NOT NULL,
        users         BIGINT NOT NULL,
        bytes         BIGINT NOT NULL,
        created_at    TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS states (
        version  VARCHAR NOT NULL,
        user_id  BIGINT NOT NULL,           -- the raw user id of the log
        value    BLOB NOT NULL,             -- see dmqn_core.state_codec
        PRIMARY KEY (version, user_id)
    )""",
]


class StateStore(Protocol):
    """What export and scoring need from a store; ``describe`` names it in messages."""

    def describe(self) -> str: ...

    def put(self, version: str, rows: list[tuple[int, bytes]]) -> None: ...

    def users(self, version: str) -> set[int]: ...

    def get(self, version: str, user_ids: Iterable[int]) -> dict[int, bytes]: ...

    def write_manifest(self, version: str, run_id: str, dtype: str, shape: tuple[int, int, int]) -> tuple[int, int]: ...

    def manifest(self, version: str) -> dict | None: ...

    def clear(self, version: str) -> None: ...

    def close(self) -> None: ...


class EmbeddedStateStore:
    """States in one DuckDB file.

    Writers open the file for one batch and close it again, so an export can run while other
    processes read between its batches. A reader built with ``keep_open=True`` (a scorer in a
    service) holds one read-only connection instead, which is what makes a lookup cost
    microseconds rather than a file open; while it is held, DuckDB's file lock makes writers in
    other processes wait (fail), so serve from Redis when exports must run beside the service.
    """

    def __init__(self, path: Path, keep_open: bool = False) -> None:
        self.path = Path(path)
        self.keep_open = keep_open
        self._reader: duckdb.DuckDBPyConnection | None = None

    def describe(self) -> str:
        return str(self.path)

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        if read_only and not self.path.exists():
            raise DmqnError(f"no state cache at {self.path} (run `dmqn export-cache` first)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.path), read_only=read_only)
        if not read_only:
            for sql in SCHEMA:
                con.execute(sql)
        return con

    def _read(self, sql: str, params: list) -> list[tuple]:
        if self.keep_open:
            if self._reader is None:
                self._reader = self._connect(read_only=True)
            return self._reader.execute(sql, params).fetchall()
        con = self._connect(read_only=True)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def put(self, version: str, rows: list[tuple[int, bytes]]) -> None:
        """Write (user_id, value) rows in one transaction, replacing earlier values of the same version."""
        con = self._connect(read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            con.executemany("INSERT OR REPLACE INTO states VALUES (?, ?, ?)",
                            [[version, int(u), v] for u, v in rows])
            con.execute("COMMIT")
        finally:
            con.close()

    def users(self, version: str) -> set[int]:
        if not self.path.exists():
            return set()
        return {r[0] for r in self._read("SELECT user_id FROM states WHERE version = ?", [version])}

    def get(self, version: str, user_ids: Iterable[int]) -> dict[int, bytes]:
        ids = [int(u) for u in user_ids]
        if len(ids) == 1:  # the serving path: a point lookup on the primary key
            rows = self._read("SELECT user_id, value FROM states WHERE version = ? AND user_id = ?", [version, ids[0]])
        else:
            rows = self._read("SELECT user_id, value FROM states WHERE version = ? AND list_contains(?, user_id)",
                              [version, ids])
        return {u: bytes(v) for u, v in rows}

    def write_manifest(self, version: str, run_id: str, dtype: str, shape: tuple[int, int, int]) -> tuple[int, int]:
        """Record (or refresh) a version's manifest from what is stored; returns (users, bytes)."""
        con = self._connect(read_only=False)
        try:
            users, size = con.execute("SELECT count(*), coalesce(sum(octet_length(value)), 0) FROM states "
                                      "WHERE version = ?", [version]).fetchone()
            con.execute("INSERT OR REPLACE INTO manifest VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [version, run_id, dtype, *shape, users, size, datetime.now(timezone.utc)])
            return int(users), int(size)
        finally:
            con.close()

    def clear(self, version: str) -> None:
        con = self._connect(read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute("DELETE FROM states WHERE version = ?", [version])
            con.execute("DELETE FROM manifest WHERE version = ?", [version])
            con.execute("COMMIT")
        finally:
            con.close()

    def manifest(self, version: str) -> dict | None:
        if not self.path.exists():
            return None
        rows = self._read(f"SELECT {', '.join(MANIFEST_FIELDS)} FROM manifest WHERE version = ?", [version])
        return dict(zip(MANIFEST_FIELDS, rows[0])) if rows else None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class RedisStateStore:
    """States in a Redis server: ``dmqn:<version>:<user_id>`` strings and a ``dmqn:manifest:<version>`` hash.

    Batches go out as non-transactional pipelines (one round trip per batch; a transaction would
    buy nothing, as every SET is atomic on its own). With ``ttl`` every state and the manifest
    expire after that many seconds.
    """

    SCAN_COUNT = 10_000

    def __init__(self, url: str, ttl: int | None = None, timeout: float = 5.0) -> None:
        import redis  # redis-py; imported here so the embedded store works without touching it

        self.url = url
        self.ttl = ttl
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        try:
            self.client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
            self.client.ping()
        except ValueError as exc:
            raise DmqnError(f"not a Redis URL: {url} ({exc})") from None
        except self._errors as exc:
            raise DmqnError(f"cannot reach Redis at {url}: {exc}") from None
        except redis.exceptions.RedisError as exc:
            raise DmqnError(f"Redis at {url} refused the connection: {exc}") from None

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
            raise DmqnError(f"lost the connection to Redis at {self.url} while {what}: {exc}") from None

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
            if key[len(prefix):].lstrip(b"-").isdigit():
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

    def write_manifest(self, version: str, run_id: str, dtype: str, shape: tuple[int, int, int]) -> tuple[int, int]:
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
        fields = {"run_id": run_id, "dtype": dtype, "n_codebooks": n_codebooks, "codebook_size": codebook_size,
                  "dim": dim, "users": users, "bytes": size, "created_at": datetime.now(timezone.utc).isoformat()}

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
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        for name in ("n_codebooks", "codebook_size", "dim", "users", "bytes"):
            fields[name] = int(fields[name])
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


def open_state_store(default_path: Path, uri: str | None = None, ttl: int | None = None,
                     keep_open: bool = False) -> EmbeddedStateStore | RedisStateStore:
    """None -> the embedded store at default_path; redis://, rediss://, unix:// -> Redis; else a DuckDB file path."""
    if ttl is not None and ttl < 1:
        raise DmqnError(f"--ttl must be a positive number of seconds, got {ttl}")
    if uri is not None and uri.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return RedisStateStore(uri, ttl=ttl)
    if "://" in (uri or ""):
        raise DmqnError(f"unknown state store {uri!r}: give redis://host:port/db or a .duckdb file path")
    if ttl is not None:
        raise DmqnError("--ttl needs a Redis target (--to redis://...); the embedded store keeps states until replaced")
    return EmbeddedStateStore(Path(uri) if uri else default_path, keep_open=keep_open)
