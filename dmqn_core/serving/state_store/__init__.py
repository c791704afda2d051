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

The package: ``contract`` (the StateStore protocol, the manifest's fields, the TTL rule), ``embedded``
(EmbeddedStateStore) and ``redis_store`` (RedisStateStore); ``open_state_store`` picks one by the target.
"""

from __future__ import annotations

from pathlib import Path

from dmqn_core.errors import DmqnError
from dmqn_core.serving.state_store.contract import (
    MANIFEST_FIELDS,
    MAX_TTL,
    REDIS_SCHEMES,
    StateStore,
    check_ttl,
    is_redis_uri,
)
from dmqn_core.serving.state_store.embedded import SCHEMA, EmbeddedStateStore
from dmqn_core.serving.state_store.redis_store import RedisStateStore
from dmqn_core.uris import redact_uri

__all__ = [
    "MANIFEST_FIELDS",
    "MAX_TTL",
    "REDIS_SCHEMES",
    "SCHEMA",
    "EmbeddedStateStore",
    "RedisStateStore",
    "StateStore",
    "check_ttl",
    "is_redis_uri",
    "open_state_store",
]


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
    if uri is not None and "://" in uri:
        raise DmqnError(f"unknown state store {redact_uri(uri)!r}: give redis://host:port/db or a file path")
    return EmbeddedStateStore(Path(uri) if uri else default_path)
