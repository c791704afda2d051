"""``dmqn synth``: write a synthetic behavior log in the Taobao UserBehavior format."""
from __future__ import annotations

from pathlib import Path

import typer


def synth(out: Path = typer.Argument(..., help="CSV file to write.")) -> None:
    """Write a synthetic log (placeholder until the generator lands)."""
    raise typer.Exit(1)
