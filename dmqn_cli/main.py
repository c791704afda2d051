"""The ``dmqn`` application: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from dmqn_cli import synth

app = typer.Typer(
    name="dmqn",
    help="CTR prediction on long user-behavior sequences with DMQN (SIGIR '25) and its baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

app.command("synth")(synth.synth)
