"""Codebook inspection: what a DMQN run's codebooks make of one user, for ``dmqn inspect`` and ``dmqn report``.

A UserInspection holds the history the model encoded for a user, the codeword of each behavior in
every codebook, the user's test candidates with their predicted click probability, and the CTAM
attention of each candidate over the clusters. At the end of a dmqn / dmqn-simple training
(``record_inspection``) a seeded sample of users with test samples is written to the run store,
together with the codebooks and a bounded sample of item embeddings; ``RunInspector`` reads them
back, and computes any other user from the run's best checkpoint on demand.

Which history
-------------
The model scores a test sample against the behaviors strictly before the sample's time (its
``hist_end``, see dmqn_core.data.prepared), cut to the run's ``max_len``. Under the ``dmqn prep``
protocol every test sample of a user shares one ``hist_end`` (one test click per user, whose
negatives share its history), so an inspection shows that history and its scores are the test
predictions of the best checkpoint. Should a set give a user test samples with different history
ends, the latest end and the samples that use it are shown. A user without test samples is shown
with the whole history (its last ``max_len`` behaviors, as ``dmqn export-cache`` encodes it) and
no candidates.

Recorded and on-demand inspections come from the same function (``compute_inspections``), one
user at a time, so no padding is shared with other users and a recorded user's stored inspection
equals the one computed on demand.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dmqn_core.config import ModelConfig
from dmqn_core.data.batches import gather_histories
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.models.dmqn.model import DMQN
from dmqn_core.models.registry import has_codebooks
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RunRecord, RunStore
from dmqn_core.workspace import Workspace

# Item embeddings recorded for the projection plots: the most frequent items, at most this many.
MAX_ITEM_VECTORS = 5000
# Users per write transaction: about 200k behavior rows at L = 1000 and N = 4, written in well
# under a second, so a reader waits at most that long for the file.
RECORD_BATCH_USERS = 50


@dataclass
class ClusterSummary:
    codeword: int  # codeword index 0..W-1
    size: int  # behaviors of this user assigned to it
    top_categories: list[tuple[int, int]]  # up to 3 (raw category id, count), most frequent first
    first_timestamp: int  # unix seconds of the oldest member behavior
    last_timestamp: int  # unix seconds of the newest member behavior


@dataclass
class UserInspection:
    run_id: str
    user_id: int  # raw user id of the log
    recorded: bool  # True: read from the run store's sample; False: computed from the checkpoint
    n_codebooks: int  # N
    codebook_size: int  # W
    timestamp: np.ndarray  # (L,) int64 unix seconds, oldest first (the last max_len behaviors)
    item: np.ndarray  # (L,) int64 raw item ids
    category: np.ndarray  # (L,) int64 raw category ids
    behavior: np.ndarray  # (L,) str behavior type names ('pv', 'buy', ... as in the prepared set)
    codeword: np.ndarray  # (N, L) int64 inference-path (argmax) codeword of each behavior
    candidate_item: np.ndarray  # (C,) int64 raw item ids of the user's test samples (C may be 0)
    candidate_category: np.ndarray  # (C,) int64 raw category ids
    label: np.ndarray  # (C,) int64 0/1 click labels
    score: np.ndarray  # (C,) float64 predicted click probability
    attention: np.ndarray  # (C, N, W) float64 CTAM weights; 0 at empty clusters, sum 1 over W with history

    def clusters(self, codebook: int) -> list[ClusterSummary]:
        """The non-empty clusters of one codebook, largest first (ties: lower codeword first)."""
        if not 0 <= codebook < self.n_codebooks:
            raise DmqnError(f"codebook must be 0..{self.n_codebooks - 1}, got {codebook}")
        words = self.codeword[codebook]
        summaries = []
        for word in np.unique(words):
            members = words == word
            categories, counts = np.unique(self.category[members], return_counts=True)
            top = np.lexsort((categories, -counts))[:3]
            summaries.append(
                ClusterSummary(
                    codeword=int(word),
                    size=int(members.sum()),
                    top_categories=[(int(categories[i]), int(counts[i])) for i in top],
                    first_timestamp=int(self.timestamp[members].min()),
                    last_timestamp=int(self.timestamp[members].max()),
                )
            )
        summaries.sort(key=lambda c: (-c.size, c.codeword))
        return summaries


@dataclass
class RunSummary:
    run_id: str
    model: str
    dataset: str
    status: str
    created_at: str  # ISO text
    test_auc: float | None
    test_gauc: float | None
    test_logloss: float | None

    @classmethod
    def of(cls, record: RunRecord) -> RunSummary:
        return cls(
            record.run_id,
            record.model,
            record.dataset,
            record.status,
            record.created_at.isoformat(),
            record.test_auc,
            record.test_gauc,
            record.test_logloss,
        )


# -- computing inspections from a model ---------------------------------------------------
def candidate_histories(data: PreparedSet, users: np.ndarray) -> dict[int, tuple[int, np.ndarray]]:
    """For each user index: (end offset of the history to show, test sample indices scored against it)."""
    test = data.split("test")
    test_users = np.asarray(test.user, dtype=np.int64)
    hits = np.flatnonzero(np.isin(test_users, users))
    out: dict[int, tuple[int, np.ndarray]] = {}
    for user in np.asarray(users, dtype=np.int64).tolist():
        samples = hits[test_users[hits] == user]
        if len(samples) == 0:
            out[user] = (int(data.user_offsets[user]), samples)  # the whole history, no candidates
            continue
        ends = np.asarray(test.hist_end[samples], dtype=np.int64)
        last = int(ends.max())
        out[user] = (last, samples[ends == last])
    return out


def _popularity(
    data: PreparedSet, item: np.ndarray, timestamp: np.ndarray, config: ModelConfig, device: torch.device
) -> torch.Tensor | None:
    """The candidates' popularity before their samples' time, for a model with match features (else None)."""
    if not config.match_features:
        return None
    return torch.from_numpy(data.popularity_before(item, timestamp)).to(device)


@torch.no_grad()
def compute_inspections(
    model: DMQN, data: PreparedSet, run_id: str, users: np.ndarray, max_len: int
) -> Iterator[UserInspection]:
    """The inspection of each user index, computed with the model (put in eval mode) one user at a time."""
    model.eval()
    device = next(model.parameters()).device
    config = model.config
    test = data.split("test")
    histories = candidate_histories(data, users)
    for user in np.asarray(users, dtype=np.int64).tolist():
        end, samples = histories[user]
        item, category, behavior, timestamp, mask = gather_histories(data, np.array([user]), np.array([end]), max_len)
        length = int(mask.sum())
        hist = [torch.from_numpy(a).to(device) for a in (item, category, behavior, mask, timestamp)]
        codeword = model.codeword_assignments(*hist)[0, :, :length].cpu().numpy().astype(np.int64)  # (N, L)
        cand_item = np.asarray(test.item[samples], dtype=np.int64)
        cand_category = np.asarray(test.category[samples], dtype=np.int64)
        n = len(samples)
        if n:
            state = model.encode_user(*hist)
            logits, weights = model.score_with_weights(
                state,
                torch.from_numpy(cand_item).to(device),
                torch.from_numpy(cand_category).to(device),
                torch.zeros(n, dtype=torch.long, device=device),
                _popularity(data, cand_item, test.timestamp[samples], config, device),
            )
            score = torch.sigmoid(logits).cpu().numpy().astype(np.float64)
            attention = weights.cpu().numpy().astype(np.float64)
        else:
            score = np.zeros(0, dtype=np.float64)
            attention = np.zeros((0, config.n_codebooks, config.codebook_size), dtype=np.float64)
        names = np.asarray(data.behavior_names, dtype=str)
        yield UserInspection(
            run_id=run_id,
            user_id=int(data.raw_user(user)),
            recorded=False,
            n_codebooks=config.n_codebooks,
            codebook_size=config.codebook_size,
            timestamp=timestamp[0, :length],
            item=_raw(data.raw_item, item[0, :length]),
            category=_raw(data.raw_category, category[0, :length]),
            behavior=names[behavior[0, :length] - 1],
            codeword=codeword,
            candidate_item=_raw(data.raw_item, cand_item),
            candidate_category=_raw(data.raw_category, cand_category),
            label=np.asarray(test.label[samples], dtype=np.int64),
            score=score,
            attention=attention,
        )


def _raw(lookup, index: np.ndarray) -> np.ndarray:
    return np.asarray(lookup(index), dtype=np.int64) if len(index) else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def folded_codebooks(model: DMQN) -> np.ndarray:
    """(N, W, D) codewords in the behavior-embedding space: behavior e goes to argmax_w e · folded[n, w].

    The quantizer's own folding (c_j W_2^T), so that codewords can be projected together with item
    embeddings.
    """
    with torch.no_grad():
        return model.quantizer.folded_codebooks().float().cpu().numpy()


@torch.no_grad()
def item_vector_sample(
    model: DMQN, data: PreparedSet, limit: int = MAX_ITEM_VECTORS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw item ids, raw category ids, popularity and candidate embeddings (item + category, (M, D))
    of the ``limit`` most frequent items, most frequent first (ties: lower raw id first)."""
    popularity = np.asarray(data.item_popularity[1:], dtype=np.int64)
    index = np.argsort(-popularity, kind="stable")[:limit] + 1
    category = np.asarray(data.item_category[index], dtype=np.int64)
    device = next(model.parameters()).device
    vectors = model.embedding.candidate(torch.from_numpy(index).to(device), torch.from_numpy(category).to(device))
    return (
        _raw(data.raw_item, index),
        _raw(data.raw_category, category),
        popularity[index - 1],
        vectors.float().cpu().numpy(),
    )


