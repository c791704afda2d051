"""The ``csv`` format: any delimited file with a header, its columns named by ``--columns``."""

from __future__ import annotations

from pathlib import Path

import duckdb

from dmqn_core.data.formats.reading import SourceInfo, head_lines, integer_sql, quote_identifier, source_compression
from dmqn_core.errors import DmqnError

CSV_DEFAULT_BEHAVIOR = "click"
CSV_NO_CATEGORY = 0
CSV_FIELDS = ("user", "item", "category", "behavior", "timestamp")
CSV_REQUIRED = ("user", "item", "timestamp")


def parse_columns(text: str | None) -> dict[str, str]:
    """``user=uid,item=iid,...`` -> {"user": "uid", ...}; keys checked, values are column names."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise DmqnError(f"--columns: expected FIELD=COLUMN, got {part.strip()!r}")
        if key not in CSV_FIELDS:
            raise DmqnError(f"--columns: unknown field {key!r}; fields are {', '.join(CSV_FIELDS)}")
        if key in mapping:
            raise DmqnError(f"--columns: {key} is given twice")
        mapping[key] = value
    return mapping


def load_csv(con: duckdb.DuckDBPyConnection, path: Path, columns: dict[str, str], delimiter: str) -> SourceInfo:
    missing = [field for field in CSV_REQUIRED if field not in columns]
    if missing:
        raise DmqnError(f"--format csv needs --columns with {', '.join(f'{m}=COLUMN' for m in missing)}")
    if len(delimiter) != 1 or delimiter in '\r\n"':
        raise DmqnError(f"--delimiter must be one character other than a quote or newline, got {delimiter!r}")
    lines = head_lines(path)
    if not lines:
        raise DmqnError(f"{path} is empty (no header and no data rows)")
    if lines[0][1] is None:
        raise DmqnError(f"{path} is not UTF-8 text: undecodable bytes on line {lines[0][0]}")
    if len(lines) < 2:
        raise DmqnError(f"{path} has a header but no data rows")
    options = f"header=true, all_varchar=true, delim=?, strict_mode=false, compression='{source_compression(path)}'"
    try:
        names = [
            row[0]
            for row in con.execute(f"DESCRIBE SELECT * FROM read_csv(?, {options})", [str(path), delimiter]).fetchall()
        ]
    except duckdb.Error as exc:
        raise DmqnError(f"cannot read {path} as delimited text: {str(exc).splitlines()[0]}") from None
    unknown = [f"{field}={name}" for field, name in columns.items() if name not in names]
    if unknown:
        raise DmqnError(
            f"--columns {', '.join(unknown)}: no such column in {path.name} (its columns: {', '.join(names)})"
        )
    col = {field: quote_identifier(name) for field, name in columns.items()}
    category = integer_sql(col["category"]) if "category" in col else "CAST(? AS BIGINT)"
    behavior = f"nullif(trim({col['behavior']}), '')" if "behavior" in col else "CAST(? AS VARCHAR)"
    params: list = []
    if "category" not in col:
        params.append(CSV_NO_CATEGORY)
    if "behavior" not in col:
        params.append(CSV_DEFAULT_BEHAVIOR)
    line_sql = "concat_ws(?, " + ", ".join(col[f] for f in CSV_FIELDS if f in col) + ")"
    params += [delimiter, str(path), delimiter]
    con.execute(
        f"""
        CREATE TABLE events AS
        SELECT reason, CASE WHEN reason IS NOT NULL THEN line END AS bad_line,
               u AS user_id, i AS item_id, c AS category_id, b AS behavior, t AS ts
        FROM (
            SELECT line, u, i, c, b, t,
                   CASE WHEN u IS NULL OR i IS NULL OR c IS NULL THEN 'bad_id'
                        WHEN b IS NULL THEN 'bad_behavior'
                        WHEN t IS NULL THEN 'bad_timestamp'
                   END AS reason
            FROM (
                SELECT {integer_sql(col["user"])} AS u, {integer_sql(col["item"])} AS i,
                       {category} AS c, {behavior} AS b,
                       coalesce({integer_sql(col["timestamp"])},
                                CAST(floor(epoch(TRY_CAST(trim({col["timestamp"]}) AS TIMESTAMPTZ))) AS BIGINT)) AS t,
                       {line_sql} AS line
                FROM read_csv(?, {options}, ignore_errors=true, store_rejects=true,
                              rejects_table='rejects_log', rejects_scan='rejects_log_scan')
            )
        )
        """,
        params,
    )
    behaviors = None if "behavior" in col else (CSV_DEFAULT_BEHAVIOR,)
    return SourceInfo(f"csv({delimiter!r})", [path], behaviors, None, 1, "rejects_log", path)
