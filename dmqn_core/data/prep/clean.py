"""Stage 2 of a prep, cleaning: the valid rows (the view ``ev``), the behaviors that count as clicks, and
the users kept (protocol steps 2 and 3): at least --min-behaviors behaviors and MIN_CLICKS clicks with a
non-empty history."""

from __future__ import annotations

import duckdb

from dmqn_core.data.formats import SourceInfo
from dmqn_core.data.prep.context import PrepContext
from dmqn_core.data.prep.options import MIN_CLICKS, PrepSettings
from dmqn_core.errors import DmqnError


def clean(ctx: PrepContext, info: SourceInfo) -> tuple[list[str], dict[str, int]]:
    """The click behaviors, and the counts of users kept and dropped (a DmqnError when none is kept)."""
    _keep_valid(ctx.con)
    clicks = _resolve_clicks(ctx.con, ctx.settings, info)
    return clicks, _filter_users(ctx.con, ctx.settings, clicks)


def _keep_valid(con: duckdb.DuckDBPyConnection) -> None:
    # A view rather than a copy: at 100M rows, copying the valid rows costs more than
    # filtering them again in the few scans that read them before the big sort.
    con.execute(
        """
        CREATE VIEW ev AS
        SELECT rowid AS rn, user_id, item_id, category_id, behavior, ts FROM events WHERE reason IS NULL
        """
    )


def _resolve_clicks(con: duckdb.DuckDBPyConnection, settings: PrepSettings, info: SourceInfo) -> list[str]:
    known = info.behaviors
    if known is None:
        known = tuple(r[0] for r in con.execute("SELECT DISTINCT behavior FROM ev ORDER BY 1").fetchall())
    if settings.click_behaviors is None:
        return list(info.default_clicks or known)
    unknown = [b for b in settings.click_behaviors if b not in known]
    if unknown:
        raise DmqnError(
            f"--click-behaviors: {', '.join(unknown)} is not a behavior of this log (its behaviors: {', '.join(known)})"
        )
    return sorted(set(settings.click_behaviors))


def _filter_users(con: duckdb.DuckDBPyConnection, settings: PrepSettings, clicks: list[str]) -> dict[str, int]:
    con.execute("CREATE TEMP TABLE ucount AS SELECT user_id, count(*) AS n, min(ts) AS t0 FROM ev GROUP BY user_id")
    # A click has a non-empty history exactly when the user did something strictly earlier,
    # i.e. when it is later than the user's first timestamp: eligibility needs no sort.
    con.execute(
        """
        CREATE TEMP TABLE ustats AS
        SELECT u.user_id, u.t0, count(*) FILTER (WHERE list_contains(?, e.behavior) AND e.ts > u.t0) AS n_elig
        FROM ucount u JOIN ev e USING (user_id)
        WHERE u.n >= ?
        GROUP BY u.user_id, u.t0
        """,
        [clicks, settings.min_behaviors],
    )
    n_all, n_few = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE n < ?) FROM ucount", [settings.min_behaviors]
    ).fetchall()[0]
    n_kept, n_no_clicks = con.execute(
        "SELECT count(*) FILTER (WHERE n_elig >= ?), count(*) FILTER (WHERE n_elig < ?) FROM ustats",
        [MIN_CLICKS, MIN_CLICKS],
    ).fetchall()[0]
    if n_kept == 0:
        raise DmqnError(
            f"no user is left: of {n_all} users, {n_few} have fewer than --min-behaviors "
            f"{settings.min_behaviors} behaviors and {n_no_clicks} fewer than {MIN_CLICKS} clicks "
            f"({', '.join(clicks)}) after their first behavior — lower --min-behaviors or check --click-behaviors"
        )
    return {"users": n_kept, "users_dropped_min_behaviors": n_few, "users_dropped_few_clicks": n_no_clicks}
