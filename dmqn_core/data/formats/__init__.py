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

The package: one module per format (``taobao``, ``movielens``, ``delimited`` for ``csv``) and ``reading``,
what they share; ``load_source`` picks the reader of a format.
"""

from __future__ import annotations

import enum
from pathlib import Path

import duckdb

from dmqn_core.data.formats.delimited import (
    CSV_DEFAULT_BEHAVIOR,
    CSV_FIELDS,
    CSV_NO_CATEGORY,
    CSV_REQUIRED,
    load_csv,
    parse_columns,
)
from dmqn_core.data.formats.movielens import GENRE_ALIASES, GENRES, MOVIELENS_BEHAVIORS, load_movielens, movielens_files
from dmqn_core.data.formats.reading import (
    GZIP_ERRORS,
    SourceInfo,
    damaged_gzip,
    is_gzip,
    one_line,
    quote_identifier,
    reject_reason_sql,
    source_compression,
)
from dmqn_core.data.formats.taobao import TAOBAO_BEHAVIORS, load_taobao
from dmqn_core.errors import DmqnError

__all__ = [
    "CSV_DEFAULT_BEHAVIOR",
    "CSV_FIELDS",
    "CSV_NO_CATEGORY",
    "CSV_REQUIRED",
    "GENRES",
    "GENRE_ALIASES",
    "GZIP_ERRORS",
    "MOVIELENS_BEHAVIORS",
    "TAOBAO_BEHAVIORS",
    "Format",
    "SourceInfo",
    "damaged_gzip",
    "is_gzip",
    "load_source",
    "one_line",
    "parse_columns",
    "quote_identifier",
    "reject_reason_sql",
    "source_compression",
    "source_files",
]


class Format(str, enum.Enum):
    taobao = "taobao"
    movielens = "movielens"
    csv = "csv"


_NOT_A_FILE = {
    Format.taobao: "--format taobao reads one CSV log",
    Format.csv: "--format csv reads one delimited file with a header",
}


def source_files(source: Path, fmt: Format) -> list[Path]:
    """The files that ``load_source`` will read for ``source`` (checked to exist), in reading order."""
    if fmt is Format.movielens:
        _, ratings, items = movielens_files(source)
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
        return load_taobao(con, source)
    if fmt is Format.movielens:
        return load_movielens(con, source)
    return load_csv(con, source, columns, delimiter)
