"""``dmqn prep``: turn a behavior log into a prepared long-sequence CTR set (see dmqn_core.data.prepared).

All row work runs in DuckDB SQL (a file-backed database inside the hidden temporary output
directory or ``--temp-dir``, with ``memory_limit`` and a spill directory), so a 100M-row log is
processed in a few sorts and hash aggregates without per-row Python and without materialising any
history; no step brings all rows (nor all rejected lines) into Python, and the arrays are
streamed into memory-mapped files in batches.

Protocol
--------
1. Rows are read and classified (dmqn_core.data.formats); invalid rows are skipped and counted by
   reason (bad_encoding, bad_columns, bad_id, bad_behavior, bad_timestamp, out_of_time_range;
   an id must be a decimal integer that fits int64: ``1.5``, ``1e3``, ``0x10`` are ``bad_id``);
   ``--strict`` makes the first one fatal, and so is a log where more than half the rows are
   invalid. ``--time-range`` keeps timestamps in [START, END) (Taobao default: the published
   window 2017-11-25 00:00 to 2017-12-03 23:59:59 China time = [1511539200, 1512316800)).
   Of valid rows equal in user, item, category, behavior and timestamp (a log concatenated
   twice, a logger that retried) the first is kept and the others are counted as ``duplicate``;
   they are not invalid, so neither ``--strict`` nor the half-invalid rule counts them.
   A gzip source is decompressed in full beside the work, so that a damaged one (which DuckDB
   reads up to the damage without complaint) fails the run.
2. Each user's behaviors are sorted by (timestamp, file order). Users with fewer than
   ``--min-behaviors`` valid behaviors are dropped.
3. Targets are clicks (``--click-behaviors``: Taobao ``pv``, MovieLens ``click`` = rating >= 4).
   A target's history is every behavior of its user with a timestamp STRICTLY earlier than the
   target's, i.e. a prefix of the sorted sequence, stored as its end offset and cut at read time to
   the most recent ``--max-len``. Clicks with an empty history are not targets.
4. Split by time within each user: the last eligible click is the test target, the
   ``--valid-targets`` clicks before it (default 1) are validation targets, and up to
   ``--train-targets`` clicks immediately before those are training targets (the most recent, so
   histories are long). A user with too few clicks for all of them keeps one test target, at least
   one training target, and validation targets in between. Users with fewer than 3 eligible
   clicks are dropped.
5. Each positive gets ``--neg-ratio`` negatives sharing its history and timestamp, distinct per
   positive, among items the user never clicked at any time. ``--negatives`` says how they are
   drawn: ``popularity`` (the default) with probability proportional to popularity (behavior count
   in the prepared log), ``uniform`` with equal probability, ``same-category`` by popularity among
   the items of the positive's own category (an item's category is its most frequent one); a
   positive whose category holds fewer such items than it needs draws by popularity overall,
   counted as ``negatives_fallback``. Draw k of positive s is item ``cum_w^-1(hash(seed, s, k) mod
   total)`` over the pool's cumulative weights; the first ``neg-ratio`` valid draws are kept and
   rounds of further draws fill up the few positives still short, so the result depends only on
   the seed and the data, never on threading. A user who clicked every item gets fewer negatives
   (counted as ``negatives_short``). A negative's category is its item's category.
6. Vocabularies map raw ids to 1..n in raw-id order (0 = padding) for users, items, categories
   (over the kept users' behaviors) and behavior-type names (in name order). An item's category
   is its most frequent category in the log (ties: smallest raw id); behavior rows keep their
   own row's category.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import duckdb
import numpy as np

from dmqn_core.data import prepared as fmt_out
from dmqn_core.data.formats import (
    GZIP_ERRORS,
    Format,
    SourceInfo,
    damaged_gzip,
    is_gzip,
    load_source,
    one_line,
    reject_reason_sql,
    source_files,
)
from dmqn_core.errors import DmqnError
from dmqn_core.workspace import Workspace, check_can_publish, publish_directory, remove_stale_temporaries

TAOBAO_TIME_RANGE = (1511539200, 1512316800)
INVALID_REASONS = ("bad_encoding", "bad_columns", "bad_id", "bad_behavior", "bad_timestamp", "out_of_time_range")
ROW_REASONS = (*INVALID_REASONS, "duplicate")
# meta.json's protocol "version": 2 drops duplicate rows and rejects non-integer ids (sets
# without it kept the one and rounded the other), so the fingerprints of the two differ.
PROTOCOL_VERSION = 2
MIN_CLICKS = 3  # one test, one validation and at least one training target
NEGATIVE_ROUNDS = 8
# How a negative is drawn among the items its user never clicked (module docstring, step 5).
NEGATIVE_PROTOCOLS = ("popularity", "uniform", "same-category")
EXPORT_CHUNK = 1 << 20
READ_CHUNK = 8 << 20
MEMORY_FRACTION = 0.25  # default DuckDB memory limit, of the machine's (or the cgroup's) memory
PROGRESS_POLL_S = 0.5

TimeRange = tuple[int, int] | None | Literal["default"]


@dataclass
class PrepResult:
    """Where the set went and its meta.json content."""

    path: Path
    meta: dict
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


def parse_time_range(text: str | None) -> TimeRange:
    """``START,END`` (unix seconds or ISO date-times, UTC unless offset given) -> [START, END).

    ``None`` or ``default`` keeps the format's default, ``all`` disables the filter.
    """
    if text is None or text.strip().lower() == "default":
        return "default"
    if text.strip().lower() == "all":
        return None
    parts = text.split(",")
    if len(parts) != 2:
        raise DmqnError(f"--time-range: expected START,END, got {text!r}")
    start, end = (_parse_instant(part.strip()) for part in parts)
    if start >= end:
        raise DmqnError(f"--time-range: START must be before END, got {text!r}")
    return start, end


def _parse_instant(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise DmqnError(f"--time-range: {text!r} is neither unix seconds nor an ISO date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return int(moment.timestamp())


def memory_limit_setting(text: str | None) -> str:
    """The DuckDB ``memory_limit`` for ``--memory-limit``: None gives MEMORY_FRACTION of memory,
    ``N%`` that share of it, anything else (``4GB``, ``500MB``) is passed to DuckDB as is."""
    if text is None:
        return _share_of_memory(MEMORY_FRACTION)
    text = text.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise DmqnError(f"--memory-limit: expected a size like 4GB or a share like 25%, got {text!r}") from None
        if not 0 < percent <= 100:
            raise DmqnError(f"--memory-limit: a share must be in (0, 100]%, got {text!r}")
        return _share_of_memory(percent / 100)
    return text


def _share_of_memory(fraction: float) -> str:
    total = _memory_bytes()
    if total is None:
        return "4GB"
    return f"{max(256, int(total * fraction) >> 20)}MB"


def _memory_bytes() -> int | None:
    """Physical memory, or the cgroup's limit where that is lower (containers)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def prepare(
    source: str | os.PathLike,
    format: Format | str,
    out: str | os.PathLike,
    *,
    workspace: Workspace | None = None,
    max_len: int = 1000,
    neg_ratio: int = 1,
    negatives: str = "popularity",
    train_targets: int = 20,
    valid_targets: int = 1,
    min_behaviors: int = 20,
    time_range: TimeRange = "default",
    columns: dict[str, str] | None = None,
    delimiter: str = ",",
    click_behaviors: list[str] | None = None,
    strict: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    memory_limit: str | None = None,
    threads: int | None = None,
    temp_dir: str | os.PathLike | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> PrepResult:
    """Prepare ``source`` into the set ``out`` of ``workspace`` (see the module docstring).

    Nothing is visible under ``out`` until the set is complete; on any error the temporary
    directory is removed and a DmqnError explains user errors in one line.

    DuckDB works in a database file with ``memory_limit`` (see memory_limit_setting) and spills
    beyond it; both live in ``temp_dir`` when given (a scratch disk), else inside the set's
    temporary directory, and are removed at the end. ``on_stage`` gets each stage's name,
    ``on_progress`` (from another thread, about twice a second) the running query's percent done.
    """
    fmt = Format(format)
    if negatives not in NEGATIVE_PROTOCOLS:
        raise DmqnError(f"--negatives must be one of {', '.join(NEGATIVE_PROTOCOLS)}, got {negatives!r}")
    for name, value, low in (
        ("--max-len", max_len, 1),
        ("--neg-ratio", neg_ratio, 0),
        ("--train-targets", train_targets, 1),
        ("--valid-targets", valid_targets, 1),
        ("--min-behaviors", min_behaviors, 1),
        ("--seed", seed, 0),
    ):
        if value < low:
            raise DmqnError(f"{name} must be >= {low}, got {value}")
    if threads is not None and threads < 1:
        raise DmqnError(f"--threads must be >= 1, got {threads}")
    memory_limit = memory_limit_setting(memory_limit)
    scratch = None if temp_dir is None else Path(temp_dir).expanduser().resolve()
    if scratch is not None and not scratch.is_dir():
        raise DmqnError(f"--temp-dir {scratch} is not a directory")
    source_path = Path(source).expanduser().resolve()
    if not source_path.exists():
        raise DmqnError(f"{source_path} does not exist")
    if time_range == "default":
        time_range = TAOBAO_TIME_RANGE if fmt is Format.taobao else None
    with _write_errors():
        ws = (workspace or Workspace()).ensure()
        final = _output_path(ws, out)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent, final.name, temporary=_is_own_set, backup=fmt_out.is_prepared_set)
        check_can_publish(final, overwrite, replaceable=fmt_out.is_prepared_set, what="a prepared set")
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        if scratch is None:
            work = tmp / ".work"
        else:
            # Named like a set's temporary directory, so the next run removes it after a kill.
            remove_stale_temporaries(scratch, f"dmqn-prep-{final.name}", temporary=_is_work_directory)
            work = scratch / f".dmqn-prep-{final.name}.tmp-{os.getpid()}"
        started = time.monotonic()
        created = False
        try:
            _new_directory(tmp, _is_own_set)
            created = True
            job = _Job(
                source=source_path,
                fmt=fmt,
                tmp=tmp,
                work=work,
                name=final.name,
                max_len=max_len,
                neg_ratio=neg_ratio,
                negatives=negatives,
                train_targets=train_targets,
                valid_targets=valid_targets,
                min_behaviors=min_behaviors,
                time_range=time_range,
                columns=dict(columns or {}),
                delimiter=delimiter,
                click_behaviors=click_behaviors,
                strict=strict,
                seed=seed,
                memory_limit=memory_limit,
                threads=threads,
                on_stage=on_stage,
                on_progress=on_progress,
            )
            meta = job.run()
            publish_directory(tmp, final, overwrite, replaceable=fmt_out.is_prepared_set, what="a prepared set")
        except BaseException:
            if created:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return PrepResult(final, meta, time.monotonic() - started, job.stage_seconds)


