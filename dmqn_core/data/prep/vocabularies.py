"""Stage 3 of a prep, vocabularies: raw ids to 1..n in raw-id order (0 = padding) for the kept users, and
for the items, categories and behavior types of their behaviors; an item's category is its most frequent
one and its popularity its behavior count (protocol step 6). Tables vu, vi, vc and vb."""

from __future__ import annotations

import numpy as np

from dmqn_core.data.prep.context import PrepContext
from dmqn_core.data.prep.options import MIN_CLICKS
from dmqn_core.errors import DmqnError


def build_vocabularies(ctx: PrepContext) -> list[str]:
    """Build the vocabularies; the behavior-type names, in name order."""
    con = ctx.con
    con.execute(
        """
        CREATE TABLE vu AS
        SELECT user_id, CAST(row_number() OVER (ORDER BY user_id) AS INTEGER) AS u_idx, t0
        FROM ustats WHERE n_elig >= ?
        """,
        [MIN_CLICKS],
    )
    con.execute("DROP TABLE ustats; DROP TABLE ucount")
    con.execute(
        """
        CREATE TEMP TABLE ic AS
        SELECT item_id, category_id, count(*) AS c FROM ev SEMI JOIN vu USING (user_id) GROUP BY ALL
        """
    )
    con.execute(
        """
        CREATE TABLE vc AS
        SELECT category_id, CAST(row_number() OVER (ORDER BY category_id) AS INTEGER) AS c_idx
        FROM (SELECT DISTINCT category_id FROM ic)
        """
    )
    con.execute(
        """
        CREATE TABLE vi AS
        WITH best AS (
            SELECT item_id, category_id, sum(c) OVER (PARTITION BY item_id) AS pop FROM ic
            QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY c DESC, category_id) = 1
        )
        SELECT b.item_id, CAST(row_number() OVER (ORDER BY b.item_id) AS INTEGER) AS i_idx,
               CAST(b.pop AS BIGINT) AS pop, vc.c_idx
        FROM best b JOIN vc USING (category_id)
        """
    )
    con.execute("DROP TABLE ic")
    names = [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT behavior FROM ev SEMI JOIN vu USING (user_id) ORDER BY behavior"
        ).fetchall()
    ]
    con.execute(
        "CREATE TABLE vb AS SELECT unnest(?) AS behavior, CAST(unnest(?) AS TINYINT) AS b_idx",
        [names, list(range(1, len(names) + 1))],
    )
    if len(names) > np.iinfo(np.int8).max:
        raise DmqnError(f"{len(names)} behavior types; the format stores at most {np.iinfo(np.int8).max}")
    return names
