"""The statistics that say whether a behavior log looks like Taobao's, and their comparison.

`dmqn synth --compare` measures a real log and a synthetic one with ``log_statistics`` and puts them
side by side with ``compare``; the synthetic generator's constants (dmqn_core.data.synth) were
measured with it on the real samples. The log is read by prep's own Taobao reader (malformed rows
are skipped) and, like prep, keeps the rows inside the Taobao window and orders each user's
behaviors by (timestamp, file order).

Every figure is a share (compared within ``SHARE_TOLERANCE``, absolute) or a count (compared within
``COUNT_TOLERANCE``, relative). The log's sizes (rows, users, items, categories) are reported but
not compared: a synthetic log is as large as its scale, not as the real sample.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np

from dmqn_core.data.formats import Format, load_source
from dmqn_core.data.synth import QUANTILE_LEVELS, WINDOW_END, WINDOW_START, SynthScale, write_log
from dmqn_core.errors import DmqnError

SHARE_TOLERANCE = 0.05
COUNT_TOLERANCE = 0.20

# The window of the Taobao release, as prep's default --time-range.
TAOBAO_WINDOW = (WINDOW_START, WINDOW_END)
# A last click counts when at least this many behaviors precede it (prep's default --min-behaviors),
# so that "in the history" is a question about a history, not about a user's first minutes.
MIN_HISTORY = 20
RECENT = 50  # "recent past": the last 50 behaviors, the length short-sequence models read
SESSION_BREAK_S = 1800  # a gap of 30 minutes or more between two behaviors ends a session
CHINA_UTC_OFFSET_S = 8 * 3600  # Taobao's timestamps are read on China's clock for the hour of the day


@dataclass(frozen=True)
class Figure:
    key: str
    label: str  # at most 34 characters, so that a comparison table fits 80 columns
    kind: Literal["share", "count"]


FIGURES: tuple[Figure, ...] = (
    Figure("pv_share", "behaviors that are pv", "share"),
    Figure("cart_share", "behaviors that are cart", "share"),
    Figure("fav_share", "behaviors that are fav", "share"),
    Figure("buy_share", "behaviors that are buy", "share"),
    Figure("top_item_share", "behaviors on the top 1 % of items", "share"),
    Figure("single_item_share", "items met once in the log", "share"),
    Figure("top_category_share", "behaviors on top 1 % of categories", "share"),
    Figure("length_p10", "behaviors per user, 10th pct", "count"),
    Figure("length_median", "behaviors per user, median", "count"),
    Figure("length_mean", "behaviors per user, mean", "count"),
    Figure("length_p90", "behaviors per user, 90th pct", "count"),
    Figure("categories_median", "categories per user, median", "count"),
    Figure("categories_mean", "categories per user, mean", "count"),
    Figure("item_repeat_share", "behaviors on an item met before", "share"),
    Figure("same_category_share", "same category as the one before", "share"),
    Figure("gap_median_s", "gap between behaviors, median s", "count"),
    Figure("session_break_share", "gaps of 30 minutes or more", "share"),
    Figure("sessions_median", "sessions per user, median", "count"),
    Figure("last_category_anywhere", "last click's category in history", "share"),
    Figure("last_category_recent", "... in the last 50 behaviors", "share"),
    Figure("last_item_anywhere", "last click's item in history", "share"),
)


# The figures of taobao_userbehavior_84k.csv (815 users, 84,440 rows inside the window), four
# significant digits, as `dmqn synth --compare ../shared/data/taobao_userbehavior_84k.csv --json`
# prints them under "real"; the target `small` is held to (a test recomputes them when the file is
# present).
TAOBAO_84K: dict[str, float] = {
    "pv_share": 0.8981,
    "cart_share": 0.05326,
    "fav_share": 0.0279,
    "buy_share": 0.02072,
    "top_item_share": 0.06968,
    "single_item_share": 0.7386,
    "top_category_share": 0.4336,
    "length_p10": 19.4,
    "length_median": 78.0,
    "length_mean": 103.6,
    "length_p90": 226.0,
    "categories_median": 21.0,
    "categories_mean": 24.61,
    "item_repeat_share": 0.2425,
    "same_category_share": 0.4131,
    "gap_median_s": 75.0,
    "session_break_share": 0.1589,
    "sessions_median": 15.0,
    "last_category_anywhere": 0.7528,
    "last_category_recent": 0.7141,
    "last_item_anywhere": 0.3204,
}


@dataclass(frozen=True)
class LogStatistics:
    rows: int  # rows kept: well-formed and inside the window
    users: int
    items: int
    categories: int
    last_clicks: int  # users whose last click has at least MIN_HISTORY behaviors before it
    figures: dict[str, float]  # by Figure.key


@dataclass(frozen=True)
class Comparison:
    figure: Figure
    real: float
    synthetic: float

    @property
    def within_target(self) -> bool:
        if self.figure.kind == "share":
            return abs(self.synthetic - self.real) <= SHARE_TOLERANCE
        return abs(self.synthetic - self.real) <= COUNT_TOLERANCE * abs(self.real)


def compare(real: LogStatistics, synthetic: LogStatistics) -> list[Comparison]:
    """Every figure of the two logs side by side, in FIGURES order."""
    return [Comparison(f, real.figures[f.key], synthetic.figures[f.key]) for f in FIGURES]


def log_statistics(path: str | os.PathLike, window: tuple[int, int] = TAOBAO_WINDOW) -> LogStatistics:
    """Measure a Taobao-format log (CSV or .csv.gz, no header): every figure of FIGURES."""
    with _behaviors(path, window) as con:
        rows, users, items, categories = con.execute(
            "SELECT count(*), count(DISTINCT u), count(DISTINCT i), count(DISTINCT c) FROM b"
        ).fetchall()[0]
        if not rows:
            raise DmqnError(f"{path} holds no well-formed Taobao row inside the window")
        figures: dict[str, float] = {}
        _measure(con, figures)
        last_clicks = _measure_last_clicks(con, figures)
    return LogStatistics(rows, users, items, categories, last_clicks, figures)


@contextmanager
def _behaviors(path: str | os.PathLike, window: tuple[int, int]) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection holding table ``b``: the log's valid rows inside the window, with each row's
    position ``pos`` (from 1) in its user's sequence sorted by (timestamp, file order), as prep sorts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DmqnError(f"{path} is not a file")
    with duckdb.connect() as con:
        con.execute("SET enable_progress_bar = false")
        load_source(con, path, Format.taobao, {}, ",")
        con.execute(
            """
            CREATE TEMP TABLE b AS
            SELECT user_id AS u, item_id AS i, category_id AS c, behavior, ts,
                   row_number() OVER (PARTITION BY user_id ORDER BY ts, rowid) AS pos
            FROM events WHERE reason IS NULL AND ts >= ? AND ts < ?
            """,
            list(window),
        )
        yield con


def _one_row(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> dict[str, float]:
    cursor = con.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    values = cursor.fetchall()[0]  # aggregates: one row
    return {name: float(v) if v is not None else float("nan") for name, v in zip(names, values)}


def _measure(con: duckdb.DuckDBPyConnection, figures: dict[str, float]) -> None:
    figures |= _one_row(
        con,
        """
        SELECT avg((behavior = 'pv')::INT) AS pv_share, avg((behavior = 'cart')::INT) AS cart_share,
               avg((behavior = 'fav')::INT) AS fav_share, avg((behavior = 'buy')::INT) AS buy_share,
               1 - count(DISTINCT (u, i)) / count(*) AS item_repeat_share
        FROM b
        """,
    )
    # Items ranked by behaviors, ties by id, so that the top 1 % is one set whatever the threads.
    figures |= _one_row(
        con,
        """
        WITH pop AS (SELECT i, count(*) AS n FROM b GROUP BY i),
             ranked AS (SELECT n, row_number() OVER (ORDER BY n DESC, i) AS r, count(*) OVER () AS items FROM pop)
        SELECT sum(n) FILTER (WHERE r <= ceil(items / 100)) / sum(n) AS top_item_share,
               avg((n = 1)::INT) AS single_item_share
        FROM ranked
        """,
    )
    figures |= _one_row(
        con,
        """
        WITH pop AS (SELECT c, count(*) AS n FROM b GROUP BY c),
             ranked AS (SELECT n, row_number() OVER (ORDER BY n DESC, c) AS r, count(*) OVER () AS n_c FROM pop)
        SELECT sum(n) FILTER (WHERE r <= ceil(n_c / 100)) / sum(n) AS top_category_share FROM ranked
        """,
    )
    figures |= _one_row(
        con,
        """
        WITH per_user AS (SELECT u, count(*) AS n, count(DISTINCT c) AS nc FROM b GROUP BY u)
        SELECT quantile_cont(n, 0.1) AS length_p10, median(n) AS length_median, avg(n) AS length_mean,
               quantile_cont(n, 0.9) AS length_p90, median(nc) AS categories_median, avg(nc) AS categories_mean
        FROM per_user
        """,
    )
    figures |= _one_row(
        con,
        """
        WITH steps AS (
            SELECT u, ts - lag(ts) OVER w AS gap, c = lag(c) OVER w AS same_category
            FROM b WINDOW w AS (PARTITION BY u ORDER BY pos)
        ),
        per_user AS (SELECT u, 1 + count(*) FILTER (WHERE gap >= ?) AS sessions FROM steps GROUP BY u)
        SELECT (SELECT median(gap) FROM steps) AS gap_median_s,
               (SELECT avg((gap >= ?)::INT) FROM steps WHERE gap IS NOT NULL) AS session_break_share,
               (SELECT avg(same_category::INT) FROM steps WHERE gap IS NOT NULL) AS same_category_share,
               (SELECT median(sessions) FROM per_user) AS sessions_median
        """,
        [SESSION_BREAK_S, SESSION_BREAK_S],
    )


def _measure_last_clicks(con: duckdb.DuckDBPyConnection, figures: dict[str, float]) -> int:
    """The three last-click figures; returns how many last clicks they count."""
    row = _last_clicks(con)
    figures |= {f.key: row[f.key] for f in FIGURES if f.key in row}
    return int(row["users"])


def _last_clicks(con: duckdb.DuckDBPyConnection) -> dict[str, float]:
    """The last-click figures, their count (``users``), and the share of the last clicks in a
    category met before whose item was met before too (``item_given_category``).

    A user's last click is their last pv, the target prep puts in the test split; its history is
    every behavior with a strictly earlier timestamp, i.e. positions 1..n of the sorted sequence.
    """
    return _one_row(
        con,
        """
        WITH target AS (
            SELECT b.u, b.i, b.c, b.ts FROM b
            JOIN (SELECT u, max(pos) AS pos FROM b WHERE behavior = 'pv' GROUP BY u) AS last USING (u, pos)
        ),
        history AS (
            SELECT t.u, h.pos, h.c = t.c AS same_category, h.i = t.i AS same_item,
                   count(*) OVER (PARTITION BY t.u) AS n
            FROM target AS t JOIN b AS h ON h.u = t.u AND h.ts < t.ts
        ),
        per_user AS (
            SELECT u, bool_or(same_category) AS anywhere, bool_or(same_category AND pos > n - ?) AS recent,
                   bool_or(same_item) AS item
            FROM history WHERE n >= ? GROUP BY u
        )
        SELECT count(*) AS users, avg(anywhere::INT) AS last_category_anywhere,
               avg(recent::INT) AS last_category_recent, avg(item::INT) AS last_item_anywhere,
               avg(item::INT) FILTER (WHERE anywhere) AS item_given_category
        FROM per_user
        """,
        [RECENT, MIN_HISTORY],
    )


def generator_constants(path: str | os.PathLike, window: tuple[int, int] = TAOBAO_WINDOW) -> dict[str, object]:
    """The statistics of a real log that dmqn_core.data.synth generates from, keyed by the name of
    the constant that holds them there (the generator never reads a real log itself).

    Each user's sequence, sorted as prep sorts it, is read as a category process: a behavior either
    stays in the category of the one before it, returns to a category the user met earlier (the
    lag is the distance back to its last occurrence), or opens a category new to the user.
    """
    with _behaviors(path, window) as con:
        b = con.execute("SELECT u, i, c, behavior, ts, pos FROM b ORDER BY u, pos").fetchnumpy()
        last_click_repeat = _last_clicks(con)["item_given_category"]
    user, item, category, ts = b["u"], b["i"], b["c"], b["ts"]
    pos = b["pos"] - 1  # from 0
    n = len(user)
    if n < 2:
        raise DmqnError(f"{path} holds too few rows to measure")
    lengths = np.unique(user, return_counts=True)[1]
    follows = np.r_[False, user[1:] == user[:-1]]  # the row has a predecessor of the same user
    gap = np.r_[0, np.diff(ts)]
    session_start = ~follows | (gap >= SESSION_BREAK_S)
    sessions = np.cumsum(session_start)
    session_sizes = np.bincount(sessions)[1:]
    start_hour = ((ts[session_start] + CHINA_UTC_OFFSET_S) % 86_400) // 3600

    same = follows & np.r_[False, category[1:] == category[:-1]]
    # Distance back to the previous occurrence of the row's category in its user's sequence (0: none).
    by_category = np.lexsort((pos, category, user))
    sorted_pos = pos[by_category]
    seen = np.r_[False, (user[by_category][1:] == user[by_category][:-1]) & (np.diff(category[by_category]) == 0)]
    lag = np.zeros(n, dtype=np.int64)
    lag[by_category[seen]] = np.diff(sorted_pos)[seen[1:]]
    returns = follows & ~same & (lag > 0)
    new = follows & ~same & (lag == 0)
    met_item = _met_before(user, item, pos)

    # P(new category | not the same as the one before) falls with the position k like a power law
    # (Heaps' law), and with the user's history length n: log P = log a - b log k - c log n, fitted
    # on cells of k and n bucketed by powers of two (at least 100 rows each, weighted by sqrt(rows)).
    length = np.repeat(lengths, lengths)
    other = np.flatnonzero(follows & ~same)
    cell = np.floor(np.log2(pos[other])) * 64 + np.floor(np.log2(length[other]))
    _, index, size = np.unique(cell, return_inverse=True, return_counts=True)
    p_new = np.bincount(index, weights=new[other]) / size
    used = (size >= 100) & (p_new > 0)
    if used.sum() < 3:
        raise DmqnError(f"{path} holds too few behaviors to fit the new-category law (100 per cell)")
    mean_k = np.bincount(index, weights=pos[other]) / size
    mean_n = np.bincount(index, weights=length[other]) / size
    design = np.stack([np.ones(used.sum()), np.log(mean_k[used]), np.log(mean_n[used])], axis=1)
    weight = np.sqrt(size[used])
    coef = np.linalg.lstsq(design * weight[:, None], np.log(p_new[used]) * weight, rcond=None)[0]

    # Lags of returns as a discrete power law from 2 on (a lag of 1 is "the same"): the maximum
    # likelihood exponent of its continuous approximation (Clauset, Shalizi & Newman 2009, eq. 3.7).
    lags = lag[returns]
    exponent = 1.0 + len(lags) / np.log(lags / 1.5).sum()
    return {
        "BEHAVIOR_MIX": tuple(_round(float(np.mean(b["behavior"] == name))) for name in ("pv", "cart", "fav", "buy")),
        "LENGTH_QUANTILES": _quantiles(lengths),
        "SESSION_SIZE_QUANTILES": _quantiles(session_sizes),
        "SESSION_GAP_QUANTILES": _quantiles(gap[follows & ~session_start]),
        "SESSION_START_BY_HOUR": tuple(_round(x) for x in np.bincount(start_hour, minlength=24) / session_start.sum()),
        "SAME_CATEGORY": _round(float(same.sum() / follows.sum())),
        "NEW_CATEGORY": (_round(float(np.exp(coef[0]))), _round(float(-coef[1])), _round(float(-coef[2]))),
        "RETURN_LAG_EXPONENT": _round(float(exponent)),
        "ITEM_REPEAT": (_power_fit(pos[same], met_item[same]), _power_fit(pos[returns], met_item[returns])),
        "LAST_CLICK_ITEM_REPEAT": _round(last_click_repeat),
    }


def _power_fit(position: np.ndarray, hit: np.ndarray) -> tuple[float, float]:
    """(a, e) of P(hit at position k) = a * k ** e, fitted on positions bucketed by powers of two
    (at least 100 rows each, weighted by sqrt(rows))."""
    bucket = np.floor(np.log2(position)).astype(np.int64)
    size = np.bincount(bucket)
    rate = np.bincount(bucket, weights=hit) / np.maximum(size, 1)
    mean_k = np.bincount(bucket, weights=position) / np.maximum(size, 1)
    used = (size >= 100) & (rate > 0)
    if used.sum() < 2:
        raise DmqnError("too few behaviors to fit the item-repeat law (100 per position bucket)")
    e, log_a = np.polyfit(np.log(mean_k[used]), np.log(rate[used]), 1, w=np.sqrt(size[used]))
    return _round(float(np.exp(log_a))), _round(float(e))


def _met_before(user: np.ndarray, item: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Per row, whether its user met its item at an earlier position."""
    order = np.lexsort((pos, item, user))
    repeated = np.r_[False, (user[order][1:] == user[order][:-1]) & (item[order][1:] == item[order][:-1])]
    out = np.zeros(len(user), dtype=bool)
    out[order] = repeated
    return out


def _quantiles(values: np.ndarray) -> tuple[float, ...]:
    return tuple(_round(float(q)) for q in np.quantile(values, QUANTILE_LEVELS))


def _round(value: float) -> float:
    """Four significant digits: what the generator's constants are written with."""
    return float(f"{value:.4g}")


def synthetic_log_statistics(scale: str | SynthScale, seed: int = 0) -> LogStatistics:
    """The statistics of the log `dmqn synth` writes at this scale and seed, through a temporary file
    (removed afterwards), so that exactly what a user would get is measured."""
    with tempfile.TemporaryDirectory(prefix="dmqn-synth-") as folder:
        path = Path(folder) / "synthetic.csv"
        write_log(path, scale, seed)
        return log_statistics(path)
