"""Writing a synthetic log as a headerless Taobao CSV, atomically: a small scale in one piece through DuckDB,
a blocked one block by block through Arrow's CSV writer."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from time import perf_counter

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dmqn_core.data.synth.log import ARROW_SCHEMA, BlockedLog, generate_log
from dmqn_core.data.synth.scales import (
    BEHAVIORS,
    CATEGORY_ID_RANGE,
    ITEM_ID_RANGE,
    USER_ID_RANGE,
    SynthScale,
    resolve_scale,
)
from dmqn_core.errors import DmqnError
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.workspace import new_temporary_file


@dataclass(frozen=True)
class SynthSummary:
    rows: int  # lines written, malformed ones included
    users: int
    items: int
    categories: int
    path: Path
    malformed: int = 0
    out_of_range: int = 0


def write_log(
    path: str | os.PathLike, scale: str | SynthScale = "small", seed: int = 0, progress: Progress | None = None
) -> SynthSummary:
    """Generate a log and write it as a headerless Taobao CSV, atomically.

    A blocked scale (``block_users`` set, e.g. ``taobao``) is generated and written one block
    of users at a time, so memory stays bounded whatever the number of rows; ``progress``
    counts its users.
    """
    cfg = resolve_scale(scale)
    path = Path(path).expanduser()
    if path.is_dir():
        raise DmqnError(f"{path} is a directory, expected a CSV file path")
    if not path.parent.is_dir():
        raise DmqnError(f"directory {path.parent} does not exist")
    progress = progress or NullProgress()
    try:
        fd, tmp = new_temporary_file(path)
    except OSError as exc:
        raise DmqnError(f"cannot write {path}: {exc}") from exc
    os.close(fd)  # DuckDB and pyarrow open it again by name, and only this process knows the name
    try:
        if cfg.block_users is None:
            summary = _write_in_memory(tmp, cfg, seed, progress)
        else:
            summary = _write_blocks(tmp, cfg, seed, progress)
        os.replace(tmp, path)
    except (OSError, duckdb.IOException) as exc:
        raise DmqnError(f"cannot write {path}: {exc}") from exc
    finally:
        progress.stop()
        tmp.unlink(missing_ok=True)
    return replace(summary, path=path.resolve())


def _write_in_memory(tmp: Path, cfg: SynthScale, seed: int, progress: Progress) -> SynthSummary:
    progress.start("generating the synthetic log", total=None)
    log = generate_log(cfg, seed)
    names = ", ".join(f"'{b}'" for b in BEHAVIORS)
    with duckdb.connect() as con:
        con.execute("SET enable_progress_bar = false")  # the CLI shows its own progress
        con.register("log", log)
        con.execute(
            f"COPY (SELECT user_id, item_id, category_id, [{names}][behavior_type + 1], timestamp "
            f"FROM log) TO '{_sql_string(tmp)}' (FORMAT csv, HEADER false)"
        )
    return SynthSummary(
        rows=len(log["user_id"]),
        users=_n_distinct(log["user_id"]),
        items=_n_distinct(log["item_id"]),
        categories=_n_distinct(log["category_id"]),
        path=tmp,
    )


def _write_blocks(tmp: Path, cfg: SynthScale, seed: int, progress: Progress) -> SynthSummary:
    log = BlockedLog(cfg, seed)
    seen_users = np.zeros(USER_ID_RANGE, dtype=bool)
    seen_items = np.zeros(ITEM_ID_RANGE, dtype=bool)
    seen_categories = np.zeros(CATEGORY_ID_RANGE, dtype=bool)
    rows = malformed = out_of_range = 0
    started = perf_counter()
    progress.start("generating the synthetic log (users)", total=cfg.n_users)
    # DuckDB's COPY writes a whole file at once; Arrow's CSV writer appends batch by batch, in
    # the same text format (no quotes: no field needs them).
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with (
        pa.OSFile(str(tmp), "wb") as sink,
        pacsv.CSVWriter(sink, ARROW_SCHEMA, write_options=options) as writer,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        # Arrow formats and writes a block (without the GIL) while numpy generates the next one;
        # at most two blocks are held.
        writing: Future | None = None
        for index in range(log.n_blocks):
            block = log.block(index)
            if writing is not None:
                writing.result()
            writing = pool.submit(block.write, writer, sink)
            columns = block.columns
            seen_users[columns["user_id"]] = True
            seen_items[columns["item_id"]] = True
            seen_categories[columns["category_id"]] = True
            rows += len(columns["user_id"])
            malformed += len(block.malformed)
            out_of_range += block.out_of_range
            progress.advance(block.n_users, rows=rows, rows_per_s=rows / max(perf_counter() - started, 1e-9))
        if writing is not None:
            writing.result()
    return SynthSummary(
        rows=rows,
        users=int(seen_users.sum()),
        items=int(seen_items.sum()),
        categories=int(seen_categories.sum()),
        path=tmp,
        malformed=malformed,
        out_of_range=out_of_range,
    )


def _sql_string(path: Path) -> str:
    return str(path).replace("'", "''")


def _n_distinct(ids: np.ndarray) -> int:
    # Ids are below a few million: a bitmap is far faster than np.unique on millions of rows.
    seen = np.zeros(int(ids.max()) + 1, dtype=bool)
    seen[ids] = True
    return int(seen.sum())
