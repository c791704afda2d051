"""What every reader of ``dmqn prep`` shares: the SourceInfo it returns, reading a file's lines whole (gzip known
by its bytes, a damaged one in one line), the check of its first lines, and the SQL of a decimal integer."""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from dmqn_core.errors import DmqnError

# A delimiter no text line contains, so read_csv hands each line over whole.
_LINE_DELIM = "\x1f\x1e\x1d\x1c"
_HEAD_BYTES = 1 << 20
_HEAD_LINES = 10
# A decimal integer; TRY_CAST(... AS BIGINT) alone also takes 1.5, 1e3, 0x10, 0b1 and 1_000.
_INTEGER_PATTERN = r"\s*[+-]?[0-9]+\s*"
# What the gzip module raises for a damaged stream (BadGzipFile is an OSError: a failing disk is not).
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


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


def quote_identifier(name: str) -> str:
    """DuckDB identifier quoting; used only for column names already checked against the header."""
    return '"' + name.replace('"', '""') + '"'


def integer_sql(expr: str) -> str:
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


def read_lines_sql(encoding: str, skip: int, rejects: str | None, compression: str) -> str:
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


def head_lines(path: Path, encoding: str = "utf-8") -> list[tuple[int, str | None]]:
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


def check_head(path: Path, what: str, n_columns: int, split: str, delim_name: str, skip_first: bool = False) -> None:
    """Fail fast when the first lines show the file is not in the expected format.

    A file is rejected when most of its first non-empty lines are undecodable or have the wrong
    number of columns; a few bad lines among good ones are left to the row-level counting.
    """
    lines = head_lines(path)
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


def reject_reason_sql(error_type: str) -> str:
    """SQL for the row reason of a line that DuckDB's reader rejected, given its error type expression."""
    return f"CASE WHEN upper({error_type}) LIKE '%ENCODING%' THEN 'bad_encoding' ELSE 'bad_columns' END"


def one_line(text: str, limit: int = 120) -> str:
    """A raw line shortened for a one-line error message."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