def _output_path(ws: Workspace, out: str | os.PathLike) -> Path:
    """Where ``--out`` puts the set; never a folder that holds the workspace or its data."""
    final = ws.dataset_path(out)
    if final == ws.root:
        raise DmqnError(f"--out {str(out)!r} is the workspace {final} itself; name a set inside it")
    if final in ws.root.parents:
        raise DmqnError(f"--out {str(out)!r} is {final}, a folder holding the workspace {ws.root}; name a set instead")
    if final == ws.data_dir:
        raise DmqnError(f"--out {str(out)!r} is the workspace's data folder {final}; name a set inside it")
    return final


@contextmanager
def _write_errors() -> Iterator[None]:
    """OSError (a read-only workspace, a full disk, a name too long) as one line naming the path."""
    try:
        yield
    except OSError as exc:
        names = [os.fsdecode(name) for name in (exc.filename, exc.filename2) if name is not None]
        where = " -> ".join(names) or "the prepared set"
        raise DmqnError(f"cannot write {where}: {exc.strerror or exc}") from None


def _new_directory(path: Path, owned: Callable[[Path], bool]) -> None:
    """Create ``path`` empty; a leftover there (from a killed process whose pid was ours) is
    removed only when ``owned`` recognises it, else mkdir's error stops the run."""
    if path.is_dir() and not path.is_symlink() and owned(path):
        shutil.rmtree(path)
    path.mkdir()