def sample_users(data: PreparedSet, n_users: int, seed: int) -> np.ndarray:
    """Up to ``n_users`` user indices with test samples, drawn with ``seed``, in index order."""
    candidates = np.unique(np.asarray(data.split("test").user, dtype=np.int64))
    if n_users >= len(candidates):
        return candidates
    return np.sort(np.random.default_rng(seed).choice(candidates, size=n_users, replace=False))


# -- recording -----------------------------------------------------------------------------
def record_inspection(
    store: RunStore, run_id: str, model: DMQN, data: PreparedSet, max_len: int, n_users: int, seed: int
) -> int:
    """Write the codebooks, the item sample and the inspections of a user sample; returns the users recorded.

    Whatever the run recorded before is replaced (a resumed run records again), in the
    transaction of the first batch; each further batch of users is one transaction.
    """
    items, categories, popularity, vectors = item_vector_sample(model, data)
    codebooks = folded_codebooks(model)
    N, W, _ = codebooks.shape
    store.log_inspection(
        run_id,
        {
            "codebook_vectors": {
                "codebook": np.repeat(np.arange(N), W),
                "codeword": np.tile(np.arange(W), N),
                "vector": codebooks.reshape(N * W, -1),
            },
            "item_vectors": {"item": items, "category": categories, "popularity": popularity, "vector": vectors},
        },
        replace=True,
    )
    users = sample_users(data, n_users, seed)
    for begin in range(0, len(users), RECORD_BATCH_USERS):
        batch = list(compute_inspections(model, data, run_id, users[begin : begin + RECORD_BATCH_USERS], max_len))
        store.log_inspection(run_id, _inspection_rows(batch))
    return len(users)


