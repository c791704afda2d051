"""Stage 4 of a prep, samples: the behaviors in their final order (``beh``, whose rowid is a behavior's
offset in the set) and the positive samples (``pos``): each user's latest clicks split by time into test,
validation and training targets, with the end of each one's history (protocol steps 2 to 4)."""

from __future__ import annotations

import duckdb

from dmqn_core.data.prep.context import PrepContext
from dmqn_core.data.prep.options import PrepSettings
from dmqn_core.data.prep.ordering import load_behaviors, sorted_behaviors


def make_samples(ctx: PrepContext, clicks: list[str]) -> None:
    """Build ``beh`` and ``pos``; the log's own tables are dropped once ``beh`` holds what they held."""
    _build_behaviors(ctx.con, clicks)
    _build_targets(ctx.con, ctx.settings)


def _build_behaviors(con: duckdb.DuckDBPyConnection, clicks: list[str]) -> None:
    # The one big sort, in NumPy (dmqn_core.data.prep.ordering): rowid of beh is then the global
    # behavior offset. The log's tables go before beh is copied in, so the two never share memory.
    names = [r[0] for r in con.execute("SELECT behavior FROM vb ORDER BY b_idx").fetchall()]
    rows = sorted_behaviors(con, clicks, names)
    load_behaviors(con, rows)


def _build_targets(con: duckdb.DuckDBPyConnection, settings: PrepSettings) -> None:
    # The latest train_targets + valid_targets + 1 eligible clicks per user, by a top-n aggregate
    # (no sort of all clicks); position 1 is the test target, the next valid_targets validation
    # targets (fewer for a user with few clicks: at least one click is left for training), the rest train.
    con.execute(
        """
        CREATE TEMP TABLE top AS
        WITH elig AS (
            SELECT b.rowid AS off, b.u_idx, b.i_idx, b.c_idx, b.ts
            FROM beh b JOIN vu USING (u_idx) WHERE b.is_click AND b.ts > vu.t0
        ),
        best AS (
            SELECT u_idx, max_by({'off': off, 'item': i_idx, 'cat': c_idx, 'ts': ts}, off, ?) AS l,
                   count(*) AS n
            FROM elig GROUP BY u_idx
        )
        SELECT u_idx, n, unnest(l, recursive := true), generate_subscripts(l, 1) AS k FROM best
        """,
        [settings.train_targets + settings.valid_targets + 1],
    )
    # History end = offset of the user's first behavior at the target's timestamp.
    con.execute(
        """
        CREATE TEMP TABLE pos AS
        WITH hend AS (
            SELECT b.u_idx, b.ts, min(b.rowid) AS hist_end
            FROM beh b SEMI JOIN top t ON b.u_idx = t.u_idx AND b.ts = t.ts
            GROUP BY b.u_idx, b.ts
        )
        SELECT t.off AS sid, t.u_idx, t.item, t.cat, t.ts, h.hist_end,
               CASE WHEN t.k = 1 THEN 'test' WHEN t.k <= 1 + least(?, t.n - 2) THEN 'valid' ELSE 'train' END
                   AS split
        FROM top t JOIN hend h USING (u_idx, ts)
        """,
        [settings.valid_targets],
    )
    con.execute("DROP TABLE top")
