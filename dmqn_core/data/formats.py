"""Readers of the source formats of ``dmqn prep``: each loads one log into a DuckDB table.

Every reader creates the table ``events`` whose rowid is the file order, one row per line:

    reason       NULL for a valid row, else blank / bad_columns / bad_id / bad_behavior / bad_timestamp
    bad_line     the raw line of an invalid row (for error messages), NULL otherwise
    user_id, item_id, category_id   BIGINT raw ids
    behavior     VARCHAR behavior-type name
    ts           BIGINT unix seconds

and reports lines that DuckDB could not decode (invalid UTF-8) through a rejects table, which
``dmqn_core.data.prep`` counts as ``bad_encoding``. Lines are read whole as one VARCHAR column and
split in SQL, so every malformed row is classified (and counted) instead of aborting the read.

Ids (user, item, and category where the log gives it as a number) must be decimal integers with
an optional sign, surrounding blanks allowed, that fit int64: ``3056199.7``, ``1e3``, ``0x10``
or ``1_000`` (all of which DuckDB's cast would round or convert) make the row ``bad_id``. The
sign is allowed because ids hashed to 64 bits are often negative. Unix timestamps follow the same
rule (``1511544070.7``, ``1e9``, ``0x10`` and ``1_000`` make the row ``bad_timestamp``: a rounded or
converted time would silently reorder a history); the ``csv`` format also takes ISO-8601 date-times.

A file is read as gzip exactly when it starts with gzip's magic bytes, whatever its name; a file
named ``.gz`` that is not gzip is an error (see source_compression).

Formats:

* ``taobao``: ``user_id,item_id,category_id,behavior_type,timestamp``, no header, behavior in
  pv/cart/fav/buy (Tianchi UserBehavior); ``.csv.gz`` is read too.
* ``movielens``: a folder, detected from its files: 100K (``u.data`` + ``u.item``), 1M
  (``ratings.dat`` + ``movies.dat``) or latest/20M/25M (``ratings.csv`` + ``movies.csv``). A
  rating >= 4 is the behavior ``click``, a lower one ``rate_low``. The category is the movie's
  FIRST listed genre; genre ids follow the 100K list ``GENRES`` (``unknown`` = 0 ... ``Western``
  = 18, then ``IMAX``, ``(no genres listed)``), so the variants share ids; ``Children`` (1M and
  later spell it so) is ``Children's``; any other genre name gets an id after those, in name
  order. Item files are Latin-1 (100K, 1M) and read as such. A rating of a movie missing from
  the item file is a ``bad_id`` row.
* ``csv``: any delimited file with a header; ``--columns`` names the columns holding user, item,
  timestamp (required), category and behavior (optional). Without a category column every item
  is in one category (raw id 0); without a behavior column every row is the behavior ``click``.
  Timestamps are integer unix seconds or ISO-8601 date-times (UTC unless they carry an offset).
"""

from __future__ import annotations

import enum
import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import duckdb

from dmqn_core.errors import DmqnError

# A delimiter no text line contains, so read_csv hands each line over whole.
_LINE_DELIM = "\x1f\x1e\x1d\x1c"
_HEAD_BYTES = 1 << 20
_HEAD_LINES = 10
# A decimal integer; TRY_CAST(... AS BIGINT) alone also takes 1.5, 1e3, 0x10, 0b1 and 1_000.
_INTEGER_PATTERN = r"\s*[+-]?[0-9]+\s*"
# What the gzip module raises for a damaged stream (BadGzipFile is an OSError: a failing disk is not).
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)

TAOBAO_BEHAVIORS = ("pv", "cart", "fav", "buy")
MOVIELENS_BEHAVIORS = ("click", "rate_low")
CSV_DEFAULT_BEHAVIOR = "click"
CSV_NO_CATEGORY = 0
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
    "IMAX",
    "(no genres listed)",
)
GENRE_ALIASES = {"Children": "Children's"}
CSV_FIELDS = ("user", "item", "category", "behavior", "timestamp")
CSV_REQUIRED = ("user", "item", "timestamp")


class Format(str, enum.Enum):
    taobao = "taobao"
    movielens = "movielens"
    csv = "csv"


@dataclass
class SourceInfo:
    """What a reader found: the files it read and how to interpret the ``events`` table."""

    variant: str
    files: list[Path]
    behaviors: tuple[str, ...] | None  # the closed set of behavior names, None when data-defined
    default_clicks: tuple[str, ...] | None  # None: every behavior present is a click
    header_lines: int  # lines before the first data row (for line numbers in messages)
    rejects_table: str
    log_file: Path


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


def quote_identifier(name: str) -> str:
    """DuckDB identifier quoting; used only for column names already checked against the header."""
    return '"' + name.replace('"', '""') + '"'


