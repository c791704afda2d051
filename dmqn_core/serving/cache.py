"""Exporting DMQN's candidate-independent user states and scoring candidates from them (section 2.5).

A state is stored per (model version, user): the version is the run id plus a hash of the
checkpoint's bytes, so a retrained or re-exported model never reads another model's states.
Each user's state is the encoding of their whole history up to their latest behavior (the most
recent max_len behaviors), in the layout of ``state_codec``, in one of the stores of
``state_store`` (an embedded SQLite file by default, or Redis).
"""

from __future__ import annotations

import functools
import hashlib
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmqn_core.config import ModelConfig
from dmqn_core.data.batches import gather_histories, history_lengths
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.devices import AUTO, resolve_device
from dmqn_core.errors import DmqnError
from dmqn_core.models.dmqn.fused_mcqm import map_chunks
from dmqn_core.nn.interest_model import InterestModel
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runs.run import Run, Vocabulary
from dmqn_core.serving.state_codec import DTYPES, DecodedState, decode_state, encode_states, stack_states
from dmqn_core.serving.state_store import StateStore, open_state_store
from dmqn_core.workspace import Workspace

# Candidates scored per call of DMQN.score (see ScoringModel.probabilities); above `dmqn serve`'s
# default --max-items, so that one user's request is always one call.
SCORE_CHUNK = 2048