_WORK_FILES = frozenset({"prep.duckdb", "prep.duckdb.wal"})
_SPILL = "spill"  # DuckDB's temp_directory in the work folder (see _Job._run_duckdb)


def _is_work_directory(path: Path) -> bool:
    """Whether ``path`` holds nothing but DuckDB's working files of a prep (see _Job.work): its
    database and a spill folder of DuckDB's own ``duckdb_temp*`` files."""
    if not path.is_dir() or path.is_symlink():
        return False
    for entry in path.iterdir():
        if entry.name == _SPILL:
            ok = (
                entry.is_dir()
                and not entry.is_symlink()
                and all(
                    f.name.startswith("duckdb_temp") and f.is_file() and not f.is_symlink() for f in entry.iterdir()
                )
            )
        else:
            ok = entry.name in _WORK_FILES and entry.is_file() and not entry.is_symlink()
        if not ok:
            return False
    return True


def _is_own_set(path: Path) -> bool:
    """Whether ``path`` is a set, or a set's temporary directory holding nothing but what prepare
    writes there: only such a leftover of a killed prep may be deleted or put back."""
    if fmt_out.is_prepared_set(path):
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    files = fmt_out.set_files()
    folders = {name.partition("/")[0] for name in files if "/" in name}
    for entry in path.iterdir():
        if entry.name == ".work":
            ok = _is_work_directory(entry)
        elif entry.name in folders:
            ok = (
                entry.is_dir()
                and not entry.is_symlink()
                and all(sub.is_file() and f"{entry.name}/{sub.name}" in files for sub in entry.iterdir())
            )
        else:
            ok = entry.name in files and entry.is_file()
        if not ok:
            return False
    return True


class _Stopped(Exception):
    """The job ended before the source check finished."""


class _DigestingReader:
    """A binary file's ``read`` that feeds every byte read to a hash, and stops when told to."""

    def __init__(self, fh: BinaryIO, digest: Any, stop: threading.Event) -> None:
        self.fh, self.digest, self.stop = fh, digest, stop

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise _Stopped
        data = self.fh.read(size)
        self.digest.update(data)
        return data


class _SourceCheck(threading.Thread):
    """SHA-256 of the source files and, for a gzip one, a full decompression that checks each
    member's CRC-32 and length: DuckDB reads a damaged gzip file up to the damage and stops
    without an error. Runs beside DuckDB's work (hashlib and zlib release the GIL); the file is
    read once for both."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.files = files
        self.reads_gzip = any(is_gzip(path) for path in files)
        self.digests: dict[str, str] = {}
        self.error: DmqnError | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            for path in self.files:
                self.digests[path.name] = self._check(path)
        except _Stopped:
            pass
        except DmqnError as exc:
            self.error = exc
        except OSError as exc:
            self.error = DmqnError(f"cannot read {exc.filename or self.files[0]}: {exc.strerror or exc}")

    def _check(self, path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            reader = _DigestingReader(fh, digest, self._stop_event)
            if is_gzip(path):
                try:
                    with gzip.GzipFile(fileobj=reader) as unzipped:  # type: ignore[arg-type]
                        while unzipped.read(READ_CHUNK):
                            pass
                except GZIP_ERRORS as exc:
                    raise damaged_gzip(path, exc) from None
            while reader.read(READ_CHUNK):  # all of a plain file; for gzip, any bytes after the end
                pass
        return digest.hexdigest()

    def raise_error(self) -> None:
        """Raise the check's error if it has found one by now (does not wait)."""
        if self.error is not None:
            raise self.error

    def combined(self) -> str:
        """The source's SHA-256, once the check is done; its error if it failed."""
        self.join()
        self.raise_error()
        if len(self.digests) == 1:
            return next(iter(self.digests.values()))
        # A folder: the hash of "name  sha256" lines of the files read, in the order read.
        text = "".join(f"{name}  {self.digests[name]}\n" for name in (p.name for p in self.files))
        return hashlib.sha256(text.encode()).hexdigest()

    def stop(self) -> None:
        """Make the check end at its next read (after the job failed); does not wait."""
        self._stop_event.set()


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