_NOT_A_FILE = {
    Format.taobao: "--format taobao reads one CSV log",
    Format.csv: "--format csv reads one delimited file with a header",
}


def source_files(source: Path, fmt: Format) -> list[Path]:
    """The files that ``load_source`` will read for ``source`` (checked to exist), in reading order."""
    if fmt is Format.movielens:
        _, ratings, items = _movielens_files(source)
        return [ratings, items]
    if not source.is_file():
        raise DmqnError(f"{source} is not a file ({_NOT_A_FILE[fmt]})")
    return [source]


def load_source(
    con: duckdb.DuckDBPyConnection, source: Path, fmt: Format, columns: dict[str, str], delimiter: str
) -> SourceInfo:
    """Create ``events`` (and its rejects table) from ``source`` in format ``fmt``."""
    source_files(source, fmt)  # its checks: one file, or a MovieLens folder
    if fmt is Format.taobao:
        return _load_taobao(con, source)
    if fmt is Format.movielens:
        return _load_movielens(con, source)
    return _load_csv(con, source, columns, delimiter)


def _integer_sql(expr: str) -> str:
    """SQL for the BIGINT value of the text ``expr`` when it is a decimal integer fitting int64, else NULL."""
    return f"CASE WHEN regexp_full_match({expr}, '{_INTEGER_PATTERN}') THEN TRY_CAST({expr} AS BIGINT) END"


def is_gzip(path: Path) -> bool:
    """Whether the file starts with gzip's magic bytes."""
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def source_compression(path: Path) -> str:
    """DuckDB's ``compression`` for ``path``, from its first bytes: DuckDB itself would go by the
    name, reading gzip bytes named ``.csv`` as text and failing with a traceback on text named ``.gz``."""
    if is_gzip(path):
        return "gzip"
    if path.name.lower().endswith(".gz"):
        raise DmqnError(f"{path} is not gzip, although its name ends in .gz")
    return "none"


def damaged_gzip(path: Path, exc: BaseException) -> DmqnError:
    """The one-line error for a gzip file whose decompression raised ``exc`` (one of GZIP_ERRORS)."""
    text = str(exc)
    if isinstance(exc, EOFError):
        reason = "it ends early (truncated?)"
    elif "CRC check failed" in text:
        reason = "CRC check failed"
    elif "Incorrect length" in text:
        reason = "length check failed"
    elif "Not a gzipped file" in text:
        reason = "it has trailing data that is not gzip"
    else:  # zlib: 'Error -3 while decompressing data: invalid block type'
        reason = f"corrupt data ({text.rpartition(': ')[2]})"
    return DmqnError(f"{path} is a damaged gzip file: {reason}")


def _read_lines_sql(encoding: str, skip: int, rejects: str | None, compression: str) -> str:
    """A read_csv call giving one VARCHAR column ``line`` per line; the path is parameter 1."""
    options = (
        f"columns={{'line': 'VARCHAR'}}, delim='{_LINE_DELIM}', header=false, quote='', escape='', "
        f"auto_detect=false, strict_mode=false, encoding='{encoding}', skip={int(skip)}, "
        f"compression='{compression}'"
    )
    if rejects:
        options += f", ignore_errors=true, store_rejects=true, rejects_table='{rejects}', rejects_scan='{rejects}_scan'"
    else:
        options += ", ignore_errors=true"
    return f"read_csv(?, {options})"