def _inspection_rows(batch: list[UserInspection]) -> dict[str, dict[str, np.ndarray]]:
    """The rows of the inspect_* tables for a batch of inspections, as columns."""
    tables: dict[str, dict[str, list[np.ndarray]]] = {
        "inspect_users": {},
        "inspect_behaviors": {},
        "inspect_candidates": {},
        "inspect_attention": {},
    }

    def add(table: str, **columns: np.ndarray) -> None:
        for name, values in columns.items():
            tables[table].setdefault(name, []).append(np.asarray(values))

    for u in batch:
        N, L = u.codeword.shape
        C = len(u.label)
        add("inspect_users", user_id=[u.user_id], history_length=[L], candidates=[C])
        # One row per behavior and codebook, behavior-major.
        add(
            "inspect_behaviors",
            user_id=np.full(L * N, u.user_id),
            position=np.repeat(np.arange(L), N),
            codebook=np.tile(np.arange(N), L),
            codeword=u.codeword.T.reshape(-1),
            timestamp=np.repeat(u.timestamp, N),
            item=np.repeat(u.item, N),
            category=np.repeat(u.category, N),
            behavior=np.repeat(u.behavior, N),
        )
        add(
            "inspect_candidates",
            user_id=np.full(C, u.user_id),
            candidate=np.arange(C),
            item=u.candidate_item,
            category=u.candidate_category,
            label=u.label,
            score=u.score,
        )
        # Attention rows for the non-empty clusters only: an empty cluster's weight is 0 by construction.
        sizes = np.stack([np.bincount(u.codeword[n], minlength=u.codebook_size) for n in range(N)])
        c, n, w = np.nonzero(np.broadcast_to(sizes > 0, u.attention.shape))
        add(
            "inspect_attention",
            user_id=np.full(len(c), u.user_id),
            candidate=c,
            codebook=n,
            codeword=w,
            weight=u.attention[c, n, w],
        )
    return {
        table: {name: np.concatenate(parts) for name, parts in columns.items()}
        for table, columns in tables.items()
        if columns
    }


