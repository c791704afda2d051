"""The inspection sample of a run: what ``dmqn inspect`` and ``dmqn report`` show of its users.

Recorded at the end of a dmqn / dmqn-simple training, with the best checkpoint (see
dmqn_core.runs.inspection and docs/run-store.md). A sample of at most ``--inspect-users`` users with test
samples (default 300) is recorded; every id is a raw id of the log.

``inspect_users``      (run_id, user_id, history_length, candidates): one row per sampled user; L behaviors
                       in the history the model encoded for the user's test samples, C test samples.
``inspect_behaviors``  (run_id, user_id, position, codebook, codeword, timestamp, item, category, behavior):
                       one row per behavior of that history and codebook (L·N rows per user), position 0
                       = oldest; codeword is the inference-path (argmax) assignment. Cluster sizes are
                       ``count(*) GROUP BY codebook, codeword``.
``inspect_candidates`` (run_id, user_id, candidate, item, category, label, score): the user's test samples
                       (C rows), score = predicted click probability.
``inspect_attention``  (run_id, user_id, candidate, codebook, codeword, weight): CTAM attention of each
                       candidate on each NON-EMPTY cluster (absent rows are empty clusters, weight 0);
                       the weights of a (candidate, codebook) sum to 1.
``codebook_vectors``   (run_id, codebook, codeword, vector FLOAT[D]): the codewords folded into the
                       behavior-embedding space (c W_2^T: a behavior e goes to argmax_w e · vector).
``item_vectors``       (run_id, item, category, popularity, vector FLOAT[D]): candidate embeddings (item +
                       category) of the most frequent items, at most 5,000 rows
                       (dmqn_core.runs.inspection.MAX_ITEM_VECTORS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from dmqn_core.runs.store.connection import Statement, StoreFile

# The inspection tables a run writes at the end of training, with their column order.
INSPECTION_COLUMNS: dict[str, tuple[str, ...]] = {
    "inspect_users": ("user_id", "history_length", "candidates"),
    "inspect_behaviors": ("user_id", "position", "codebook", "codeword", "timestamp", "item", "category", "behavior"),
    "inspect_candidates": ("user_id", "candidate", "item", "category", "label", "score"),
    "inspect_attention": ("user_id", "candidate", "codebook", "codeword", "weight"),
    "codebook_vectors": ("codebook", "codeword", "vector"),
    "item_vectors": ("item", "category", "popularity", "vector"),
}
_INSPECTION_TYPES: dict[str, pa.DataType] = {
    "user_id": pa.int64(),
    "history_length": pa.int32(),
    "candidates": pa.int32(),
    "position": pa.int32(),
    "codebook": pa.int32(),
    "codeword": pa.int32(),
    "timestamp": pa.int64(),
    "item": pa.int64(),
    "category": pa.int64(),
    "behavior": pa.string(),
    "candidate": pa.int32(),
    "label": pa.int8(),
    "score": pa.float32(),
    "weight": pa.float32(),
    "popularity": pa.int64(),
    "vector": pa.list_(pa.float32()),
}


class InspectionTables(StoreFile):
    """The methods of RunStore that read and write the inspection sample."""

    def log_inspection(self, run_id: str, rows: Mapping[str, Mapping[str, Any]], replace: bool = False) -> None:
        """Insert rows into the inspection tables in one transaction.

        ``rows[table][column]`` holds the values of one column (the columns of INSPECTION_COLUMNS,
        run_id excluded; ``vector`` as an (M, D) array). With ``replace`` every inspection row of
        the run is deleted first, in the same transaction: a resumed run records its sample again.
        """
        unknown = set(rows) - set(INSPECTION_COLUMNS)
        if unknown:
            raise ValueError(f"not inspection tables: {sorted(unknown)}")
        statements: list[Statement] = []
        if replace:
            statements += [(f"DELETE FROM {table} WHERE run_id = ?", [run_id]) for table in INSPECTION_COLUMNS]
        frames = {}
        for table, columns in rows.items():
            frame = _arrow_frame(INSPECTION_COLUMNS[table], columns)
            if frame.num_rows == 0:
                continue
            frames[f"new_{table}"] = frame
            names = ", ".join(INSPECTION_COLUMNS[table])
            # Table and column names come from INSPECTION_COLUMNS, never from input; the run id is a parameter.
            statements.append((f"INSERT INTO {table} (run_id, {names}) SELECT ?, {names} FROM new_{table}", [run_id]))
        self._write(statements, frames)

    def inspected_users(self, run_id: str) -> list[tuple[int, int, int]]:
        """(user_id, history_length, candidates) of the run's recorded sample, by user id."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT user_id, history_length, candidates FROM inspect_users WHERE run_id = ? ORDER BY user_id",
                [run_id],
                table="inspect_users",
            )
        ]

    def inspected_user(self, run_id: str, user_id: int) -> tuple[list[tuple], list[tuple], list[tuple]] | None:
        """A recorded user's behavior rows (position, codebook, codeword, timestamp, item, category, behavior),
        candidate rows (candidate, item, category, label, score) and attention rows (candidate, codebook,
        codeword, weight); None when the user is not in the run's sample."""
        key = [run_id, int(user_id)]
        found, behaviors, candidates, attention = self._read_all(
            [
                ("SELECT 1 FROM inspect_users WHERE run_id = ? AND user_id = ?", key, "inspect_users"),
                (
                    "SELECT position, codebook, codeword, timestamp, item, category, behavior FROM inspect_behaviors "
                    "WHERE run_id = ? AND user_id = ? ORDER BY position, codebook",
                    key,
                    "inspect_behaviors",
                ),
                (
                    "SELECT candidate, item, category, label, score FROM inspect_candidates "
                    "WHERE run_id = ? AND user_id = ? ORDER BY candidate",
                    key,
                    "inspect_candidates",
                ),
                (
                    "SELECT candidate, codebook, codeword, weight FROM inspect_attention "
                    "WHERE run_id = ? AND user_id = ? ORDER BY candidate, codebook, codeword",
                    key,
                    "inspect_attention",
                ),
            ]
        )
        return (behaviors, candidates, attention) if found else None

    def codeword_categories(self, run_id: str) -> list[tuple[int, int, int, int]]:
        """(codebook, codeword, category, behaviors) over every recorded user of the run, one GROUP BY."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT codebook, codeword, category, count(*) FROM inspect_behaviors WHERE run_id = ? "
                "GROUP BY codebook, codeword, category ORDER BY codebook, codeword, category",
                [run_id],
                table="inspect_behaviors",
            )
        ]

    def codebook_vectors(self, run_id: str) -> list[tuple[int, int, list[float]]]:
        """(codebook, codeword, vector) recorded at the end of training."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT codebook, codeword, vector FROM codebook_vectors WHERE run_id = ? ORDER BY codebook, codeword",
                [run_id],
                table="codebook_vectors",
            )
        ]

    def item_vectors(self, run_id: str) -> list[tuple[int, int, int, list[float]]]:
        """(item, category, popularity, vector) recorded at the end of training, most frequent first."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT item, category, popularity, vector FROM item_vectors WHERE run_id = ? "
                "ORDER BY popularity DESC, item",
                [run_id],
                table="item_vectors",
            )
        ]


def _arrow_frame(names: Sequence[str], columns: Mapping[str, Any]) -> pa.Table:
    """An Arrow table of the named columns, typed as the inspection tables store them."""
    if set(columns) != set(names):
        raise ValueError(f"expected columns {list(names)}, got {sorted(columns)}")
    arrays = []
    for name in names:
        kind = _INSPECTION_TYPES[name]
        if name == "vector":
            vectors = np.ascontiguousarray(columns[name], dtype=np.float32)
            flat = pa.array(vectors.reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]).cast(kind))
        elif kind == pa.string():
            arrays.append(pa.array(np.asarray(columns[name], dtype=str), type=kind))
        else:
            arrays.append(pa.array(np.asarray(columns[name]).astype(kind.to_pandas_dtype(), copy=False), type=kind))
    return pa.table(arrays, names=list(names))