def _head_lines(path: Path, encoding: str = "utf-8") -> list[tuple[int, str | None]]:
    """The first non-empty lines as (line number, text); text None when it does not decode."""
    try:
        opener = gzip.open if source_compression(path) == "gzip" else open
        with opener(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except GZIP_ERRORS as exc:
        raise damaged_gzip(path, exc) from None
    except OSError as exc:
        raise DmqnError(f"cannot read {path}: {exc.strerror or exc}") from None
    raw_lines = head.split(b"\n")
    if len(head) == _HEAD_BYTES and len(raw_lines) > 1:
        raw_lines = raw_lines[:-1]  # the last line may be cut in the middle of a character
    lines: list[tuple[int, str | None]] = []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            text: str | None = raw.decode(encoding).rstrip(" \t\r")
        except UnicodeDecodeError:
            text = None
        lines.append((number, text))
        if len(lines) == _HEAD_LINES:
            break
    return lines


def _check_head(path: Path, what: str, n_columns: int, split: str, delim_name: str, skip_first: bool = False) -> None:
    """Fail fast when the first lines show the file is not in the expected format.

    A file is rejected when most of its first non-empty lines are undecodable or have the wrong
    number of columns; a few bad lines among good ones are left to the row-level counting.
    """
    lines = _head_lines(path)
    if skip_first:
        lines = lines[1:]
    if not lines:
        raise DmqnError(f"{path} is empty (no data rows)")
    bad: list[str] = []
    for number, text in lines:
        if text is None:
            bad.append(f"{path} is not UTF-8 text: undecodable bytes on line {number} (is --format right?)")
        elif len(text.split(split)) != n_columns:
            bad.append(
                f"{what} expects {n_columns} {delim_name}-separated columns, "
                f"line {number} of {path.name} has {len(text.split(split))}"
            )
    if len(bad) * 2 > len(lines):
        raise DmqnError(bad[0])


def _load_taobao(con: duckdb.DuckDBPyConnection, path: Path) -> SourceInfo:
    _check_head(path, "taobao", 5, ",", "comma")
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
                SELECT line, p, {_integer_sql("p[1]")} AS u, {_integer_sql("p[2]")} AS i,
                       {_integer_sql("p[3]")} AS c, p[4] AS b, {_integer_sql("p[5]")} AS t
                FROM (SELECT line, string_split(line, ',') AS p
                      FROM {_read_lines_sql("utf-8", 0, "rejects_log", source_compression(path))})
            )
        )
        """,
        [list(TAOBAO_BEHAVIORS), str(path)],
    )
    return SourceInfo("taobao-userbehavior", [path], TAOBAO_BEHAVIORS, ("pv",), 0, "rejects_log", path)


def _movielens_files(folder: Path) -> tuple[str, Path, Path]:
    """(variant, ratings file, item file) of a MovieLens folder."""
    if not folder.is_dir():
        raise DmqnError(f"{folder} is not a folder (--format movielens reads a MovieLens folder, e.g. ml-100k/)")
    variants = (
        ("ml-100k", "u.data", "u.item"),
        ("ml-1m", "ratings.dat", "movies.dat"),
        ("ml-latest", "ratings.csv", "movies.csv"),
    )
    for variant, ratings_name, items_name in variants:
        ratings, items = folder / ratings_name, folder / items_name
        if ratings.is_file() and items.is_file():
            return variant, ratings, items
    raise DmqnError(
        f"{folder} is not a MovieLens folder: expected u.data + u.item (100K), "
        "ratings.dat + movies.dat (1M) or ratings.csv + movies.csv (latest)"
    )


def _load_movielens(con: duckdb.DuckDBPyConnection, folder: Path) -> SourceInfo:
    variant, ratings, items = _movielens_files(folder)
    _load_genre_table(con)
    if variant == "ml-100k":
        _check_head(ratings, "MovieLens u.data", 4, "\t", "tab")
        _check_items_nonempty(items)
        # u.item: id|title|release|video release|IMDb url|19 genre flags; the first flag set wins.
        con.execute(
            f"""
            CREATE TABLE movies AS
            SELECT item_id, coalesce(list_position(flags, '1') - 1, 0) AS category_id
            FROM (SELECT {_integer_sql("p[1]")} AS item_id, list_slice(p, -19, -1) AS flags, len(p) AS n
                  FROM (SELECT string_split(rtrim(line, ' \t\r'), '|') AS p
                        FROM {_read_lines_sql("latin-1", 0, None, source_compression(items))}
                        WHERE line IS NOT NULL))
            WHERE item_id IS NOT NULL AND n >= 20
            """,
            [str(items)],
        )
        split, header = "\t", 0
    elif variant == "ml-1m":
        _check_head(ratings, "MovieLens ratings.dat", 4, "::", "'::'")
        _check_items_nonempty(items)
        _create_movies_from_genres(
            con,
            items,
            "latin-1",
            0,
            _integer_sql("split_part(line, '::', 1)"),
            "split_part(regexp_extract(line, '[^:]*$'), '|', 1)",
        )
        split, header = "::", 0
    else:
        _check_head(ratings, "MovieLens ratings.csv", 4, ",", "comma", skip_first=True)
        _check_items_nonempty(items)
        # Titles may be quoted and hold commas; the id is the first field and the genres the last.
        _create_movies_from_genres(
            con,
            items,
            "utf-8",
            1,
            _integer_sql("split_part(line, ',', 1)"),
            "split_part(regexp_extract(line, '[^,]*$'), '|', 1)",
        )
        split, header = ",", 1
    con.execute(
        f"""
        CREATE TABLE events AS
        SELECT reason, CASE WHEN reason IS NOT NULL THEN line END AS bad_line,
               u AS user_id, i AS item_id, CAST(NULL AS BIGINT) AS category_id,
               CASE WHEN r >= 4 THEN 'click' ELSE 'rate_low' END AS behavior, t AS ts
        FROM (
            SELECT line, u, i, r, t,
                   CASE WHEN line IS NULL OR trim(line) = '' THEN 'blank'
                        WHEN len(p) <> 4 THEN 'bad_columns'
                        WHEN u IS NULL OR i IS NULL THEN 'bad_id'
                        WHEN r IS NULL THEN 'bad_behavior'
                        WHEN t IS NULL THEN 'bad_timestamp'
                   END AS reason
            FROM (
                SELECT line, p, {_integer_sql("p[1]")} AS u, {_integer_sql("p[2]")} AS i,
                       TRY_CAST(trim(p[3]) AS DOUBLE) AS r, {_integer_sql("p[4]")} AS t
                FROM (SELECT line, string_split(rtrim(line, ' \t\r'), ?) AS p
                      FROM {_read_lines_sql("utf-8", header, "rejects_log", source_compression(ratings))})
            )
        )
        """,
        [split, str(ratings)],
    )
    # In place, so that the rowid (file order) stays as read.
    con.execute(
        """
        UPDATE events SET category_id = movies.category_id FROM movies
        WHERE events.reason IS NULL AND events.item_id = movies.item_id
        """
    )
    con.execute(
        "UPDATE events SET reason = 'bad_id', bad_line = concat_ws(' ', user_id, item_id, ts) "
        "WHERE reason IS NULL AND category_id IS NULL"
    )
    return SourceInfo(variant, [ratings, items], MOVIELENS_BEHAVIORS, ("click",), header, "rejects_log", ratings)


def _check_items_nonempty(path: Path) -> None:
    if not _head_lines(path, "latin-1"):
        raise DmqnError(f"{path} is empty (the movie file gives each item its genre)")


def _load_genre_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        "CREATE TABLE genres AS SELECT unnest(?) AS name, unnest(?) AS id",
        [list(GENRES), list(range(len(GENRES)))],
    )
    con.execute(
        "INSERT INTO genres SELECT unnest(?) AS name, unnest(?) AS id",
        [list(GENRE_ALIASES), [GENRES.index(target) for target in GENRE_ALIASES.values()]],
    )


def _create_movies_from_genres(
    con: duckdb.DuckDBPyConnection, path: Path, encoding: str, skip: int, id_sql: str, genre_sql: str
) -> None:
    """``movies(item_id, category_id)`` from a file listing each movie's '|'-joined genres."""
    con.execute(
        f"""
        CREATE TABLE movie_genres AS
        SELECT {id_sql} AS item_id, {genre_sql} AS genre
        FROM (SELECT rtrim(line, ' \t\r') AS line
              FROM {_read_lines_sql(encoding, skip, None, source_compression(path))}
              WHERE line IS NOT NULL)
        """,
        [str(path)],
    )
    con.execute(
        """
        CREATE TABLE movies AS
        WITH other AS (
            SELECT genre, ? + dense_rank() OVER (ORDER BY genre) - 1 AS id
            FROM (SELECT DISTINCT genre FROM movie_genres WHERE genre NOT IN (SELECT name FROM genres))
        )
        SELECT m.item_id, min(coalesce(g.id, o.id)) AS category_id
        FROM movie_genres m LEFT JOIN genres g ON g.name = m.genre LEFT JOIN other o ON o.genre = m.genre
        WHERE m.item_id IS NOT NULL
        GROUP BY m.item_id
        """,
        [len(GENRES)],
    )


def _load_csv(con: duckdb.DuckDBPyConnection, path: Path, columns: dict[str, str], delimiter: str) -> SourceInfo:
    missing = [field for field in CSV_REQUIRED if field not in columns]
    if missing:
        raise DmqnError(f"--format csv needs --columns with {', '.join(f'{m}=COLUMN' for m in missing)}")
    if len(delimiter) != 1 or delimiter in '\r\n"':
        raise DmqnError(f"--delimiter must be one character other than a quote or newline, got {delimiter!r}")
    lines = _head_lines(path)
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
    category = _integer_sql(col["category"]) if "category" in col else "CAST(? AS BIGINT)"
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
                SELECT {_integer_sql(col["user"])} AS u, {_integer_sql(col["item"])} AS i,
                       {category} AS c, {behavior} AS b,
                       coalesce({_integer_sql(col["timestamp"])},
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


def reject_reason_sql(error_type: str) -> str:
    """SQL for the row reason of a line that DuckDB's reader rejected, given its error type expression."""
    return f"CASE WHEN upper({error_type}) LIKE '%ENCODING%' THEN 'bad_encoding' ELSE 'bad_columns' END"


def one_line(text: str, limit: int = 120) -> str:
    """A raw line shortened for a one-line error message."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
