"""The ``dmqn`` application: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from dmqn_cli import bench, evaluate, inspect, prep, quickstart, report, runs, serving, synth, train, tune

app = typer.Typer(
    name="dmqn",
    help="CTR prediction on long user-behavior sequences with DMQN (SIGIR '25) and its baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

app.command("synth")(synth.synth)
app.command("prep")(prep.prep)
app.command("train")(train.train)
app.command("eval")(evaluate.evaluate)
app.command("tune")(tune.tune)
app.command("bench")(bench.bench)
app.command("export-cache")(serving.export_cache)
app.command("score")(serving.score)
app.command("serve")(serving.serve)
app.command("inspect")(inspect.inspect)
app.add_typer(runs.runs_app, name="runs")
app.command("quickstart")(quickstart.quickstart)
app.command("report")(report.report)
