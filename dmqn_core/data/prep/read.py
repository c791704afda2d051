"""Stage 1 of a prep, reading: the source becomes the table ``events``, every row of it with the reason it is
invalid (NULL for a valid one; protocol step 1), and the rejected lines stay in DuckDB; the rows are counted
by reason, and a log with too many invalid rows (any, with --strict) fails here with an example line."""

from __future__ import annotations

import duckdb

from dmqn_core.data.formats import SourceInfo, load_source, one_line, reject_reason_sql
from dmqn_core.data.prep.context import PrepContext
from dmqn_core.data.prep.options import PrepSettings
from dmqn_core.errors import DmqnError

INVALID_REASONS = ("bad_encoding", "bad_columns", "bad_id", "bad_behavior", "bad_timestamp", "out_of_time_range")
ROW_REASONS = (*INVALID_REASONS, "duplicate")


def read_log(ctx: PrepContext) -> tuple[SourceInfo, int, dict[str, int]]:
    """Load the source into ``events``: what was read, how many rows, and how many of them by reason."""
    settings = ctx.settings
    try:
        info = load_source(ctx.con, settings.source, settings.fmt, settings.columns, settings.delimiter)
    except duckdb.IOException as exc:
        raise DmqnError(f"reading {settings.source} failed: {str(exc).splitlines()[0]}") from None
    rows_read, rows_bad = _count_rows(ctx.con, settings, info)
    return info, rows_read, rows_bad


def _count_rows(con: duckdb.DuckDBPyConnection, settings: PrepSettings, info: SourceInfo) -> tuple[int, dict[str, int]]:
    if settings.time_range is not None:
        # In place (rowid stays the file order); only the few stray rows are written.
        con.execute(
            "UPDATE events SET reason = 'out_of_time_range' WHERE reason IS NULL AND (ts < ? OR ts >= ?)",
            list(settings.time_range),
        )
    _mark_duplicates(con)
    per_reason = con.execute(
        "SELECT reason, count(*), min(rowid) FROM events WHERE reason IS DISTINCT FROM 'blank' GROUP BY reason"
    ).fetchall()
    # Rejected lines stay in DuckDB: a bad file may have millions of them.
    con.execute(
        f"""
        CREATE TEMP TABLE rejected AS
        SELECT line, {reject_reason_sql("any_value(error_type)")} AS reason
        FROM {info.rejects_table} GROUP BY line
        """
    )
    rows_bad = {reason: 0 for reason in ROW_REASONS}
    first: dict[str, int] = {}  # reason -> line number of its first row
    total = 0
    per_reject = con.execute("SELECT reason, count(*), min(line) FROM rejected GROUP BY reason").fetchall()
    for reason, n, line in per_reject:
        total += n
        rows_bad[reason] += n
        first[reason] = int(line)
    for reason, n, rid in per_reason:
        total += n
        if reason is not None:
            rows_bad[reason] += n
        if reason in INVALID_REASONS:
            line = _line_number(con, int(rid), info)
            first[reason] = min(first.get(reason, line), line)
    n_bad = sum(rows_bad[reason] for reason in INVALID_REASONS)
    if total == 0:
        raise DmqnError(f"{info.log_file} is empty (no data rows)")
    if n_bad and (settings.strict or n_bad == total or 2 * n_bad > total):
        reason = (
            min(first, key=first.__getitem__)
            if settings.strict
            else max((r for r in INVALID_REASONS if rows_bad[r]), key=rows_bad.__getitem__)
        )
        example = _describe_bad(con, settings, info, reason, first[reason])
        if settings.strict:
            raise DmqnError(f"--strict: {example} ({n_bad} bad row(s) in all)")
        hint = "check --time-range" if reason == "out_of_time_range" else "is --format right?"
        what = "no valid row" if n_bad == total else f"{n_bad} of {total} rows are invalid"
        raise DmqnError(f"{info.log_file}: {what}, mostly {reason} ({rows_bad[reason]}), e.g. {example} — {hint}")
    return total, rows_bad


def _mark_duplicates(con: duckdb.DuckDBPyConnection) -> None:
    # Grouping one 64-bit hash of the five columns costs about 40% less than grouping the
    # columns (measured at 8M rows); only the few rows whose hash repeats are then compared
    # column by column, so a hash collision never drops a row.
    con.execute(
        """
        CREATE TEMP TABLE repeated AS
        SELECT h FROM (SELECT hash(user_id, item_id, category_id, behavior, ts) AS h FROM events
                       WHERE reason IS NULL)
        GROUP BY h HAVING count(*) > 1
        """
    )
    con.execute(
        """
        UPDATE events SET reason = 'duplicate' WHERE rowid IN (
            SELECT rowid FROM events
            WHERE reason IS NULL AND hash(user_id, item_id, category_id, behavior, ts) IN (SELECT h FROM repeated)
            QUALIFY row_number() OVER (PARTITION BY user_id, item_id, category_id, behavior, ts ORDER BY rowid) > 1
        )
        """
    )
    con.execute("DROP TABLE repeated")


def _line_number(con: duckdb.DuckDBPyConnection, rid: int, info: SourceInfo) -> int:
    # events holds every line but the rejected ones, in file order. The j-th rejected line
    # (line r_j, j from 1) has r_j - header - j lines of events before it, so the ones before
    # events row rid are those where that number is at most rid.
    skipped = con.execute(
        "SELECT count(*) FROM (SELECT line - row_number() OVER (ORDER BY line) AS before FROM rejected) "
        "WHERE before - ? <= ?",
        [info.header_lines, rid],
    ).fetchall()[0][0]
    return rid + 1 + info.header_lines + skipped


def _describe_bad(
    con: duckdb.DuckDBPyConnection, settings: PrepSettings, info: SourceInfo, reason: str, line: int
) -> str:
    where = f"line {line} of {info.log_file.name}"
    if reason == "bad_encoding":
        return f"{where} is not valid UTF-8"
    rejected_before, is_rejected = con.execute(
        "SELECT count(*) FILTER (WHERE line < ?), count(*) FILTER (WHERE line = ?) FROM rejected", [line, line]
    ).fetchall()[0]
    if reason == "bad_columns" and is_rejected:
        return f"{where} has the wrong number of columns"
    rid = line - 1 - info.header_lines - rejected_before
    bad_line, ts = con.execute("SELECT bad_line, ts FROM events WHERE rowid = ?", [rid]).fetchall()[0]
    if reason == "out_of_time_range":
        # Only a checked range marks rows so (_count_rows): a (low, high) pair, neither None nor "default".
        assert isinstance(settings.time_range, tuple)
        lo, hi = settings.time_range
        return f"{where} has timestamp {ts}, outside --time-range [{lo}, {hi})"
    return f"{where} is {reason}: {one_line(bad_line or '')!r}"
