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

This module reads inspections back (``RunInspector``, ``dmqn_runs``); ``inspection_compute`` computes
and records them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.models.dmqn.model import DMQN
from dmqn_core.models.registry import has_codebooks
from dmqn_core.runs.inspection_compute import (
    MAX_ITEM_VECTORS,
    RECORD_BATCH_USERS,
    ClusterSummary,
    UserInspection,
    candidate_histories,
    compute_inspections,
    folded_codebooks,
    item_vector_sample,
    record_inspection,
    sample_users,
)
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RunRecord, RunStore
from dmqn_core.workspace import Workspace

# Computing and recording live in inspection_compute; their names stay importable from here.
__all__ = [
    "MAX_ITEM_VECTORS",
    "RECORD_BATCH_USERS",
    "ClusterSummary",
    "UserInspection",
    "RunSummary",
    "RunInspector",
    "candidate_histories",
    "compute_inspections",
    "dmqn_runs",
    "folded_codebooks",
    "item_vector_sample",
    "record_inspection",
    "sample_users",
    "user_worth_inspecting",
]


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
            model = self.run.model()
        assert isinstance(model, DMQN)  # __init__ took a run with codebooks, which DMQN alone has
        return model

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
