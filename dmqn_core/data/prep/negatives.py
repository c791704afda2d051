"""Stage 5 of a prep, negatives: ``--neg-ratio`` negatives per positive (table ``neg``), distinct per positive,
among the items its user never clicked, drawn by ``--negatives`` (protocol step 5).

Draw k of positive s is item ``cum_w^-1(hash(seed, s, k) mod total)`` over its pool's cumulative weights;
the first valid draws are kept and rounds of further draws fill up the positives still short, so the
result depends only on the seed and the data, never on threading.
"""

from __future__ import annotations

import duckdb

from dmqn_core.data.prep.context import PrepContext
from dmqn_core.data.prep.options import PrepSettings

NEGATIVE_ROUNDS = 8


def draw_negatives(ctx: PrepContext) -> tuple[int, int]:
    """Draw the negatives of every positive; (negatives still missing, positives that fell back)."""
    con, settings = ctx.con, ctx.settings
    con.execute("CREATE TABLE neg (sid BIGINT, i_idx INTEGER, draw BIGINT)")
    if settings.neg_ratio == 0:
        return 0, 0
    _build_pools(con, settings.negatives)
    fallbacks = _build_needs(con, settings)
    con.execute("CREATE TEMP TABLE pool_total AS SELECT grp, CAST(sum(w) AS UBIGINT) AS total FROM pool GROUP BY grp")
    first_draw = 0
    for round_no in range(NEGATIVE_ROUNDS):
        draws = (settings.neg_ratio + 1) << round_no
        remaining = _draw_round(con, settings.seed, first_draw, draws)
        first_draw += draws
        if remaining == 0:
            break
    con.execute("DROP TABLE IF EXISTS cand; DROP TABLE IF EXISTS got; DROP TABLE pool; DROP TABLE pool_total")
    return int(remaining), int(fallbacks)


def _build_pools(con: duckdb.DuckDBPyConnection, negatives: str) -> None:
    # The pool of group 0 is every item; same-category adds one pool per category. A draw is
    # the item whose cumulative weight range (within its group, in item order) holds the hash.
    weight = "1" if negatives == "uniform" else "pop"
    con.execute(
        f"""
        CREATE TABLE pool AS
        SELECT 0 AS grp, i_idx, CAST(sum({weight}) OVER (ORDER BY i_idx) - {weight} AS BIGINT) AS cum,
               {weight} AS w
        FROM vi
        """
    )
    if negatives == "same-category":
        con.execute(
            """
            INSERT INTO pool
            SELECT c_idx, i_idx, CAST(sum(pop) OVER (PARTITION BY c_idx ORDER BY i_idx) - pop AS BIGINT), pop
            FROM vi
            """
        )


def _build_needs(con: duckdb.DuckDBPyConnection, settings: PrepSettings) -> int:
    """The table ``short``: each positive's pool and the negatives it still needs; how many positives
    draw from every item because their category's pool is too small."""
    if settings.negatives != "same-category":
        con.execute(
            "CREATE TABLE short AS SELECT sid, u_idx, 0 AS grp, CAST(? AS BIGINT) AS need FROM pos",
            [settings.neg_ratio],
        )
        return 0
    # A positive whose category holds fewer items the user never clicked than it needs
    # negatives draws from every item instead (counted as a fallback).
    con.execute(
        """
        CREATE TABLE short AS
        WITH clicked AS (
            SELECT k.u_idx, vi.c_idx, count(*) AS n
            FROM (SELECT DISTINCT u_idx, i_idx FROM clk) k JOIN vi USING (i_idx)
            GROUP BY ALL
        ),
        items AS (SELECT c_idx, count(*) AS n FROM vi GROUP BY c_idx)
        SELECT p.sid, p.u_idx,
               CASE WHEN coalesce(i.n, 0) - coalesce(k.n, 0) >= ? THEN p.cat ELSE 0 END AS grp,
               CAST(? AS BIGINT) AS need
        FROM pos p LEFT JOIN items i ON i.c_idx = p.cat
                   LEFT JOIN clicked k ON k.u_idx = p.u_idx AND k.c_idx = p.cat
        """,
        [settings.neg_ratio, settings.neg_ratio],
    )
    return con.execute("SELECT count(*) FROM short WHERE grp = 0").fetchall()[0][0]


def _draw_round(con: duckdb.DuckDBPyConnection, seed: int, first_draw: int, draws: int) -> int:
    """Draws first_draw.. first_draw + draws - 1 of every positive still short: the valid ones go to
    ``neg`` (up to what each needs) and ``short`` keeps what is still missing; its sum is returned."""
    con.execute(
        """
        CREATE OR REPLACE TABLE cand AS
        SELECT c.sid, c.u_idx, c.need, c.draw, p.i_idx
        FROM (SELECT s.sid, s.u_idx, s.grp, s.need, d.draw,
                     CAST(hash(CAST(? AS BIGINT), s.sid, d.draw) % t.total AS BIGINT) AS r
              FROM short s JOIN pool_total t USING (grp), range(?, ?) d(draw)) c
        ASOF JOIN pool p ON c.grp = p.grp AND c.r >= p.cum
        """,
        [seed, first_draw, first_draw + draws],
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE got AS
        WITH valid AS (
            SELECT c.sid, c.i_idx, min(c.draw) AS draw, any_value(c.need) AS need FROM cand c
            ANTI JOIN clk k ON k.u_idx = c.u_idx AND k.i_idx = c.i_idx
            ANTI JOIN neg n ON n.sid = c.sid AND n.i_idx = c.i_idx
            GROUP BY c.sid, c.i_idx
        )
        -- A window rank, not a top-n aggregate (min_by(..., n) over structs): a third less
        -- CPU on millions of positives. Draws are distinct within a positive: deterministic.
        -- Each candidate carries its positive's need, so no join back to short (15 % less CPU).
        SELECT sid, i_idx, draw FROM valid QUALIFY row_number() OVER (PARTITION BY sid ORDER BY draw) <= need
        """
    )
    con.execute("INSERT INTO neg SELECT sid, i_idx, draw FROM got")
    con.execute(
        """
        CREATE OR REPLACE TABLE short AS
        SELECT s.sid, s.u_idx, s.grp, s.need - coalesce(g.n, 0) AS need
        FROM short s LEFT JOIN (SELECT sid, count(*) AS n FROM got GROUP BY sid) g USING (sid)
        WHERE s.need - coalesce(g.n, 0) > 0
        """
    )
    return con.execute("SELECT coalesce(sum(need), 0) FROM short").fetchall()[0][0]