def model_version(run_id: str, checkpoint: Path) -> str:
    """run id + the first 12 hex digits of the checkpoint's sha256."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    return f"{run_id}-{digest}"


@dataclass
class ExportResult:
    version: str
    store: str  # where the states went (a file path, or a Redis URL with its password hidden)
    users: int  # users written by this call
    total_users: int  # users stored for this version
    bytes: int  # bytes stored for this version
    seconds: float

    @property
    def users_per_s(self) -> float:
        return self.users / max(self.seconds, 1e-9)


def _servable_run(workspace: Workspace, run_id: str | None, device: str) -> tuple[Run, str]:
    """The run (the latest finished one when ``run_id`` is None), checked to have a cacheable user
    state and weights (loaded on ``device``), with the model version its states are stored under."""
    run = Run.open(workspace, run_id)
    if not run.has_codebooks:
        raise DmqnError(
            f"run {run.run_id} trains {run.model_name!r}; only dmqn and dmqn-simple have a cacheable user state"
        )
    run.model(device)  # loaded now: a run without weights, or with damaged ones, fails before any state is read
    return run, model_version(run.run_id, run.best_path)


def cache_path(workspace: Workspace) -> Path:
    return workspace.root / "cache" / "states.sqlite"


def state_store(
    workspace: Workspace,
    uri: str | None = None,
    ttl: int | None = None,
    timeout: float = 5.0,
    retries: int | None = None,
) -> StateStore:
    """The store named by uri (redis://host:port/db or a SQLite file), else the workspace's embedded store;
    timeout and retries apply to Redis (see RedisStateStore)."""
    return open_state_store(cache_path(workspace), uri, ttl=ttl, timeout=timeout, retries=retries)


def export_states(
    workspace: Workspace,
    run_id: str | None = None,
    users: Iterable[int] | None = None,
    dtype: str = "float32",
    batch_size: int = 256,
    resume: bool = False,
    progress: Progress | None = None,
    to: str | None = None,
    ttl: int | None = None,
    device: str = AUTO,
) -> ExportResult:
    """Encode every user (or the given raw user ids) of a DMQN run and store the states.

    to: None (the workspace's embedded store), a SQLite file path or redis://host:port/db;
    ttl: seconds before Redis forgets the states (Redis only); device: where the histories are
    encoded (auto: CUDA where torch sees a GPU), always in fp32.
    """
    if dtype not in DTYPES:
        raise DmqnError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise DmqnError(f"batch size must be at least 1, got {batch_size}")
    progress = progress or NullProgress()
    device = resolve_device(device)
    store = state_store(workspace, to, ttl)
    run, version = _servable_run(workspace, run_id, device)
    model, data = run.model(device), run.data
    index = (
        np.arange(1, data.n_users + 1, dtype=np.int64)
        if users is None
        else data.user_index(np.asarray(list(users), dtype=np.int64), strict=True)
    )
    raw = np.asarray(data.raw_user(index), dtype=np.int64)
    c = model.config
    shape = (c.n_codebooks, c.codebook_size, c.embed_dim)
    existing = store.manifest(version)
    if existing is not None and existing["dtype"] != dtype:
        # One version holds one dtype, so that its manifest describes every value.
        if resume:
            raise DmqnError(
                f"the states of {version} are {existing['dtype']}; export again without --resume "
                f"to replace them with {dtype}"
            )
        store.clear(version)
    store.write_manifest(version, run.run_id, dtype, shape, complete=False)
    if resume:
        done = store.users(version)
        keep = np.array([u not in done for u in raw.tolist()], dtype=bool)
        index, raw = index[keep], raw[keep]
    ends = np.asarray(data.user_offsets[index], dtype=np.int64)  # each user's whole history
    started = time.perf_counter()
    progress.start("export", (len(index) + batch_size - 1) // batch_size)
    with torch.no_grad():
        for begin in range(0, len(index), batch_size):
            users, users_end = index[begin : begin + batch_size], ends[begin : begin + batch_size]
            # Every share pads to the batch's width, as one share would: sums over the padded length
            # may round differently at another width, and the states must not depend on the threads.
            width = max(int(history_lengths(data, users, users_end, run.max_len).max()), 1)
            encode = functools.partial(_encode_share, model, data, users, users_end, run.max_len, width, dtype, device)
            # On the CPU each of torch's threads encodes its share of the batch single-threaded: whole
            # shares scale across cores where the many small ops of one encoding, each split across
            # threads, did not.
            share = -(-len(users) // (torch.get_num_threads() if device == "cpu" else 1))
            values = [value for part in map_chunks(encode, len(users), share, torch.device(device)) for value in part]
            store.put(version, list(zip(raw[begin : begin + batch_size].tolist(), values)))
            progress.advance(1, users_per_s=(begin + len(users)) / max(time.perf_counter() - started, 1e-9))
    progress.stop()
    total, size = store.write_manifest(version, run.run_id, dtype, shape)
    return ExportResult(version, store.describe(), len(index), total, size, time.perf_counter() - started)


def _encode_share(
    model: InterestModel[Any],
    data: PreparedSet,
    users: np.ndarray,
    ends: np.ndarray,
    max_len: int,
    width: int,
    dtype: str,
    device: str,
    h0: int,
    h1: int,
) -> list[bytes]:
    """The stored values of users[h0:h1], their histories ending at ends[h0:h1] and padded to ``width``."""
    histories = gather_histories(data, users[h0:h1], ends[h0:h1], max_len, width)
    item, category, behavior, timestamp, mask = (torch.from_numpy(a).to(device) for a in histories)
    return encode_states(model.encode_user(item, category, behavior, mask, timestamp), dtype)


class ScoringModel:
    """The scoring part of a DMQN run at one model version: CTAM + MLP weights and the vocabularies.

    What CachedScorer and the HTTP service (``http_service``) share, so that both score with the same
    float32 arithmetic: decoded states stacked by ``stack_states``, then ``DMQN.score`` and a sigmoid.
    """

    def __init__(self, workspace: Workspace, run_id: str | None = None, device: str = AUTO) -> None:
        self.device = resolve_device(device)
        self.run, self.version = _servable_run(workspace, run_id, self.device)
        self.model = self.run.model(self.device)
        self.vocabulary = self.run.vocabulary
        c = self.model.config
        self._empty = _empty_state(c)
        self._log_popularity: np.ndarray | None = None

    def candidates(self, item_ids: Iterable[int], strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Raw item ids -> (indices, category indices); an unknown item is a DmqnError when ``strict``,
        else index 0, the padding/unknown embedding, with category 0."""
        index = self.vocabulary.item_index(np.asarray(list(item_ids), dtype=np.int64), strict=strict)
        category = np.asarray(self.vocabulary.item_category[index], dtype=np.int64)
        self._check_indices(index, category)
        return index, category

    def decode(self, user_id: int, value: bytes) -> DecodedState:
        """A stored value as a state of this model; a value that is not one (damaged, or of another model's
        shape) is a DmqnError rather than a shape error inside the model."""
        try:
            state = decode_state(value)
        except ValueError as exc:
            raise DmqnError(f"the cached state of user {user_id} for {self.version} is damaged: {exc}") from None
        c = self.model.config
        if (len(state.codewords), state.recent.shape[0]) != (c.n_codebooks, c.embed_dim):
            raise DmqnError(
                f"the cached state of user {user_id} for {self.version} has {len(state.codewords)} codebooks of "
                f"dimension {state.recent.shape[0]}; the model has {c.n_codebooks} of {c.embed_dim}"
            )
        if (state.short is not None) != (c.short_term == "din"):
            raise DmqnError(
                f"the cached state of user {user_id} for {self.version} "
                f"{'holds' if state.short is not None else 'lacks'} the recent behaviors of a DIN short-term "
                f"interest; the model's short_term is {c.short_term!r}"
            )
        if (state.match is not None) != c.match_features:
            raise DmqnError(
                f"the cached state of user {user_id} for {self.version} "
                f"{'holds' if state.match is not None else 'lacks'} a match table; the model's match_features "
                f"is {'on' if c.match_features else 'off'}"
            )
        if (state.categories is not None) != (c.cluster_categories > 0):
            raise DmqnError(
                f"the cached state of user {user_id} for {self.version} "
                f"{'holds' if state.categories is not None else 'lacks'} the clusters' categories; the model's "
                f"cluster_categories is {c.cluster_categories}"
            )
        return state

    @property
    def empty_state(self) -> DecodedState:
        """A user without history: no clusters, zero recent mean."""
        return self._empty

    def probabilities(
        self, states: list[DecodedState], index: np.ndarray, category: np.ndarray, state_index: np.ndarray
    ) -> np.ndarray:
        """Click probabilities of candidates (index, category) against states[state_index[b]] -> (B,) float32.

        At most SCORE_CHUNK candidates go through the model at a time: DMQN.score gives every candidate
        its own copy of its user's clusters, (B, N, W, D) floats, 16 MB per 1,000 candidates at the
        default N = 4, W = 32, D = 32, which a batch of many users would otherwise multiply into gigabytes.
        """
        state = stack_states(states, self.device)
        index_t, category_t, rows_t = (torch.from_numpy(a).to(self.device) for a in (index, category, state_index))
        # Match features read the candidates' popularity now: their behaviors in the whole set.
        popularity = torch.from_numpy(np.asarray(self.vocabulary.item_popularity[index], dtype=np.int64)).to(
            self.device
        )
        out = np.empty(len(index), dtype=np.float32)
        with torch.inference_mode():  # the arithmetic of no_grad, without its per-op version tracking
            for begin in range(0, len(index), SCORE_CHUNK):
                chunk = slice(begin, begin + SCORE_CHUNK)
                logits = self.model.score(state, index_t[chunk], category_t[chunk], rows_t[chunk], popularity[chunk])
                out[chunk] = torch.sigmoid(logits).cpu().numpy()
        return out

    def popularity(self, index: np.ndarray) -> np.ndarray:
        """The history-free baseline's scores (sigmoid of log(1 + training popularity), the popularity
        model's logit): a ranking of the candidates, not a calibrated click probability."""
        if self._log_popularity is None:
            counts = np.asarray(self.vocabulary.item_popularity, dtype=np.float32)
            self._log_popularity = np.log1p(counts)
        with torch.no_grad():
            return torch.sigmoid(torch.from_numpy(self._log_popularity[index])).numpy()

    def _check_indices(self, index: np.ndarray, category: np.ndarray) -> None:
        """Refuse indices past the model's embeddings, which would fail inside it: a run folder's
        vocabularies are checked when read, a prepared set's (runs from before the copy) are not."""
        c = self.model.config
        if not index.size or (index.max() < c.n_items and 0 <= category.min() <= category.max() < c.n_categories):
            return
        vocabulary = self.vocabulary
        file = vocabulary.path / (
            "item_category.npy" if isinstance(vocabulary, Vocabulary) else "vocab/item_category.npy"
        )
        raise DmqnError(
            f"{file} does not match run {self.run.run_id}'s model ({c.n_items - 1:,} items, "
            f"{c.n_categories - 1:,} categories): an item or its category is out of range"
        )


class CachedScorer:
    """Scores candidates for a user from the stored state: CTAM + MLP only, no history needed.

    It reads the run folder (weights and vocabularies) and the state store only, so it serves
    where the prepared training set is not (a run trained before the run folder kept the
    vocabularies reads them from the prepared set).

    >>> scorer = CachedScorer(Workspace("dmqn-workspace"))          # the latest run
    >>> scorer.score(user_id=123, item_ids=[5, 17, 42])             # numpy array of probabilities
    >>> CachedScorer(Workspace("dmqn-workspace"), source="redis://localhost:6379/0")

    source: None (the workspace's embedded store), a SQLite file path or redis://host:port/db.
    The scorer holds its store open (one read-only SQLite connection or one Redis client).
    device: where CTAM + MLP run (auto: CUDA where torch sees a GPU), in fp32.
    """

    def __init__(
        self, workspace: Workspace, run_id: str | None = None, source: str | None = None, device: str = AUTO
    ) -> None:
        # The run first: a run that cannot be served leaves no store connection open behind it.
        self.scoring = ScoringModel(workspace, run_id, device)
        self.run, self.version = self.scoring.run, self.scoring.version
        self.model, self.vocabulary = self.scoring.model, self.scoring.vocabulary
        self.store = state_store(workspace, source)
        manifest = self.store.manifest(self.version)
        if manifest is None:
            self.store.close()
            raise DmqnError(
                f"no exported states for run {self.run.run_id} at this checkpoint in "
                f"{self.store.describe()} (version {self.version}); run "
                f"`dmqn export-cache {self.run.run_id}`"
            )
        self.manifest = manifest

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> CachedScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, user_id: int, item_ids: Iterable[int]) -> np.ndarray:
        """Click probabilities of the items (raw ids) for the user (raw id).

        An unknown item is an error. A user without a stored state is scored with an empty
        long-term state (no clusters, zero recent mean), with a warning.
        """
        index, category = self.scoring.candidates(item_ids)
        value = self.store.get(self.version, [user_id]).get(int(user_id))
        if value is None:
            warnings.warn(
                f"user {user_id} has no cached state for {self.version} in {self.store.describe()}; "
                "scoring with an empty history",
                stacklevel=2,
            )
            state = self.scoring.empty_state
        else:
            state = self.scoring.decode(user_id, value)
        return self.scoring.probabilities([state], index, category, np.zeros(len(index), dtype=np.int64))


def _empty_state(c: ModelConfig) -> DecodedState:
    """The state of a user without history under model config c: no clusters, zero recent mean."""
    empty = np.zeros(0, dtype=np.int64)
    no_features = np.zeros((0, 3), np.float32)
    T = c.cluster_categories
    return DecodedState(
        np.zeros(c.embed_dim, np.float32),
        np.zeros((0, c.embed_dim), np.float32) if c.short_term == "din" else None,
        [empty] * c.n_codebooks,
        [empty] * c.n_codebooks,
        [np.zeros((0, c.embed_dim), np.float32)] * c.n_codebooks,
        (empty, no_features, empty, no_features) if c.match_features else None,
        [np.zeros((0, T), np.int64)] * c.n_codebooks if T else None,
        [np.zeros((0, T), np.float32)] * c.n_codebooks if T else None,
    )
