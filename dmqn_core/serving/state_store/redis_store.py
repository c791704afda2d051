"""The Redis store (`--to redis://...`): states as strings and the manifest as a hash, written in pipelines."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar, cast

from dmqn_core.errors import DmqnError
from dmqn_core.serving.state_store.contract import MANIFEST_FIELDS, check_ttl
from dmqn_core.uris import quote_userinfo, redact_uri, scrub, uri_secrets

if TYPE_CHECKING:  # redis-py is imported where Redis is used, so the embedded store works without it
    from redis.typing import EncodableT

T = TypeVar("T")


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
        import redis.exceptions  # redis-py; imported here so the embedded store works without touching it
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

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
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
        keys = [self.key(version, u) for u in ids]
        # bytes: the client decodes nothing (redis-py types its answers bytes | str, whatever the client).
        values = cast("list[bytes | None]", self._call("reading states", self.client.mget, keys))
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
        fields: dict[EncodableT, EncodableT] = {  # as redis-py's hset takes them
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
        key = self.manifest_key(version)
        # bytes: the client decodes nothing (redis-py types its answers bytes | str, whatever the client).
        raw = cast("dict[bytes, bytes]", self._call("reading the manifest", self.client.hgetall, key))
        if not raw:
            return None
        fields: dict[str, Any] = {"complete": "1", **{k.decode(): v.decode() for k, v in raw.items()}}
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