def user_worth_inspecting(workspace: Workspace, run_id: str) -> int | None:
    """A recorded user with test candidates and the longest history (ties: more candidates, lower id)."""
    rows = RunStore(workspace.store_path).inspected_users(run_id)
    rows = [r for r in rows if r[2] > 0]
    if not rows:
        return None
    return int(min(rows, key=lambda r: (-r[1], -r[2], r[0]))[0])


# -- reading -------------------------------------------------------------------------------
def dmqn_runs(workspace: Workspace) -> list[RunSummary]:
    """The dmqn / dmqn-simple runs of the workspace, newest first."""
    records = RunStore(workspace.store_path).list_runs()
    return [RunSummary.of(r) for r in reversed(records) if has_codebooks(r.model)]


class RunInspector:
    """One DMQN run's recorded inspection data, read from the run store opened read-only (so it never
    blocks a running ``dmqn train``); the checkpoint is loaded lazily, only for what was not recorded.

    ``run`` is the run's handle and ``store`` its run store, for what the store answers as it is
    (metric history, codebook usage, the clusters' categories, other runs on the set).
    """

    def __init__(self, workspace: Workspace, run_id: str | None = None) -> None:
        store = RunStore(workspace.store_path)
        if not store.path.exists():
            raise DmqnError(f"no run store at {store.path} (train a run with `dmqn train` or `dmqn quickstart`)")
        if run_id is None:
            runs = dmqn_runs(workspace)
            if not runs:
                raise DmqnError(f"no dmqn or dmqn-simple run in {store.path} (train one with `dmqn train`)")
            # As RunStore.resolve_run_id: a run still training, failed or dead has no recorded sample.
            finished = [run for run in runs if run.status == "finished"]
            if not finished:
                raise DmqnError(
                    f"no finished dmqn or dmqn-simple run in {store.path} yet; name a run (see `dmqn runs`)"
                )
            run_id = finished[0].run_id
        run = Run.open(workspace, run_id)
        if not run.has_codebooks:
            raise DmqnError(
                f"run {run.run_id} trains {run.model_name!r}; only dmqn and dmqn-simple runs have codebooks"
            )
        self.run = run
        self.store = run.store
        self.run_id: str = run.run_id
        self.model: str = run.model_name
        self.dataset: str = run.record.dataset
        self.n_codebooks: int = run.config.n_codebooks
        self.codebook_size: int = run.config.codebook_size
        self.embed_dim: int = run.config.embed_dim
        self._lock = threading.Lock()  # the TUI reads from worker threads; Run opens its parts on first use

    def _prepared(self) -> PreparedSet:
        with self._lock:
            return self.run.data

    def _checkpoint_model(self) -> DMQN:
        with self._lock:
            return self.run.model()

    def sampled_users(self) -> list[int]:
        return [row[0] for row in self.store.inspected_users(self.run_id)]

    def user(self, user_id: int) -> UserInspection:
        stored = self.store.inspected_user(self.run_id, user_id)
        if stored is not None:
            return self._recorded(int(user_id), *stored)
        data = self._prepared()
        index = data.user_index(np.array([user_id], dtype=np.int64))
        if index[0] == 0:
            raise DmqnError(f"unknown user {user_id} in data set {self.dataset}")
        model = self._checkpoint_model()
        return next(compute_inspections(model, data, self.run_id, index, self.run.max_len))

    def _recorded(
        self, user_id: int, behaviors: list[tuple], candidates: list[tuple], attention_rows: list[tuple]
    ) -> UserInspection:
        N, W = self.n_codebooks, self.codebook_size
        per_behavior = behaviors[::N]  # rows are ordered by position, then codebook
        L = len(per_behavior)
        codeword = np.array([row[2] for row in behaviors], dtype=np.int64).reshape(L, N).T
        attention = np.zeros((len(candidates), N, W), dtype=np.float64)
        for candidate, codebook, word, weight in attention_rows:
            attention[candidate, codebook, word] = weight
        return UserInspection(
            run_id=self.run_id,
            user_id=user_id,
            recorded=True,
            n_codebooks=N,
            codebook_size=W,
            timestamp=np.array([r[3] for r in per_behavior], dtype=np.int64),
            item=np.array([r[4] for r in per_behavior], dtype=np.int64),
            category=np.array([r[5] for r in per_behavior], dtype=np.int64),
            behavior=np.array([r[6] for r in per_behavior], dtype=str),
            codeword=codeword,
            candidate_item=np.array([r[1] for r in candidates], dtype=np.int64),
            candidate_category=np.array([r[2] for r in candidates], dtype=np.int64),
            label=np.array([r[3] for r in candidates], dtype=np.int64),
            score=np.array([r[4] for r in candidates], dtype=np.float64),
            attention=attention,
        )

    def utilisation(self, epoch: int | None = None) -> np.ndarray:
        """(N, W) validation assignment counts after ``epoch``; None = the best epoch when the run was
        opened (the latest recorded epoch while none is best yet; zeros before the first epoch ends)."""
        if epoch is None:
            epoch = self.run.record.best_epoch
            if epoch is None:
                epochs = [row[0] for row in self.store.codebook_usage(self.run_id)]
                if not epochs:
                    return np.zeros((self.n_codebooks, self.codebook_size), dtype=np.int64)
                epoch = max(epochs)
        rows = self.store.codeword_counts(self.run_id, epoch)
        if not rows:
            raise DmqnError(f"run {self.run_id} has no codeword counts for epoch {epoch}")
        counts = np.zeros((self.n_codebooks, self.codebook_size), dtype=np.int64)
        for codebook, word, count in rows:
            counts[codebook, word] = count
        return counts

    def codebooks(self) -> np.ndarray:
        """(N, W, D) float32 folded codewords recorded at the end of training (from the checkpoint when
        the run recorded none: an older run, or --inspect-users 0)."""
        rows = self.store.codebook_vectors(self.run_id)
        if not rows:
            return folded_codebooks(self._checkpoint_model())
        return np.array([row[2] for row in rows], dtype=np.float32).reshape(self.n_codebooks, self.codebook_size, -1)

    def item_embeddings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw item ids (M,), raw category ids (M,) and vectors (M, D) of the recorded item sample (most
        frequent items first; from the checkpoint when the run recorded none)."""
        rows = self.store.item_vectors(self.run_id)
        if not rows:
            items, categories, _, vectors = item_vector_sample(self._checkpoint_model(), self._prepared())
            return items, categories, vectors
        return (
            np.array([r[0] for r in rows], dtype=np.int64),
            np.array([r[1] for r in rows], dtype=np.int64),
            np.array([r[3] for r in rows], dtype=np.float32).reshape(len(rows), self.embed_dim),
        )
