"""What ``dmqn serve`` does per request, apart from HTTP: which model version is served, reading states
from the store with a bounded wait, and scoring many users' candidates as one batch.

One ScoringService per process. Requests run on a thread pool, so the served model is one immutable
``Served`` snapshot that a request reads once and a reload replaces whole (an attribute assignment):
a request never sees half of a switch. Stores are opened per thread, because a SQLite connection
belongs to the thread that opened it (a Redis client would be safe to share, one per thread costs a
connection each and keeps one code path).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from dmqn_core.devices import AUTO
from dmqn_core.errors import DmqnError
from dmqn_core.serving.cache import ScoringModel, model_version, state_store
from dmqn_core.serving.state_codec import DecodedState
from dmqn_core.serving.state_store import StateStore
from dmqn_core.workspace import Workspace

Missing = Literal["error", "popularity"]
T = TypeVar("T")


class ServiceError(Exception):
    """A request the service answers with an error status and a one-line JSON reason."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class StoreUnavailable(ServiceError):
    def __init__(self, detail: str) -> None:
        super().__init__(503, "store_unavailable", detail)


@dataclass(frozen=True)
class Served:
    """The model version being served: its scoring part and the manifest of its finished export."""

    scoring: ScoringModel
    manifest: dict

    @property
    def version(self) -> str:
        return self.scoring.version

    @property
    def run_id(self) -> str:
        return self.scoring.run.run_id


@dataclass
class UserScores:
    user_id: int
    source: Literal["model", "popularity"]  # popularity: no cached state, the caller chose ?missing=popularity
    item_ids: list[int]
    probabilities: list[float]
    unknown_items: list[int]  # not in the run's vocabulary: scored with the unknown-item (padding) embedding


