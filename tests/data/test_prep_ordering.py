"""The NumPy helpers of prep's behavior ordering: vocabulary lookups (dense and sparse) and the stable sort
by (user, timestamp, file order), on both of its paths."""

from __future__ import annotations

import numpy as np
import pytest

from dmqn_core.data.prep.ordering import _index_lookup, _sort_rows


@pytest.mark.parametrize("scale", [1, 10**12], ids=["dense", "sparse"])
def test_index_lookup_gives_1_based_indexes_and_0_for_unknown_ids(scale: int) -> None:
    ids = np.array([3, 5, 9, 40], dtype=np.int64) * scale
    lookup = _index_lookup(ids)
    values = np.array([5, 3, 40, 9, 7, 0, -2, 41], dtype=np.int64) * scale
    assert lookup(values).tolist() == [2, 1, 4, 3, 0, 0, 0, 0]


@pytest.mark.parametrize("ts_scale", [1, 10**9], ids=["one key", "two passes"])
def test_sort_rows_sorts_by_user_then_time_then_file_order(ts_scale: int) -> None:
    rng = np.random.default_rng(0)
    u_idx = rng.integers(1, 50, 5000).astype(np.int32)
    ts = rng.integers(0, 30, 5000).astype(np.int64) * ts_scale - 7  # many ties, a negative start
    rows = {"u_idx": u_idx.copy(), "i_idx": np.arange(5000, dtype=np.int32), "ts": ts.copy()}
    _sort_rows(rows)
    expected = np.lexsort((np.arange(len(ts)), ts, u_idx))
    assert np.array_equal(rows["i_idx"], expected)
    assert np.array_equal(rows["u_idx"], u_idx[expected]) and rows["u_idx"].dtype == np.int32
    assert np.array_equal(rows["ts"], ts[expected]) and rows["ts"].dtype == np.int64
