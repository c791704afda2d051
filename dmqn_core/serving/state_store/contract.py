"""What every state store is: the StateStore protocol, the fields of a version's manifest, and which targets are
Redis (with the TTL Redis can take)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeGuard

from dmqn_core.errors import DmqnError

# Redis keeps an expire time as milliseconds since the epoch in a signed 64-bit integer and answers
# "invalid expire time" (SET ... EX, EXPIRE) when TTL * 1000 + now does not fit, i.e. from about
# 9.22e15 seconds on, less the time since 1970. 10**15 seconds (31 million years) leaves room for any clock.
MAX_TTL = 10**15

REDIS_SCHEMES = ("redis", "rediss", "unix")

MANIFEST_FIELDS = ("run_id", "dtype", "n_codebooks", "codebook_size", "dim", "users", "bytes", "created_at", "complete")


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


def is_redis_uri(uri: str | None) -> TypeGuard[str]:
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
