"""Stage 4 of a prep, samples: the behaviors in their final order, written as the set's behavior arrays (a
behavior's offset in the set is its position there), every click as the table ``clk`` (u_idx, i_idx), and
the positive samples (``pos``): each user's latest clicks split by time into test, validation and training
targets, with the end of each one's history (protocol steps 2 to 4).

The targets come from the sorted NumPy arrays (dmqn_core.data.prep.ordering): with the behaviors sorted
by user and time, a user's eligible clicks are one slice of the eligible offsets and its latest ones the
end of that slice, so they need no aggregate. DuckDB's top-n aggregate (max_by(..., n) per user) and the
history-end join took about 2.6 s on 10M rows and about 570 MB of DuckDB's memory (under a 600 MB limit
they failed now and then); the arrays here take about 1 s and at most about 17 bytes a behavior besides the
samples themselves.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from dmqn_core.data.prep.context import PrepContext
from dmqn_core.data.prep.options import PrepSettings
from dmqn_core.data.prep.ordering import load_clicks, sorted_behaviors, write_behaviors


def make_samples(ctx: PrepContext, clicks: list[str]) -> None:
    """Write the set's behavior arrays and build ``clk`` and ``pos``; the log's own tables are dropped
    once its rows are read."""
    # The one big sort, in NumPy (dmqn_core.data.prep.ordering); a behavior's offset in the set is
    # its position in the sorted arrays, which the targets are taken from too.
    con = ctx.con
    names = [r[0] for r in con.execute("SELECT behavior FROM vb ORDER BY b_idx").fetchall()]
    rows = sorted_behaviors(con, clicks, names)
    offsets = write_behaviors(ctx.out, rows)
    load_clicks(con, rows)
    load_positives(con, rows, offsets, ctx.settings)


def load_positives(
    con: duckdb.DuckDBPyConnection, rows: dict[str, np.ndarray], offsets: np.ndarray, settings: PrepSettings
) -> None:
    """Create ``pos`` (sid = the target's offset, u_idx, item, cat, ts, hist_end, split) from the sorted
    behaviors ``rows`` (BEHAVIOR_COLUMNS of dmqn_core.data.prep.ordering) and each user's offset."""
    sid, code = _targets(rows, offsets, settings)
    ts = rows["ts"]
    positives = pa.table(
        {
            "sid": sid,
            "u_idx": rows["u_idx"][sid],
            "item": rows["i_idx"][sid],
            "cat": rows["c_idx"][sid],
            "ts": ts[sid],
            "hist_end": _history_ends(rows["u_idx"], ts, sid),
            "code": code,
        }
    )
    con.register("pos_rows", positives)
    try:
        con.execute(
            """
            CREATE TABLE pos AS
            SELECT sid, u_idx, item, cat, ts, hist_end,
                   CASE code WHEN 0 THEN 'test' WHEN 1 THEN 'valid' ELSE 'train' END AS split
            FROM pos_rows
            """
        )
    finally:
        con.unregister("pos_rows")


def _targets(rows: dict[str, np.ndarray], offsets: np.ndarray, settings: PrepSettings) -> tuple[np.ndarray, np.ndarray]:
    """The offsets of the targets and their split codes (0 test, 1 valid, 2 train).

    A click is eligible when it is later than its user's first behavior (a non-empty history);
    of each user's eligible clicks the latest is the test target, the next valid_targets
    (fewer for a user with few clicks: at least one is left for training) validation targets,
    and the rest of the latest train_targets + valid_targets + 1 training targets.
    """
    ts = rows["ts"]
    starts = offsets[:-1]  # each user's first behavior
    eligible = rows["is_click"] & (ts > np.repeat(ts[starts], np.diff(offsets)))
    clicks = np.flatnonzero(eligible)
    del eligible
    # Each user's eligible clicks are the slice [first, end) of clicks.
    ends = np.searchsorted(clicks, offsets[1:])
    n = ends - np.append(0, ends[:-1])
    take = np.minimum(n, settings.train_targets + settings.valid_targets + 1)
    # k = 1 for a user's latest eligible click, 2 for the one before, ...
    k = np.arange(int(take.sum()), dtype=np.int64) - np.repeat(np.cumsum(take) - take, take) + 1
    sid = clicks[np.repeat(ends, take) - k]
    del clicks
    n_valid = np.repeat(np.minimum(settings.valid_targets, n - 2), take)
    code = np.where(k == 1, 0, np.where(k <= 1 + n_valid, 1, 2)).astype(np.int8)
    return sid, code


def _history_ends(u_idx: np.ndarray, ts: np.ndarray, sid: np.ndarray) -> np.ndarray:
    """The offset of the first behavior of the target's user at the target's timestamp, for each target:
    its history is every earlier behavior of the user."""
    run_start = np.empty(len(ts), dtype=bool)
    run_start[:1] = True
    np.not_equal(ts[1:], ts[:-1], out=run_start[1:])
    run_start[1:] |= u_idx[1:] != u_idx[:-1]
    runs = np.flatnonzero(run_start)
    del run_start
    return runs[np.searchsorted(runs, sid, side="right") - 1]
