"""``prepare``: the stages of a prep in order, on one shared PrepContext, and the set published whole at the end.

Each stage is a function of its own module (read, clean, vocabularies, samples, negatives, write) that
takes the context and leaves its tables in the one DuckDB connection for the next; the stage names
(``on_stage``) and their seconds (meta.json's stage_seconds) are those of the progress line.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dmqn_core.data import prepared as fmt_out
from dmqn_core.data.formats import Format, SourceInfo, source_files
from dmqn_core.data.prep.clean import clean
from dmqn_core.data.prep.context import PrepContext, duckdb_connection
from dmqn_core.data.prep.directories import (
    is_own_set,
    is_work_directory,
    new_directory,
    output_path,
    work_directory,
    write_errors,
)
from dmqn_core.data.prep.negatives import draw_negatives
from dmqn_core.data.prep.options import MIN_CLICKS, PrepSettings, TimeRange
from dmqn_core.data.prep.read import read_log
from dmqn_core.data.prep.samples import make_samples
from dmqn_core.data.prep.source_check import source_checked
from dmqn_core.data.prep.vocabularies import build_vocabularies
from dmqn_core.data.prep.write import write_set
from dmqn_core.workspace import Workspace, check_can_publish, publish_directory, remove_stale_temporaries

# meta.json's protocol "version": 2 drops duplicate rows and rejects non-integer ids (sets
# without it kept the one and rounded the other), so the fingerprints of the two differ.
PROTOCOL_VERSION = 2


@dataclass
class PrepResult:
    """Where the set went and its meta.json content."""

    path: Path
    meta: dict
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


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
    valid_targets: int = 5,
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
    """Prepare ``source`` into the set ``out`` of ``workspace`` (see dmqn_core.data.prep).

    Nothing is visible under ``out`` until the set is complete; on any error the temporary
    directory is removed and a DmqnError explains user errors in one line.

    DuckDB works in a database file with ``memory_limit`` (see memory_limit_setting) and spills
    beyond it; both live in ``temp_dir`` when given (a scratch disk), else inside the set's
    temporary directory, and are removed at the end. ``on_stage`` gets each stage's name,
    ``on_progress`` (from another thread, about twice a second) the running query's percent done.
    """
    fmt = Format(format)
    settings = PrepSettings(
        source=Path(source),
        fmt=fmt,
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
        temp_dir=None if temp_dir is None else Path(temp_dir),
    ).checked()
    with write_errors():
        ws = (workspace or Workspace()).ensure()
        final = output_path(ws, out)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent, final.name, temporary=is_own_set, backup=fmt_out.is_prepared_set)
        check_can_publish(final, overwrite, replaceable=fmt_out.is_prepared_set, what="a prepared set")
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        work = work_directory(tmp, final, settings.temp_dir)
        started = time.monotonic()
        created = False
        try:
            new_directory(tmp, is_own_set)
            created = True
            meta, stage_seconds = _run(settings, final.name, tmp, work, on_stage, on_progress)
            publish_directory(tmp, final, overwrite, replaceable=fmt_out.is_prepared_set, what="a prepared set")
        except BaseException:
            if created:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return PrepResult(final, meta, time.monotonic() - started, stage_seconds)


def _run(
    settings: PrepSettings,
    name: str,
    tmp: Path,
    work: Path,
    on_stage: Callable[[str], None] | None,
    on_progress: Callable[[float], None] | None,
) -> tuple[dict, dict[str, float]]:
    """Write the set ``name`` into ``tmp``, DuckDB working in ``work`` (removed afterwards); its meta.json
    content and the seconds of each stage."""
    new_directory(work, is_work_directory)
    try:
        with duckdb_connection(settings, work, on_progress) as con:
            with source_checked(source_files(settings.source, settings.fmt)) as check:
                ctx = PrepContext(settings, con, tmp, check, on_stage)
                meta = _run_stages(ctx, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fmt_out.write_json(tmp, "meta.json", meta)
    return meta, ctx.stage_seconds


def _run_stages(ctx: PrepContext, name: str) -> dict:
    ctx.stage("reading")
    info, rows_read, rows_bad = read_log(ctx)

    ctx.stage("cleaning")
    clicks, users = clean(ctx, info)

    ctx.stage("vocabularies")
    behavior_names = build_vocabularies(ctx)

    ctx.stage("samples")
    make_samples(ctx, clicks)

    ctx.stage("negatives")
    negatives_short, negatives_fallback = draw_negatives(ctx)

    ctx.stage("writing")
    written = write_set(ctx, behavior_names)
    ctx.stage("done")
    counts = {
        "rows_read": rows_read,
        "rows_bad": rows_bad,
        "rows_used": rows_read - sum(rows_bad.values()),
        **users,
        **written,
        "negatives_short": negatives_short,
        "negatives_fallback": negatives_fallback,
    }
    return _meta(ctx, name, info, clicks, counts)


def _meta(ctx: PrepContext, name: str, info: SourceInfo, clicks: list[str], counts: dict) -> dict:
    """The content of the set's meta.json, fingerprinted."""
    settings = ctx.settings
    meta = {
        "format": fmt_out.FORMAT_MARKER,
        "format_version": fmt_out.FORMAT_VERSION,
        "name": name,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": str(settings.source),
            "format": settings.fmt.value,
            "variant": info.variant,
            "files": [p.name for p in info.files],
            "size_bytes": sum(p.stat().st_size for p in info.files),
            "sha256": ctx.check.combined(),
        },
        "protocol": {
            "version": PROTOCOL_VERSION,
            "max_len": settings.max_len,
            "neg_ratio": settings.neg_ratio,
            "negatives": settings.negatives,
            "train_targets": settings.train_targets,
            "valid_targets": settings.valid_targets,
            "min_behaviors": settings.min_behaviors,
            "min_clicks": MIN_CLICKS,
            "click_behaviors": clicks,
            "time_range": list(settings.time_range) if settings.time_range else None,
            "seed": settings.seed,
            "strict": settings.strict,
            "columns": settings.columns or None,
            "delimiter": settings.delimiter if settings.fmt is Format.csv else None,
        },
        "counts": counts,
        "stage_seconds": {k: v for k, v in ctx.stage_seconds.items() if k != "done"},
    }
    meta["fingerprint"] = fmt_out.fingerprint_of(meta)
    return meta