@dataclass
class ReloadResult:
    switched: bool
    version: str
    previous_version: str
    detail: str


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store raises when it cannot answer: DmqnError (a lost connection, a SQLite file problem),
    or a Redis error that redis-py does not count as a connection error (a server still loading its data)."""
    try:
        import redis.exceptions
    except ImportError:  # the embedded store alone needs no redis-py
        return (DmqnError,)
    return DmqnError, redis.exceptions.RedisError


class ScoringService:
    """Serves one run: the version of its current checkpoint whose export has finished.

    store_timeout bounds every store call: Redis gets that long to connect and to answer, with one
    immediate retry (which reconnects after a Redis restart), so a request waits at most about
    2 x store_timeout before a 503.
    """

    def __init__(
        self,
        workspace: Workspace,
        run_id: str | None = None,
        source: str | None = None,
        store_timeout: float = 1.0,
        device: str = AUTO,
    ) -> None:
        self.workspace, self.source, self.store_timeout, self.device = workspace, source, store_timeout, device
        self._local = threading.local()
        self._stores: list[StateStore] = []
        self._lock = threading.Lock()  # guards _stores
        # Reloads one at a time; a lock of its own, as a reload opens this thread's store, which takes _lock.
        self._reload_lock = threading.Lock()
        self.on_lookup: Callable[[int, int], None] = lambda found, absent: None  # metrics hooks
        self.on_store_error: Callable[[], None] = lambda: None
        self._store_errors = _store_errors()
        self._down_until, self._down_reason = 0.0, ""  # see read()
        try:
            scoring = ScoringModel(workspace, run_id, device)
            self.run_id = scoring.run.run_id  # a service serves one run; RUN_ID None means the latest at start
            self._checkpoint = scoring.run.best_path
            self._seen = _file_identity(self._checkpoint)
            try:  # named in messages by a description that needs no working connection (never with a password)
                self.store_name = self.read(lambda store: store.describe())
            except StoreUnavailable as exc:
                raise DmqnError(exc.detail) from None
            self.current = Served(scoring, self._finished_manifest(scoring.version, startup=True))
        except BaseException:
            self.close()
            raise

    # ---- stores ----

    def _store(self) -> StateStore:
        """This thread's store, opened on first use."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = state_store(self.workspace, self.source, timeout=self.store_timeout, retries=1)
            with self._lock:
                self._stores.append(store)
            self._local.store = store
        return store

    def read(self, call: Callable[[StateStore], T]) -> T:
        """call(this thread's store); a store that fails, or failed less than store_timeout seconds ago, is a 503.

        After a failure the store is left alone for store_timeout seconds and requests answer 503 at once:
        otherwise, with Redis hung, every request would wait out the timeouts of those queued before it
        on the thread pool. The first request after the pause tries the store again.
        """
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(self._down_reason)
        try:
            return call(self._store())
        except self._store_errors as exc:
            self._down_reason = str(exc)
            self._down_until = time.monotonic() + self.store_timeout
            self.on_store_error()
            raise StoreUnavailable(self._down_reason) from None

    def _finished_manifest(self, version: str, startup: bool = False) -> dict:
        """The manifest of version's finished export; a DmqnError naming what is missing otherwise."""
        try:
            manifest = self.read(lambda store: store.manifest(version))
        except StoreUnavailable as exc:
            raise DmqnError(exc.detail) from None
        if manifest is None:
            raise DmqnError(
                f"no exported states for run {self.run_id} at {'this' if startup else 'its new'} checkpoint "
                f"(version {version}) in {self.store_name}; run `dmqn export-cache {self.run_id}`"
            )
        if not manifest["complete"]:
            raise DmqnError(f"the export of {version} to {self.store_name} has not finished")
        return manifest

    def close(self) -> None:
        with self._lock:
            for store in self._stores:
                store.close()
            self._stores.clear()

    # ---- versions ----

    def reload(self) -> ReloadResult:
        """Switch to the run's current checkpoint if it is not the one served and its export has finished.

        Cheap when nothing changed (a stat of best.pt). A newer checkpoint without a finished export is a
        ServiceError 409, and the old version keeps being served; a checkpoint replaced while it was
        being loaded is not switched to (the version names the bytes that were loaded).
        """
        with self._reload_lock:
            previous = self.current.version
            identity = _file_identity(self._checkpoint)
            if identity == self._seen:
                return ReloadResult(False, previous, previous, "the checkpoint has not changed")
            try:
                version = model_version(self.run_id, self._checkpoint)
            except OSError as exc:
                raise ServiceError(409, "reload_refused", f"cannot read {self._checkpoint}: {exc.strerror}") from None
            if version == previous:
                self._seen = identity
                return ReloadResult(False, previous, previous, "the checkpoint's bytes are those served")
            manifest = self.read(lambda store: store.manifest(version))
            if manifest is None or not manifest["complete"]:
                state = "has no exported states" if manifest is None else "is still being exported"
                raise ServiceError(
                    409, "reload_refused", f"version {version} {state} in {self.store_name}; still serving {previous}"
                )
            try:
                scoring = ScoringModel(self.workspace, self.run_id, self.device)
            except DmqnError as exc:
                raise ServiceError(409, "reload_refused", f"{exc}; still serving {previous}") from None
            if scoring.version != version:
                raise ServiceError(
                    409, "reload_refused", f"the checkpoint changed while it was loaded; still serving {previous}"
                )
            self.current = Served(scoring, manifest)
            self._seen = identity
            return ReloadResult(True, version, previous, f"switched from {previous} to {version}")

    def ready(self) -> None:
        """Raise StoreUnavailable unless the store answers and still holds the served version's export."""
        served = self.current
        manifest = self.read(lambda store: store.manifest(served.version))
        if manifest is None or not manifest["complete"]:
            state = "no longer holds" if manifest is None else "is rewriting"
            raise StoreUnavailable(f"{self.store_name} {state} the states of {served.version}")

    # ---- scoring ----

    def score(self, requests: list[tuple[int, list[int]]], missing: Missing) -> tuple[Served, list[UserScores]]:
        """Score each (user id, item ids) of requests, all users' candidates as one batch.

        Returns the version served and the scores in request order. A user without a state is a 404
        (missing="error") or gets the items' popularity scores, flagged (missing="popularity").
        """
        served = self.current  # read once: a reload during this request does not change what it uses
        scoring = served.scoring
        users = list(dict.fromkeys(user for user, _ in requests))
        values = self.read(lambda store: store.get(served.version, users))
        absent = [user for user in users if user not in values]
        self.on_lookup(len(values), len(absent))
        if absent and missing == "error":
            shown = ", ".join(str(u) for u in absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
            raise ServiceError(
                404,
                "unknown_user",
                f"no cached state for user {shown} in version {served.version} (ask with ?missing=popularity "
                "for the items' popularity instead)",
            )
        try:
            states: dict[int, DecodedState] = {user: scoring.decode(user, value) for user, value in values.items()}
        except DmqnError as exc:
            raise ServiceError(500, "damaged_state", str(exc)) from None
        sizes = [len(items) for _, items in requests]
        all_items = [item for _, items in requests for item in items]
        index, category = scoring.candidates(all_items, strict=False)
        owner = np.repeat(np.arange(len(requests)), sizes)
        with_state = np.array([user in states for user, _ in requests], dtype=bool)[owner]
        probabilities = np.empty(len(all_items), dtype=np.float32)
        if with_state.any():
            rows = {user: row for row, user in enumerate(states)}
            state_index = np.array([rows[requests[r][0]] for r in owner[with_state]], dtype=np.int64)
            probabilities[with_state] = scoring.probabilities(
                list(states.values()), index[with_state], category[with_state], state_index
            )
        if not with_state.all():
            probabilities[~with_state] = scoring.popularity(index[~with_state])
        unknown = index == 0  # 0: padding, where the vocabulary puts an item it does not know
        results, begin = [], 0
        values_list, unknown_list = probabilities.tolist(), unknown.tolist()
        for (user, items), size in zip(requests, sizes):
            end = begin + size
            results.append(
                UserScores(
                    user,
                    "model" if user in states else "popularity",
                    items,
                    values_list[begin:end],
                    [item for item, flag in zip(items, unknown_list[begin:end]) if flag],
                )
            )
            begin = end
        return served, results


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of path: a replaced or rewritten checkpoint changes it; None if it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
