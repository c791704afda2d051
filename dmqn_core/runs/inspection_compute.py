"""Computing codebook inspections from a DMQN model and recording a run's sample of them: the writing side of
``inspection`` (whose docstring says which history an inspection shows), used by training at the end of a
run and by RunInspector for a user the sample does not hold."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from dmqn_core.config import ModelConfig
from dmqn_core.data.batches import gather_histories
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.models.dmqn.model import DMQN
from dmqn_core.runs.store import RunStore

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

    def add(table: str, **columns: npt.ArrayLike) -> None:
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
