"""``dmqn prep``: behavior log -> prepared long-sequence CTR set (protocol: dmqn_core.data.prep)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dmqn_cli.common import WorkspaceOption, console, handle_errors, open_workspace, plain
from dmqn_core.data.formats import Format, parse_columns
from dmqn_core.data.prep import MEMORY_FRACTION, parse_time_range, prepare

_STAGE_TEXT = {
    "reading": "reading and classifying rows",
    "cleaning": "dropping invalid rows and users below the thresholds",
    "vocabularies": "building vocabularies",
    "samples": "sorting behaviors and picking targets",
    "negatives": "sampling negatives",
    "writing": "writing arrays",
    "done": "publishing",
}


class NegativeProtocol(str, enum.Enum):
    popularity = "popularity"
    uniform = "uniform"
    same_category = "same-category"


class SourceFormat(str, enum.Enum):
    taobao = Format.taobao.value
    movielens = Format.movielens.value
    csv = Format.csv.value


@handle_errors
def prep(
    source: Path = typer.Argument(
        ...,
        help="The log: a Taobao CSV (.csv or .csv.gz), a MovieLens folder "
        "(100K, 1M or latest) or a delimited file with a header.",
        show_default=False,
    ),
    format: SourceFormat = typer.Option(..., "--format", "-f", help="Layout of SOURCE.", show_default=False),
    out: str = typer.Option(
        ..., "--out", "-o", help="Name of the prepared set inside <workspace>/data/ (or a path).", show_default=False
    ),
    workspace: Optional[Path] = WorkspaceOption,
    max_len: int = typer.Option(
        1000, help="Histories are cut to the most recent MAX_LEN behaviors (at read time; stored in meta.json)."
    ),
    neg_ratio: int = typer.Option(1, help="Negatives per positive, drawn among items the user never clicked."),
    negatives: NegativeProtocol = typer.Option(
        NegativeProtocol.popularity,
        "--negatives",
        help="How negatives are drawn: by item popularity, uniformly, or by popularity among the items of "
        "the positive's own category (popularity overall where the category has too few).",
    ),
    train_targets: int = typer.Option(
        20, help="Training targets per user: the clicks just before the validation targets."
    ),
    valid_targets: int = typer.Option(
        5,
        help="Validation targets per user: the clicks just before the test target (the last click). 5 gives "
        "the Taobao 84k sample and MovieLens 100K at least 3,000 validation positives, so that model "
        "selection by validation AUC is not decided by a few hundred users.",
    ),
    min_behaviors: int = typer.Option(20, help="Users with fewer valid behaviors are dropped."),
    time_range: Optional[str] = typer.Option(
        None,
        help="Keep rows with START <= timestamp < END (unix seconds or ISO date-times); 'all' keeps "
        "every row. Default: taobao 1511539200,1512316800 (2017-11-25..12-03 China time), "
        "others all.",
        show_default=False,
    ),
    columns: Optional[str] = typer.Option(
        None,
        help="csv only: user=COL,item=COL,timestamp=COL[,category=COL][,behavior=COL] naming the file's columns.",
        show_default=False,
    ),
    delimiter: str = typer.Option(",", help="csv only: the field delimiter."),
    click_behaviors: Optional[str] = typer.Option(
        None,
        help="Comma-separated behavior types that are clicks (targets). Default: taobao pv, "
        "movielens click (rating >= 4), csv every behavior.",
        show_default=False,
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Fail on the first invalid row instead of skipping and counting it."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an existing set of that name (only ever a set dmqn prep made, never another folder).",
    ),
    seed: int = typer.Option(0, help="Seed of the negative sampling (same seed, same set)."),
    memory_limit: Optional[str] = typer.Option(
        None,
        help="DuckDB memory limit, a size (4GB) or a share of the machine's memory (40%); beyond it "
        f"DuckDB spills to disk. \\[default: {MEMORY_FRACTION:.0%} of memory]",
        show_default=False,
    ),
    threads: Optional[int] = typer.Option(None, help="DuckDB threads \\[default: all cores].", show_default=False),
    temp_dir: Optional[Path] = typer.Option(
        None,
        help="Directory for DuckDB's working database and spill files (at peak about the size of "
        "a Taobao-format log), removed afterwards. \\[default: inside the set's temporary directory in the "
        "workspace]",
        show_default=False,
    ),
) -> None:
    """Turn a behavior log into a prepared long-sequence CTR set (train/valid/test by time per user)."""
    ws = open_workspace(workspace)
    clicks = [c.strip() for c in click_behaviors.split(",") if c.strip()] if click_behaviors else None
    with console.status("preparing…") as status:
        stage_text = "preparing"

        def on_stage(stage: str) -> None:
            nonlocal stage_text
            stage_text = f"[bold]{stage}[/]: {_STAGE_TEXT.get(stage, stage)}…"
            status.update(stage_text)

        def on_progress(percent: float) -> None:
            status.update(f"{stage_text} (query {percent:.0f}% done)")

        result = prepare(
            source,
            Format(format.value),
            out,
            workspace=ws,
            max_len=max_len,
            neg_ratio=neg_ratio,
            negatives=negatives.value,
            train_targets=train_targets,
            valid_targets=valid_targets,
            min_behaviors=min_behaviors,
            time_range=parse_time_range(time_range),
            columns=parse_columns(columns),
            delimiter=delimiter,
            click_behaviors=clicks,
            strict=strict,
            overwrite=overwrite,
            seed=seed,
            memory_limit=memory_limit,
            threads=threads,
            temp_dir=temp_dir,
            on_stage=on_stage,
            on_progress=on_progress,
        )
    console.print(_summary(result.meta, result.path, result.seconds))


def _summary(meta: dict, path: Path, seconds: float) -> Table:
    counts = meta["counts"]
    # plain(), not a markup string: the set's name and path are the user's, brackets and escapes included.
    table = Table(
        title=plain(f"prepared {meta['name']} ({meta['source']['variant']}) in {seconds:.1f}s"),
        show_header=False,
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("rows read", f"{counts['rows_read']:,}")
    for reason, n in counts["rows_bad"].items():
        if n:
            table.add_row(plain(f"  skipped: {reason}"), f"{n:,}")
    table.add_row("rows used", f"{counts['rows_used']:,}")
    table.add_row("users kept", f"{counts['users']:,}")
    table.add_row("  dropped: < min behaviors", f"{counts['users_dropped_min_behaviors']:,}")
    table.add_row("  dropped: < 3 clicks with history", f"{counts['users_dropped_few_clicks']:,}")
    table.add_row("behaviors", f"{counts['behaviors']:,}")
    table.add_row(
        "items / categories / behavior types",
        f"{counts['items']:,} / {counts['categories']:,} / {counts['behavior_types']:,}",
    )
    for split in ("train", "valid", "test"):
        table.add_row(f"samples {split} (positives)", f"{counts['samples'][split]:,} ({counts['positives'][split]:,})")
    if counts["negatives_short"]:
        table.add_row("negatives missing (user clicked every item)", f"{counts['negatives_short']:,}")
    if counts.get("negatives_fallback"):
        table.add_row("positives with negatives from all categories", f"{counts['negatives_fallback']:,}")
    table.add_row("written to", plain(path))
    return table
