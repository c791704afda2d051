"""What the stages of one prep share (PrepContext): the settings, the one DuckDB connection their tables
live in, the set's temporary directory, the source check and the progress line.

The connection is a database file in the work folder with ``memory_limit`` and a spill directory
beside it (dmqn_core.data.prep.directories.work_directory); DuckDB tracks each query's progress for
``on_progress`` and never prints a bar of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from dmqn_core.data.prep.options import PrepSettings
from dmqn_core.data.prep.source_check import SourceCheck
from dmqn_core.errors import DmqnError

PROGRESS_POLL_S = 0.5


@dataclass
class PrepContext:
    """One prep's shared state, handed to each stage function in turn."""

    settings: PrepSettings
    con: duckdb.DuckDBPyConnection
    out: Path  # the set's temporary directory, published whole at the end
    check: SourceCheck
    on_stage: Callable[[str], None] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    _stage_started: float = field(default=0.0, init=False, repr=False)

    def stage(self, name: str) -> None:
        """Begin stage ``name``: the last stage's seconds are recorded and ``on_stage`` is told."""
        self.check.raise_error()  # a damaged source found by now: no need to finish the work
        now = time.monotonic()
        if self.stage_seconds:
            last = next(reversed(self.stage_seconds))
            self.stage_seconds[last] = round(now - self._stage_started, 3)
        self.stage_seconds[name] = 0.0
        self._stage_started = now
        if self.on_stage:
            self.on_stage(name)


@contextmanager
def duckdb_connection(
    settings: PrepSettings, work: Path, on_progress: Callable[[float], None] | None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The connection of a prep, in the work folder ``work``; closed after the block.

    Ctrl-C (or SIGTERM, which the CLI turns into KeyboardInterrupt) during a query makes DuckDB
    cancel it and raise RuntimeError("Query interrupted") in place of the KeyboardInterrupt: the
    block's error is given back as that KeyboardInterrupt.
    """
    config = {
        "memory_limit": settings.memory_limit,
        "temp_directory": str(work / "spill"),
        # Row order of CREATE TABLE ... AS and of plain scans is the file order / ORDER BY
        # order only with this on; rowid is then the file order and the behavior offsets.
        "preserve_insertion_order": True,
    }
    if settings.threads:
        config["threads"] = settings.threads
    try:
        con = duckdb.connect(str(work / "prep.duckdb"), config=config)
    except duckdb.Error as exc:
        raise DmqnError(f"cannot start DuckDB (check --memory-limit/--threads): {str(exc).splitlines()[0]}") from None
    poller = None
    try:
        # DuckDB never prints its own bar (it would interleave with the command's display);
        # it tracks each query's progress only for on_progress.
        if on_progress:
            con.execute("SET enable_progress_bar = true; SET enable_progress_bar_print = false")
            poller = _ProgressPoller(con, on_progress)
            poller.start()
        else:
            con.execute("SET enable_progress_bar = false")
        yield con
    except (duckdb.InterruptException, RuntimeError) as exc:
        if isinstance(exc, duckdb.InterruptException) or str(exc) == "Query interrupted":
            raise KeyboardInterrupt from None
        raise
    finally:
        if poller:
            poller.finish()
        con.close()


class _ProgressPoller(threading.Thread):
    """Reports the running query's percent done; DuckDB answers query_progress from any thread."""

    def __init__(self, con: duckdb.DuckDBPyConnection, report: Callable[[float], None]) -> None:
        super().__init__(daemon=True)
        self.con, self.report = con, report
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(PROGRESS_POLL_S):
            try:
                percent = self.con.query_progress()
            except duckdb.Error:
                return
            if percent >= 0:  # -1: no query running, or too young to estimate
                self.report(percent)

    def finish(self) -> None:
        self.stopped.set()
        self.join()
