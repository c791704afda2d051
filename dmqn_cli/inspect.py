"""``dmqn inspect``: one user's codewords, clusters and attention in a DMQN run (a Textual TUI)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dmqn_cli.common import WorkspaceOption, handle_errors, int64_ids
from dmqn_core.runs.inspection import RunInspector
from dmqn_core.workspace import Workspace


@handle_errors
def inspect(
    user: int = typer.Option(
        ..., "--user", callback=int64_ids, help="Raw user id (`dmqn quickstart` prints one worth a look)."
    ),
    run_id: Optional[str] = typer.Option(None, "--run", help="A dmqn or dmqn-simple run \\[default: the latest one]."),
    workspace: Optional[Path] = WorkspaceOption,
) -> None:
    """Browse a user's behavior timeline with each behavior's codeword, the user's clusters, a candidate's
    attention over them, and the codebooks' utilisation. Keys are listed at the bottom; ? explains the views.

    The run store is opened read-only, so this works while `dmqn train` runs.
    """
    # Imported here, not at the top: Textual takes a while to load and no other command needs it.
    from dmqn_inspect.app import InspectApp

    # Not open_workspace: a read-only command must not create a workspace where there is none.
    ws = Workspace(workspace)
    # Opened before the TUI starts, so that a missing store or an unknown run is a one-line error.
    inspector = RunInspector(ws, run_id)
    InspectApp(ws, inspector, user).run()