@dataclass
class _Job:
    source: Path
    fmt: Format
    tmp: Path
    work: Path  # DuckDB's database file and spill directory
    name: str
    max_len: int
    neg_ratio: int
    negatives: str
    train_targets: int
    valid_targets: int
    min_behaviors: int
    time_range: tuple[int, int] | None
    columns: dict[str, str]
    delimiter: str
    click_behaviors: list[str] | None
    strict: bool
    seed: int
    memory_limit: str
    threads: int | None
    on_stage: Callable[[str], None] | None
    on_progress: Callable[[float], None] | None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def _stage(self, name: str, check: _SourceCheck) -> None:
        check.raise_error()  # a damaged source found by now: no need to finish the work
        now = time.monotonic()
        if self.stage_seconds:
            last = next(reversed(self.stage_seconds))
            self.stage_seconds[last] = round(now - self._stage_started, 3)
        self.stage_seconds[name] = 0.0
        self._stage_started = now
        if self.on_stage:
            self.on_stage(name)

    def run(self) -> dict:
        _new_directory(self.work, _is_work_directory)
        try:
            meta = self._run_duckdb()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
        fmt_out.write_json(self.tmp, "meta.json", meta)
        return meta

    def _run_duckdb(self) -> dict:
        config = {
            "memory_limit": self.memory_limit,
            "temp_directory": str(self.work / "spill"),
            # Row order of CREATE TABLE ... AS and of plain scans is the file order / ORDER BY
            # order only with this on; rowid is then the file order and the behavior offsets.
            "preserve_insertion_order": True,
        }
        if self.threads:
            config["threads"] = self.threads
        try:
            con = duckdb.connect(str(self.work / "prep.duckdb"), config=config)
        except duckdb.Error as exc:
            raise DmqnError(
                f"cannot start DuckDB (check --memory-limit/--threads): {str(exc).splitlines()[0]}"
            ) from None
        poller = None
        try:
            # DuckDB never prints its own bar (it would interleave with the command's display);
            # it tracks each query's progress only for on_progress.
            if self.on_progress:
                con.execute("SET enable_progress_bar = true; SET enable_progress_bar_print = false")
                poller = _ProgressPoller(con, self.on_progress)
                poller.start()
            else:
                con.execute("SET enable_progress_bar = false")
            return self._run(con)
        except (duckdb.InterruptException, RuntimeError) as exc:
            # Ctrl-C (or SIGTERM, which the CLI turns into KeyboardInterrupt) during a query makes
            # DuckDB cancel it and raise this in place of the KeyboardInterrupt: give that back.
            if isinstance(exc, duckdb.InterruptException) or str(exc) == "Query interrupted":
                raise KeyboardInterrupt from None
            raise
        finally:
            if poller:
                poller.finish()
            con.close()

    def _run(self, con: duckdb.DuckDBPyConnection) -> dict:
        check = _SourceCheck(source_files(self.source, self.fmt))
        check.start()
        try:
            return self._run_checked(con, check)
        except DmqnError:
            # What DuckDB reads from a damaged gzip file (up to a truncation, or garbage past a
            # flipped bit) fails the run in other words: "ends early", "mostly bad_columns".
            if check.reads_gzip:
                check.combined()
            raise
        finally:
            check.stop()

    def _run_checked(self, con: duckdb.DuckDBPyConnection, check: _SourceCheck) -> dict:
        self._stage("reading", check)
        try:
            info = load_source(con, self.source, self.fmt, self.columns, self.delimiter)
        except duckdb.IOException as exc:
            raise DmqnError(f"reading {self.source} failed: {str(exc).splitlines()[0]}") from None
        rows_read, rows_bad = self._count_rows(con, info)
        rows_used = rows_read - sum(rows_bad.values())

        self._stage("cleaning", check)
        self._keep_valid(con)
        clicks = self._resolve_clicks(con, info)
        users = self._filter_users(con, clicks)

        self._stage("vocabularies", check)
        behavior_names = self._build_vocabularies(con)

        self._stage("samples", check)
        self._build_behaviors(con, clicks)
        self._build_targets(con)

        self._stage("negatives", check)
        negatives_short, negatives_fallback = self._sample_negatives(con)

        self._stage("writing", check)
        counts = self._write(con, behavior_names)
        self._stage("done", check)
        counts = {
            "rows_read": rows_read,
            "rows_bad": rows_bad,
            "rows_used": rows_used,
            **users,
            **counts,
            "negatives_short": negatives_short,
            "negatives_fallback": negatives_fallback,
        }
        meta = {
            "format": fmt_out.FORMAT_MARKER,
            "format_version": fmt_out.FORMAT_VERSION,
            "name": self.name,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "path": str(self.source),
                "format": self.fmt.value,
                "variant": info.variant,
                "files": [p.name for p in info.files],
                "size_bytes": sum(p.stat().st_size for p in info.files),
                "sha256": check.combined(),
            },
            "protocol": {
                "version": PROTOCOL_VERSION,
                "max_len": self.max_len,
                "neg_ratio": self.neg_ratio,
                "negatives": self.negatives,
                "train_targets": self.train_targets,
                "valid_targets": self.valid_targets,
                "min_behaviors": self.min_behaviors,
                "min_clicks": MIN_CLICKS,
                "click_behaviors": clicks,
                "time_range": list(self.time_range) if self.time_range else None,
                "seed": self.seed,
                "strict": self.strict,
                "columns": self.columns or None,
                "delimiter": self.delimiter if self.fmt is Format.csv else None,
            },
            "counts": counts,
            "stage_seconds": {k: v for k, v in self.stage_seconds.items() if k != "done"},
        }
        meta["fingerprint"] = fmt_out.fingerprint_of(meta)
        return meta

    # -- reading ---------------------------------------------------------------------------

    def _count_rows(self, con: duckdb.DuckDBPyConnection, info: SourceInfo) -> tuple[int, dict[str, int]]:
        if self.time_range is not None:
            # In place (rowid stays the file order); only the few stray rows are written.
            con.execute(
                "UPDATE events SET reason = 'out_of_time_range' WHERE reason IS NULL AND (ts < ? OR ts >= ?)",
                list(self.time_range),
            )
        self._mark_duplicates(con)
        per_reason = con.execute(
            "SELECT reason, count(*), min(rowid) FROM events WHERE reason IS DISTINCT FROM 'blank' GROUP BY reason"
        ).fetchall()
        # Rejected lines stay in DuckDB: a bad file may have millions of them.
        con.execute(
            f"""
            CREATE TABLE rejected AS
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
                line = self._line_number(con, int(rid), info)
                first[reason] = min(first.get(reason, line), line)
        n_bad = sum(rows_bad[reason] for reason in INVALID_REASONS)
        if total == 0:
            raise DmqnError(f"{info.log_file} is empty (no data rows)")
        if n_bad and (self.strict or n_bad == total or 2 * n_bad > total):
            reason = (
                min(first, key=first.get)
                if self.strict
                else max((r for r in INVALID_REASONS if rows_bad[r]), key=rows_bad.get)
            )
            example = self._describe_bad(con, info, reason, first[reason])
            if self.strict:
                raise DmqnError(f"--strict: {example} ({n_bad} bad row(s) in all)")
            hint = "check --time-range" if reason == "out_of_time_range" else "is --format right?"
            what = "no valid row" if n_bad == total else f"{n_bad} of {total} rows are invalid"
            raise DmqnError(f"{info.log_file}: {what}, mostly {reason} ({rows_bad[reason]}), e.g. {example} — {hint}")
        return total, rows_bad

    @staticmethod
    def _mark_duplicates(con: duckdb.DuckDBPyConnection) -> None:
        # Grouping one 64-bit hash of the five columns costs about 40% less than grouping the
        # columns (measured at 8M rows); only the few rows whose hash repeats are then compared
        # column by column, so a hash collision never drops a row.
        con.execute(
            """
            CREATE TABLE repeated AS
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

    @staticmethod
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

    def _describe_bad(self, con: duckdb.DuckDBPyConnection, info: SourceInfo, reason: str, line: int) -> str:
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
            lo, hi = self.time_range
            return f"{where} has timestamp {ts}, outside --time-range [{lo}, {hi})"
        return f"{where} is {reason}: {one_line(bad_line or '')!r}"

    def _keep_valid(self, con: duckdb.DuckDBPyConnection) -> None:
        # A view rather than a copy: at 100M rows, copying the valid rows costs more than
        # filtering them again in the few scans that read them before the big sort.
        con.execute(
            """
            CREATE VIEW ev AS
            SELECT rowid AS rn, user_id, item_id, category_id, behavior, ts FROM events WHERE reason IS NULL
            """
        )

    def _resolve_clicks(self, con: duckdb.DuckDBPyConnection, info: SourceInfo) -> list[str]:
        known = info.behaviors
        if known is None:
            known = tuple(r[0] for r in con.execute("SELECT DISTINCT behavior FROM ev ORDER BY 1").fetchall())
        if self.click_behaviors is None:
            return list(info.default_clicks or known)
        unknown = [b for b in self.click_behaviors if b not in known]
        if unknown:
            raise DmqnError(
                f"--click-behaviors: {', '.join(unknown)} is not a behavior of this log "
                f"(its behaviors: {', '.join(known)})"
            )
        return sorted(set(self.click_behaviors))

    # -- cleaning ----------------------------------------------------------------------------

    def _filter_users(self, con: duckdb.DuckDBPyConnection, clicks: list[str]) -> dict[str, int]:
        con.execute("CREATE TABLE ucount AS SELECT user_id, count(*) AS n, min(ts) AS t0 FROM ev GROUP BY user_id")
        # A click has a non-empty history exactly when the user did something strictly earlier,
        # i.e. when it is later than the user's first timestamp: eligibility needs no sort.
        con.execute(
            """
            CREATE TABLE ustats AS
            SELECT u.user_id, u.t0, count(*) FILTER (WHERE list_contains(?, e.behavior) AND e.ts > u.t0) AS n_elig
            FROM ucount u JOIN ev e USING (user_id)
            WHERE u.n >= ?
            GROUP BY u.user_id, u.t0
            """,
            [clicks, self.min_behaviors],
        )
        n_all, n_few = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE n < ?) FROM ucount", [self.min_behaviors]
        ).fetchall()[0]
        n_kept, n_no_clicks = con.execute(
            "SELECT count(*) FILTER (WHERE n_elig >= ?), count(*) FILTER (WHERE n_elig < ?) FROM ustats",
            [MIN_CLICKS, MIN_CLICKS],
        ).fetchall()[0]
        if n_kept == 0:
            raise DmqnError(
                f"no user is left: of {n_all} users, {n_few} have fewer than --min-behaviors "
                f"{self.min_behaviors} behaviors and {n_no_clicks} fewer than {MIN_CLICKS} clicks "
                f"({', '.join(clicks)}) after their first behavior — lower --min-behaviors or check --click-behaviors"
            )
        return {"users": n_kept, "users_dropped_min_behaviors": n_few, "users_dropped_few_clicks": n_no_clicks}

    # -- vocabularies ------------------------------------------------------------------------

    def _build_vocabularies(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        con.execute(
            """
            CREATE TABLE vu AS
            SELECT user_id, CAST(row_number() OVER (ORDER BY user_id) AS INTEGER) AS u_idx, t0
            FROM ustats WHERE n_elig >= ?
            """,
            [MIN_CLICKS],
        )
        con.execute("DROP TABLE ustats; DROP TABLE ucount")
        con.execute(
            """
            CREATE TABLE ic AS
            SELECT item_id, category_id, count(*) AS c FROM ev SEMI JOIN vu USING (user_id) GROUP BY ALL
            """
        )
        con.execute(
            """
            CREATE TABLE vc AS
            SELECT category_id, CAST(row_number() OVER (ORDER BY category_id) AS INTEGER) AS c_idx
            FROM (SELECT DISTINCT category_id FROM ic)
            """
        )
        con.execute(
            """
            CREATE TABLE vi AS
            WITH best AS (
                SELECT item_id, category_id, sum(c) OVER (PARTITION BY item_id) AS pop FROM ic
                QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY c DESC, category_id) = 1
            )
            SELECT b.item_id, CAST(row_number() OVER (ORDER BY b.item_id) AS INTEGER) AS i_idx,
                   CAST(b.pop AS BIGINT) AS pop, vc.c_idx
            FROM best b JOIN vc USING (category_id)
            """
        )
        con.execute("DROP TABLE ic")
        names = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT behavior FROM ev SEMI JOIN vu USING (user_id) ORDER BY behavior"
            ).fetchall()
        ]
        con.execute(
            "CREATE TABLE vb AS SELECT unnest(?) AS behavior, CAST(unnest(?) AS TINYINT) AS b_idx",
            [names, list(range(1, len(names) + 1))],
        )
        if len(names) > np.iinfo(np.int8).max:
            raise DmqnError(f"{len(names)} behavior types; the format stores at most {np.iinfo(np.int8).max}")
        return names

    # -- samples -----------------------------------------------------------------------------

    def _build_behaviors(self, con: duckdb.DuckDBPyConnection, clicks: list[str]) -> None:
        # The one big sort: rowid of beh is then the global behavior offset.
        con.execute(
            """
            CREATE TABLE beh AS
            SELECT vu.u_idx, vi.i_idx, vc.c_idx, vb.b_idx, e.ts, list_contains(?, e.behavior) AS is_click
            FROM ev e JOIN vu USING (user_id) JOIN vi USING (item_id) JOIN vc USING (category_id)
                 JOIN vb USING (behavior)
            ORDER BY vu.u_idx, e.ts, e.rn
            """,
            [clicks],
        )
        con.execute("DROP VIEW ev; DROP TABLE events")

    def _build_targets(self, con: duckdb.DuckDBPyConnection) -> None:
        # The latest train_targets + valid_targets + 1 eligible clicks per user, by a top-n aggregate
        # (no sort of all clicks); position 1 is the test target, the next valid_targets validation
        # targets (fewer for a user with few clicks: at least one click is left for training), the rest train.
        con.execute(
            """
            CREATE TABLE top AS
            WITH elig AS (
                SELECT b.rowid AS off, b.u_idx, b.i_idx, b.c_idx, b.ts
                FROM beh b JOIN vu USING (u_idx) WHERE b.is_click AND b.ts > vu.t0
            ),
            best AS (
                SELECT u_idx, max_by({'off': off, 'item': i_idx, 'cat': c_idx, 'ts': ts}, off, ?) AS l,
                       count(*) AS n
                FROM elig GROUP BY u_idx
            )
            SELECT u_idx, n, unnest(l, recursive := true), generate_subscripts(l, 1) AS k FROM best
            """,
            [self.train_targets + self.valid_targets + 1],
        )
        # History end = offset of the user's first behavior at the target's timestamp.
        con.execute(
            """
            CREATE TABLE pos AS
            WITH hend AS (
                SELECT b.u_idx, b.ts, min(b.rowid) AS hist_end
                FROM beh b SEMI JOIN top t ON b.u_idx = t.u_idx AND b.ts = t.ts
                GROUP BY b.u_idx, b.ts
            )
            SELECT t.off AS sid, t.u_idx, t.item, t.cat, t.ts, h.hist_end,
                   CASE WHEN t.k = 1 THEN 'test' WHEN t.k <= 1 + least(?, t.n - 2) THEN 'valid' ELSE 'train' END
                       AS split
            FROM top t JOIN hend h USING (u_idx, ts)
            """,
            [self.valid_targets],
        )
        con.execute("DROP TABLE top")

    def _sample_negatives(self, con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
        """Draw the negatives of every positive; (negatives still missing, positives that fell back)."""
        con.execute("CREATE TABLE neg (sid BIGINT, i_idx INTEGER, draw BIGINT)")
        if self.neg_ratio == 0:
            return 0, 0
        # The pool of group 0 is every item; same-category adds one pool per category. A draw is
        # the item whose cumulative weight range (within its group, in item order) holds the hash.
        weight = "1" if self.negatives == "uniform" else "pop"
        con.execute(
            f"""
            CREATE TABLE pool AS
            SELECT 0 AS grp, i_idx, CAST(sum({weight}) OVER (ORDER BY i_idx) - {weight} AS BIGINT) AS cum,
                   {weight} AS w
            FROM vi
            """
        )
        if self.negatives == "same-category":
            con.execute(
                """
                INSERT INTO pool
                SELECT c_idx, i_idx, CAST(sum(pop) OVER (PARTITION BY c_idx ORDER BY i_idx) - pop AS BIGINT), pop
                FROM vi
                """
            )
            # A positive whose category holds fewer items the user never clicked than it needs
            # negatives draws from every item instead (counted as a fallback).
            con.execute(
                """
                CREATE TABLE short AS
                WITH clicked AS (
                    SELECT k.u_idx, vi.c_idx, count(*) AS n
                    FROM (SELECT DISTINCT u_idx, i_idx FROM beh WHERE is_click) k JOIN vi USING (i_idx)
                    GROUP BY ALL
                ),
                items AS (SELECT c_idx, count(*) AS n FROM vi GROUP BY c_idx)
                SELECT p.sid, p.u_idx,
                       CASE WHEN coalesce(i.n, 0) - coalesce(k.n, 0) >= ? THEN p.cat ELSE 0 END AS grp,
                       CAST(? AS BIGINT) AS need
                FROM pos p LEFT JOIN items i ON i.c_idx = p.cat
                           LEFT JOIN clicked k ON k.u_idx = p.u_idx AND k.c_idx = p.cat
                """,
                [self.neg_ratio, self.neg_ratio],
            )
            fallbacks = con.execute("SELECT count(*) FROM short WHERE grp = 0").fetchall()[0][0]
        else:
            con.execute(
                "CREATE TABLE short AS SELECT sid, u_idx, 0 AS grp, CAST(? AS BIGINT) AS need FROM pos",
                [self.neg_ratio],
            )
            fallbacks = 0
        con.execute("CREATE TABLE pool_total AS SELECT grp, CAST(sum(w) AS UBIGINT) AS total FROM pool GROUP BY grp")
        first_draw = 0
        for round_no in range(NEGATIVE_ROUNDS):
            draws = (self.neg_ratio + 1) << round_no
            con.execute(
                """
                CREATE OR REPLACE TABLE cand AS
                SELECT c.sid, c.u_idx, c.draw, p.i_idx
                FROM (SELECT s.sid, s.u_idx, s.grp, d.draw,
                             CAST(hash(CAST(? AS BIGINT), s.sid, d.draw) % t.total AS BIGINT) AS r
                      FROM short s JOIN pool_total t USING (grp), range(?, ?) d(draw)) c
                ASOF JOIN pool p ON c.grp = p.grp AND c.r >= p.cum
                """,
                [self.seed, first_draw, first_draw + draws],
            )
            first_draw += draws
            con.execute(
                """
                CREATE OR REPLACE TABLE got AS
                WITH valid AS (
                    SELECT c.sid, c.i_idx, min(c.draw) AS draw FROM cand c
                    ANTI JOIN (SELECT u_idx, i_idx FROM beh WHERE is_click) k ON k.u_idx = c.u_idx AND k.i_idx = c.i_idx
                    ANTI JOIN neg n ON n.sid = c.sid AND n.i_idx = c.i_idx
                    GROUP BY c.sid, c.i_idx
                ),
                -- A window rank, not a top-n aggregate (min_by(..., n) over structs): a third less
                -- CPU on millions of positives. Draws are distinct within a positive: deterministic.
                ranked AS (
                    SELECT sid, i_idx, draw, row_number() OVER (PARTITION BY sid ORDER BY draw) AS k FROM valid
                )
                SELECT r.sid, r.i_idx, r.draw FROM ranked r JOIN short s USING (sid) WHERE r.k <= s.need
                """
            )
            con.execute("INSERT INTO neg SELECT sid, i_idx, draw FROM got")
            con.execute(
                """
                CREATE OR REPLACE TABLE short AS
                SELECT s.sid, s.u_idx, s.grp, s.need - coalesce(g.n, 0) AS need
                FROM short s LEFT JOIN (SELECT sid, count(*) AS n FROM got GROUP BY sid) g USING (sid)
                WHERE s.need - coalesce(g.n, 0) > 0
                """
            )
            remaining = con.execute("SELECT coalesce(sum(need), 0) FROM short").fetchall()[0][0]
            if remaining == 0:
                break
        con.execute("DROP TABLE IF EXISTS cand; DROP TABLE IF EXISTS got; DROP TABLE pool; DROP TABLE pool_total")
        return int(remaining), int(fallbacks)

    # -- writing -----------------------------------------------------------------------------

    def _write(self, con: duckdb.DuckDBPyConnection, behavior_names: list[str]) -> dict:
        root = self.tmp
        n_rows = con.execute("SELECT count(*) FROM beh").fetchall()[0][0]
        per_user = con.execute("SELECT count(*) FROM beh GROUP BY u_idx ORDER BY u_idx").fetchnumpy()
        offsets = np.zeros(len(per_user["count_star()"]) + 1, dtype=np.int64)
        np.cumsum(per_user["count_star()"], out=offsets[1:])
        fmt_out.save_array(root, "behaviors/user_offsets.npy", offsets, np.int64)
        self._export(
            con,
            "SELECT i_idx, c_idx, b_idx, ts FROM beh",
            [],
            n_rows,
            [(f"behaviors/{name}.npy", dtype) for name, dtype in fmt_out.BEHAVIOR_ARRAYS.items()],
        )

        samples: dict[str, int] = {}
        positives: dict[str, int] = {}
        for split in fmt_out.SPLITS:
            n_pos, n_neg = con.execute(
                "SELECT count(*), (SELECT count(*) FROM neg JOIN pos USING (sid) WHERE split = ?) "
                "FROM pos WHERE split = ?",
                [split, split],
            ).fetchall()[0]
            positives[split], samples[split] = n_pos, n_pos + n_neg
            self._export(
                con,
                """
                SELECT u_idx, item, cat, label, hist_end, ts FROM (
                    SELECT u_idx, item, cat, CAST(1 AS TINYINT) AS label, hist_end, ts FROM pos WHERE split = ?
                    UNION ALL
                    SELECT p.u_idx, n.i_idx, vi.c_idx, CAST(0 AS TINYINT), p.hist_end, p.ts
                    FROM neg n JOIN pos p USING (sid) JOIN vi USING (i_idx) WHERE p.split = ?
                ) ORDER BY u_idx, ts, label DESC, item
                """,
                [split, split],
                n_pos + n_neg,
                [(f"samples/{split}_{name}.npy", dtype) for name, dtype in fmt_out.SAMPLE_ARRAYS.items()],
            )

        vocab = {
            "user": con.execute("SELECT user_id FROM vu ORDER BY u_idx").fetchnumpy()["user_id"],
            "item": con.execute("SELECT item_id FROM vi ORDER BY i_idx").fetchnumpy()["item_id"],
            "category": con.execute("SELECT category_id FROM vc ORDER BY c_idx").fetchnumpy()["category_id"],
        }
        for name, values in vocab.items():
            fmt_out.save_array(root, f"vocab/{name}.npy", values, np.int64)
        items = con.execute("SELECT c_idx, pop FROM vi ORDER BY i_idx").fetchnumpy()
        fmt_out.save_array(root, "vocab/item_category.npy", np.concatenate([[0], items["c_idx"]]), np.int32)
        fmt_out.save_array(root, "vocab/item_popularity.npy", np.concatenate([[0], items["pop"]]), np.int64)
        fmt_out.write_json(root, "vocab/behavior.json", behavior_names)
        return {
            "items": len(vocab["item"]),
            "categories": len(vocab["category"]),
            "behavior_types": len(behavior_names),
            "behaviors": int(n_rows),
            "samples": samples,
            "positives": positives,
        }

    def _export(
        self, con: duckdb.DuckDBPyConnection, sql: str, params: list, n_rows: int, targets: list[tuple[str, type]]
    ) -> None:
        """Stream a query's columns into memory-mapped .npy files, one Arrow batch at a time."""
        writers = [fmt_out.open_array_writer(self.tmp, rel, dtype, n_rows) for rel, dtype in targets]
        start = 0
        reader = con.sql(sql, params=params).to_arrow_reader(EXPORT_CHUNK)
        for batch in reader:
            stop = start + batch.num_rows
            for writer, column in zip(writers, batch.columns):
                writer[start:stop] = column.to_numpy(zero_copy_only=False)
            start = stop
        if start != n_rows:
            raise DmqnError(f"internal error: exported {start} rows, expected {n_rows}")
        for writer in writers:
            writer.flush()
