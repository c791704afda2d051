"""``dmqn report``: a self-contained Plotly HTML report of a DMQN run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from dmqn_cli.common import WorkspaceOption, console, handle_errors, int64_ids, open_workspace, plain
from dmqn_cli.progress import RichProgress

DEFAULT_USERS = 4


@handle_errors
def report(
    run_id: Optional[str] = typer.Argument(None, help="A dmqn or dmqn-simple run \\[default: the latest one]."),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        dir_okay=False,
        help="HTML file to write \\[default: WORKSPACE/reports/RUN_ID.html]. An existing file is replaced only "
        "when it is a dmqn report.",
    ),
    users: int = typer.Option(
        DEFAULT_USERS, "--users", min=0, help="How many recorded sample users get an attention heatmap."
    ),
    user: Optional[list[int]] = typer.Option(
        None,
        "--user",
        metavar="USER_ID",
        callback=int64_ids,
        help="Show this raw user id's attention instead (repeatable; "
        "users outside the recorded sample are computed from the checkpoint).",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace --out even when it is not a dmqn report, or is a symbolic link (the link is replaced, "
        "never what it points to).",
    ),
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Write one HTML file that opens offline (plotly.js embedded once): codeword utilisation, its history,
    a UMAP of the codewords and items, the clusters' top categories, attention heatmaps of sampled users,
    training curves and the other runs on the same data set.

    Written to a temporary name and renamed into place: an interrupted report leaves no half-written file.
    A missing directory of --out is created.

    An existing file is replaced only when it is a dmqn report (marked so in its head) or with --overwrite;
    a symbolic link only with --overwrite, which replaces the link, never what it points to.
    """
    # Imported here, not at the top: plotly takes a while to load and no other command needs it.
    from dmqn_inspect.report import build_report

    ws = open_workspace(workspace)
    with RichProgress() as progress:
        result = build_report(ws, run_id, out, users=user or users, progress=progress, overwrite=overwrite)
    for note in result.notes:
        console.print(Text.assemble(("note:", "yellow"), " ", plain(note)))
    console.print(
        plain(
            f"report of run {result.run_id}: {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.seconds:.1f} s)"
        )
    )
