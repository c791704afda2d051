"""Exporting DMQN's candidate-independent user states and scoring candidates from them (section 2.5).

A state is stored per (model version, user): the version is the run id plus a hash of the
checkpoint's bytes, so a retrained or re-exported model never reads another model's states.
Each user's state is the encoding of their whole history up to their latest behavior (the most
recent max_len behaviors), in the layout of ``state_codec``.

The embedded store is one DuckDB file in the workspace (``cache/states.duckdb``): table
``states`` (version, user_id, value BLOB) and table ``manifest`` (one row per version: run,
dtype, shapes, users, bytes, creation time). A batch of users is written in one transaction, so
a kill never leaves a user's value half-written.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import duckdb
import numpy as np
import torch

from dmqn_core.batches import gather_histories
from dmqn_core.dmqn import DMQN
from dmqn_core.errors import DmqnError
from dmqn_core.evaluate import load_run_model
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.state_codec import DTYPES, DecodedState, decode_state, encode_states, stack_states
from dmqn_core.workspace import Workspace

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


def model_version(run_id: str, checkpoint: Path) -> str:
    """run id + the first 12 hex digits of the checkpoint's sha256."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    return f"{run_id}-{digest}"


class EmbeddedStateStore:
    """States in one DuckDB file; a connection per call, like the run store."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        if read_only and not self.path.exists():
            raise DmqnError(f"no state cache at {self.path} (run `dmqn export-cache` first)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.path), read_only=read_only)
        if not read_only:
            for sql in SCHEMA:
                con.execute(sql)
        return con

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
        con = self._connect(read_only=True)
        try:
            return {r[0] for r in con.execute("SELECT user_id FROM states WHERE version = ?", [version]).fetchall()}
        finally:
            con.close()

    def get(self, version: str, user_ids: Iterable[int]) -> dict[int, bytes]:
        ids = [int(u) for u in user_ids]
        con = self._connect(read_only=True)
        try:
            rows = con.execute("SELECT user_id, value FROM states WHERE version = ? AND list_contains(?, user_id)",
                               [version, ids]).fetchall()
        finally:
            con.close()
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
        con = self._connect(read_only=True)
        try:
            row = con.execute("SELECT run_id, dtype, n_codebooks, codebook_size, dim, users, bytes "
                              "FROM manifest WHERE version = ?", [version]).fetchone()
        finally:
            con.close()
        keys = ("run_id", "dtype", "n_codebooks", "codebook_size", "dim", "users", "bytes")
        return dict(zip(keys, row)) if row else None


@dataclass
class ExportResult:
    version: str
    users: int          # users written by this call
    total_users: int    # users stored for this version
    bytes: int          # bytes stored for this version
    seconds: float

    @property
    def users_per_s(self) -> float:
        return self.users / max(self.seconds, 1e-9)


def _dmqn_run(workspace: Workspace, run_id: str | None, device: str = "cpu"):
    model, record, data = load_run_model(workspace, run_id, device)
    if not isinstance(model, DMQN):
        raise DmqnError(f"run {record.run_id} trains {record.model!r}; only dmqn and dmqn-simple have a cacheable "
                        "user state")
    version = model_version(record.run_id, workspace.run_dir(record.run_id) / "best.pt")
    return model, record, data, version


def cache_path(workspace: Workspace) -> Path:
    return workspace.root / "cache" / "states.duckdb"


def export_states(workspace: Workspace, run_id: str | None = None, users: Iterable[int] | None = None,
                  dtype: str = "float32", batch_size: int = 256, resume: bool = False,
                  progress: Progress | None = None) -> ExportResult:
    """Encode every user (or the given raw user ids) of a DMQN run and store the states."""
    if dtype not in DTYPES:
        raise DmqnError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise DmqnError(f"batch size must be at least 1, got {batch_size}")
    progress = progress or NullProgress()
    model, record, data, version = _dmqn_run(workspace, run_id)
    store = EmbeddedStateStore(cache_path(workspace))
    index = (np.arange(1, data.n_users + 1, dtype=np.int64) if users is None
             else data.user_index(np.asarray(list(users), dtype=np.int64), strict=True))
    raw = np.asarray(data.raw_user(index), dtype=np.int64)
    c = model.config
    shape = (c.n_codebooks, c.codebook_size, c.embed_dim)
    existing = store.manifest(version)
    if existing is not None and existing["dtype"] != dtype:
        # One version holds one dtype, so that its manifest describes every value.
        if resume:
            raise DmqnError(f"the states of {version} are {existing['dtype']}; export again without --resume "
                            f"to replace them with {dtype}")
        store.clear(version)
    store.write_manifest(version, record.run_id, dtype, shape)
    if resume:
        done = store.users(version)
        keep = np.array([u not in done for u in raw.tolist()], dtype=bool)
        index, raw = index[keep], raw[keep]
    max_len = int(record.params["train"]["max_len"])
    ends = np.asarray(data.user_offsets[index], dtype=np.int64)  # each user's whole history
    started = time.perf_counter()
    progress.start("export", (len(index) + batch_size - 1) // batch_size)
    with torch.no_grad():
        for begin in range(0, len(index), batch_size):
            chunk = slice(begin, begin + batch_size)
            item, category, behavior, _, mask = gather_histories(data, index[chunk], ends[chunk], max_len)
            state = model.encode_user(torch.from_numpy(item), torch.from_numpy(category),
                                      torch.from_numpy(behavior), torch.from_numpy(mask))
            store.put(version, list(zip(raw[chunk].tolist(), encode_states(state, dtype))))
            progress.advance(1, users_per_s=(begin + len(raw[chunk])) / max(time.perf_counter() - started, 1e-9))
    progress.stop()
    total, size = store.write_manifest(version, record.run_id, dtype, shape)
    return ExportResult(version, len(index), total, size, time.perf_counter() - started)


class CachedScorer:
    """Scores candidates for a user from the stored state: CTAM + MLP only, no history needed.

    >>> scorer = CachedScorer(Workspace("dmqn-workspace"))          # the latest run
    >>> scorer.score(user_id=123, item_ids=[5, 17, 42])             # numpy array of probabilities
    """

    def __init__(self, workspace: Workspace, run_id: str | None = None) -> None:
        self.model, self.record, self.data, self.version = _dmqn_run(workspace, run_id)
        self.store = EmbeddedStateStore(cache_path(workspace))
        manifest = self.store.manifest(self.version)
        if manifest is None:
            raise DmqnError(f"no exported states for run {self.record.run_id} at this checkpoint "
                            f"(version {self.version}); run `dmqn export-cache {self.record.run_id}`")
        self.manifest = manifest

    def score(self, user_id: int, item_ids: Iterable[int]) -> np.ndarray:
        """Click probabilities of the items (raw ids) for the user (raw id).

        An unknown item is an error. A user without a stored state is scored with an empty
        long-term state (no clusters, zero recent mean), with a warning.
        """
        items = np.asarray(list(item_ids), dtype=np.int64)
        index = self.data.item_index(items, strict=True)
        value = self.store.get(self.version, [user_id]).get(int(user_id))
        if value is None:
            warnings.warn(f"user {user_id} has no cached state for {self.version}; scoring with an empty history",
                          stacklevel=2)
            c = self.model.config
            state = stack_states([_empty_state(c.n_codebooks, c.embed_dim)])
        else:
            state = stack_states([decode_state(value)])
        with torch.no_grad():
            idx = torch.from_numpy(index)
            logits = self.model.score(state, idx, torch.from_numpy(np.asarray(self.data.item_category[index],
                                                                               dtype=np.int64)),
                                      torch.zeros(len(index), dtype=torch.long))
        return torch.sigmoid(logits).numpy()


def _empty_state(n_codebooks: int, dim: int) -> DecodedState:
    empty = np.zeros(0, dtype=np.int64)
    return DecodedState(np.zeros(dim, np.float32), [empty] * n_codebooks, [empty] * n_codebooks,
                        [np.zeros((0, dim), np.float32)] * n_codebooks)
