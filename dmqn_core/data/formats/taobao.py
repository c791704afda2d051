"""The ``taobao`` format: the Tianchi UserBehavior CSV (``user_id,item_id,category_id,behavior_type,timestamp``,
no header, behavior in pv/cart/fav/buy), plain or gzip."""

from __future__ import annotations

from pathlib import Path

import duckdb

from dmqn_core.data.formats.reading import SourceInfo, check_head, integer_sql, read_lines_sql, source_compression

TAOBAO_BEHAVIORS = ("pv", "cart", "fav", "buy")


def load_taobao(con: duckdb.DuckDBPyConnection, path: Path) -> SourceInfo:
    check_head(path, "taobao", 5, ",", "comma")
    con.execute(
        f"""
        CREATE TABLE events AS
        SELECT reason, CASE WHEN reason IS NOT NULL THEN line END AS bad_line,
               u AS user_id, i AS item_id, c AS category_id, b AS behavior, t AS ts
        FROM (
            SELECT line, u, i, c, b, t,
                   CASE WHEN line IS NULL THEN 'blank'
                        WHEN len(p) <> 5 THEN 'bad_columns'
                        WHEN u IS NULL OR i IS NULL OR c IS NULL THEN 'bad_id'
                        WHEN NOT list_contains(?, b) THEN 'bad_behavior'
                        WHEN t IS NULL THEN 'bad_timestamp'
                   END AS reason
            FROM (
                -- No trim(): it doubles the cost on 100M rows, and TRY_CAST already accepts
                -- surrounding blanks (including the CR of CRLF files, which ends the timestamp).
                SELECT line, p, {integer_sql("p[1]")} AS u, {integer_sql("p[2]")} AS i,
                       {integer_sql("p[3]")} AS c, p[4] AS b, {integer_sql("p[5]")} AS t
                FROM (SELECT line, string_split(line, ',') AS p
                      FROM {read_lines_sql("utf-8", 0, "rejects_log", source_compression(path))})
            )
        )
        """,
        [list(TAOBAO_BEHAVIORS), str(path)],
    )
    return SourceInfo("taobao-userbehavior", [path], TAOBAO_BEHAVIORS, ("pv",), 0, "rejects_log", path)
