"""What the commands print: tables that fit 80 columns (a pipe gets 80 too), --json/--csv for scripts with
nothing else on stdout, and names that look like Rich markup ('[red]evil', '[/]') shown as they are."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from datetime import datetime

import numpy as np
import pytest
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_cli.results import fmt
from dmqn_cli.runs import RUN_FIELDS
from dmqn_core.data.prep import prepare
from dmqn_core.data.synth import write_log
from dmqn_core.runs.inspection import RunInspector
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RunStore
from dmqn_core.serving.cache import export_states
from dmqn_core.training.bench import run_bench
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace

EVIL = "[red]evil"
# The bench's budget, as flags and as settings: the same budget is the same bench, so the commands reuse its runs.
BENCH_FLAGS = [
    "--models",
    "din-short,dmqn-simple",
    "--seeds",
    "2",
    "--epochs",
    "1",
    "--embed-dim",
    "8",
    "--max-len",
    "60",
    "--batch-size",
    "256",
    "--inspect-users",
    "0",
]
MEAN_STD = re.compile(r"\d\.\d{4} ± \d\.\d{4}")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """Sets 'tiny' and '[red]evil'; a two-seed bench of din-short and dmqn-simple on tiny; a DMQN run and a
    popularity run on '[red]evil'; a run recorded as interrupted (the longest status)."""
    ws = Workspace(tmp_path_factory.mktemp("output")).ensure()
    log = ws.root / "tiny.csv"
    write_log(log, "tiny", seed=3)
    for name in ("tiny", EVIL):
        prepare(log, "taobao", name, workspace=ws, max_len=200, train_targets=5, seed=3)
    run_bench(
        ws,
        "tiny",
        ["din-short", "dmqn-simple"],
        [0, 1],
        {"embed_dim": 8},
        {"epochs": 1, "max_len": 60, "batch_size": 256, "inspect_users": 0},
    )
    train(
        ws,
        EVIL,
        "dmqn-simple",
        {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8},
        {"epochs": 1, "max_len": 60, "batch_size": 256, "inspect_users": 0},
    )
    train(ws, EVIL, "pop")
    store = RunStore(ws.store_path)
    stopped = store.create_run(
        model="dmqn-simple",
        dataset="tiny",
        dataset_path=str(ws.dataset_path("tiny")),
        params={},
        seed=0,
        n_parameters=None,
    )
    store.finish_run(stopped, "interrupted")
    return ws


def invoke(*args: str, columns: int = 80):
    """The command as in a terminal of that width (Rich reads COLUMNS; a pipe is 80 columns wide)."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def rows_by_run(text: str, store: RunStore) -> dict[str, str]:
    lines = text.splitlines()
    return {r.run_id: next(line for line in lines if line.startswith(r.run_id)) for r in store.list_runs()}


# ---- 13: tables for terminals ----


def test_runs_fit_80_columns_with_model_status_and_test_auc_whole(ws):
    store = RunStore(ws.store_path)
    text = ok(invoke("runs", "-w", str(ws.root), columns=80))
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    for record in store.list_runs():
        cells = rows_by_run(text, store)[record.run_id].split()
        assert record.model in cells and record.status in cells and fmt(record.test_auc) in cells
    assert "--wide" in text  # the hidden columns are named, and how to see them


def test_runs_at_120_columns_show_every_column_and_the_date(ws):
    store = RunStore(ws.store_path)
    text = ok(invoke("runs", "-w", str(ws.root), columns=120))
    assert max(map(len, text.splitlines())) <= 120 and "…" not in text
    header = next(line for line in text.splitlines() if line.startswith("run "))
    for column in ("model", "data set", "status", "epochs", "valid AUC", "test AUC", "test GAUC", "train s", "created"):
        assert column in header
    rows = rows_by_run(text, store)
    for record in store.list_runs():
        assert rows[record.run_id].endswith(record.created_at.strftime("%m-%d %H:%M"))


def test_runs_wide_shows_every_column_at_any_width(ws):
    store = RunStore(ws.store_path)
    text = ok(invoke("runs", "--wide", "-w", str(ws.root), columns=80))
    assert "…" not in text and "test GAUC" in text and "train s" in text
    rows = rows_by_run(text, store)
    for record in store.list_runs():
        assert rows[record.run_id].endswith(record.created_at.strftime("%Y-%m-%d %H:%M"))


def test_runs_show_fits_80_columns(ws):
    record = next(r for r in RunStore(ws.store_path).list_runs() if r.model == "dmqn-simple" and r.status == "finished")
    text = ok(invoke("runs", "show", record.run_id, "-w", str(ws.root), columns=80))
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    valid = next(line.split() for line in text.splitlines() if line.split()[:2] == ["1", "valid"])
    assert fmt(record.best_valid_auc) in valid and "perplexity" in text and "agreement" in text


def test_bench_tables_fit_80_columns_with_models_and_mean_std_on_one_line(ws):
    text = ok(invoke("bench", "tiny", *BENCH_FLAGS, "-w", str(ws.root), columns=80))
    assert "0 run(s) trained now, 4 reused" in text
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    for model, tables in (("din-short", 1), ("dmqn-simple", 2)):  # Table 3 has dmqn-simple, not din-short
        rows = [line for line in text.splitlines() if line.startswith(model + " ")]
        assert len(rows) == tables
        assert all(len(MEAN_STD.findall(row)) >= 2 for row in rows)  # test AUC and GAUC, each whole


# ---- 13: --json and --csv for scripts ----


def test_runs_json_and_csv(ws):
    records = RunStore(ws.store_path).list_runs()
    listed = json.loads(ok(invoke("runs", "--json", "-w", str(ws.root))))
    assert [run["run_id"] for run in listed] == [r.run_id for r in records]
    for run, record in zip(listed, records):
        assert tuple(run) == RUN_FIELDS
        assert (run["model"], run["dataset"], run["status"], run["epochs"]) == (
            record.model,
            record.dataset,
            record.status,
            record.epochs_done,
        )
        assert run["test_auc"] == record.test_auc and isinstance(run["train_seconds"], (int, float))
        assert datetime.fromisoformat(run["created_at"]) == record.created_at
    interrupted = next(run for run in listed if run["status"] == "interrupted")
    assert interrupted["test_auc"] is None and interrupted["finished_at"] is not None

    table = list(csv.DictReader(io.StringIO(ok(invoke("runs", "--csv", "-w", str(ws.root))))))
    assert [row["run_id"] for row in table] == [r.run_id for r in records]
    assert all(tuple(row) == RUN_FIELDS for row in table)
    assert [row["dataset"] for row in table].count(EVIL) == 2
    assert next(row for row in table if row["status"] == "interrupted")["test_auc"] == ""


def test_runs_show_json(ws):
    record = next(r for r in RunStore(ws.store_path).list_runs() if r.model == "dmqn-simple" and r.status == "finished")
    shown = json.loads(ok(invoke("runs", "show", record.run_id, "--json", "-w", str(ws.root))))
    assert tuple(shown)[: len(RUN_FIELDS)] == RUN_FIELDS and shown["run_id"] == record.run_id
    assert shown["params"]["model"]["embed_dim"] == 8 and shown["dataset_path"] == record.dataset_path
    assert {(m["epoch"], m["split"], m["name"]) for m in shown["metrics"]} >= {(1, "valid", "auc"), (1, "test", "auc")}
    assert shown["codebook_usage"] and set(shown["codebook_usage"][0]) == {
        "epoch",
        "codebook",
        "used",
        "dead",
        "perplexity",
    }
    assert shown["quantizer_stats"] and set(shown["quantizer_stats"][0]) == {"epoch", "codebook", "agreement", "margin"}
    assert shown["icim_stats"] == []  # dmqn-simple has no ICIM layer


def test_eval_json(ws):
    record = next(r for r in RunStore(ws.store_path).list_runs() if r.model == "din-short")
    result = invoke("eval", record.run_id, "--split", "valid", "--json", "-w", str(ws.root))
    metrics = json.loads(ok(result))
    assert list(metrics) == ["run_id", "split", "auc", "gauc", "logloss", "samples", "samples_per_s"]
    assert metrics["run_id"] == record.run_id and metrics["split"] == "valid"
    assert isinstance(metrics["samples"], int) and metrics["samples"] > 0
    # The best checkpoint's validation AUC is the one training recorded for its best epoch.
    assert metrics["auc"] == pytest.approx(record.best_valid_auc, abs=1e-6)


def test_bench_json(ws):
    report = json.loads(ok(invoke("bench", "tiny", *BENCH_FLAGS, "--json", "-w", str(ws.root))))
    assert report["dataset"] == "tiny" and report["seeds"] == [0, 1] and report["reused"] == 4
    assert report["failures"] == [] and report["budget"]["model"]["embed_dim"] == 8
    assert [row["model"] for row in report["rows"]] == ["din-short", "dmqn-simple"]
    for row in report["rows"]:
        assert list(row) == [
            "model",
            "runs",
            "run_ids",
            "auc_mean",
            "auc_std",
            "gauc_mean",
            "gauc_std",
            "logloss_mean",
            "logloss_std",
            "train_samples_per_s",
            "infer_samples_per_s",
            "n_parameters",
            "best_epochs",
            "failed",
            "against",
        ]
        assert row["against"] is None  # no --against
        assert row["runs"] == 2 and len(row["run_ids"]) == 2
        assert isinstance(row["auc_mean"], float) and isinstance(row["auc_std"], float)


def test_score_json(ws):
    record = next(r for r in RunStore(ws.store_path).list_runs() if r.model == "dmqn-simple" and r.status == "finished")
    data = Run.open(ws, record.run_id).data
    user = int(data.raw_user(1))
    items = data.raw_item(np.arange(1, 4)).tolist()
    export_states(ws, record.run_id, users=[user])
    result = invoke(
        "score", record.run_id, "--user", str(user), "--items", ",".join(map(str, items)), "--json", "-w", str(ws.root)
    )
    scored = json.loads(ok(result))
    assert list(scored) == ["run_id", "version", "user_id", "scores"] and scored["user_id"] == user
    assert scored["run_id"] == record.run_id and scored["version"].startswith(record.run_id)
    assert [s["item_id"] for s in scored["scores"]] == items
    assert all(0.0 < s["probability"] < 1.0 for s in scored["scores"]) and result.stderr == ""


@pytest.mark.parametrize("args", [["runs"], ["runs", "show"], ["eval"], ["bench"], ["score"]])
def test_json_is_documented_in_help(args):
    assert "--json" in ok(invoke(*args, "--help", columns=200))


# ---- 4: names are not markup ----


def test_a_set_named_like_markup_shows_as_it_is(ws):
    assert EVIL in ok(invoke("runs", "-w", str(ws.root)))
    evil_run = next(r for r in RunStore(ws.store_path).list_runs() if r.dataset == EVIL)
    assert EVIL in ok(invoke("runs", "show", evil_run.run_id, "-w", str(ws.root)))


def test_a_closing_tag_as_a_name_is_a_one_line_error(ws):
    result = invoke("train", "[/]", "--model", "pop", "-w", str(ws.root))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and "no prepared set" in result.stderr and "[/]" in result.stderr


def test_the_config_typo_message_keeps_its_table_name(ws, tmp_path):
    config = tmp_path / "typo.toml"
    config.write_text("[model]\nembed_dimm = 8\n")
    result = invoke("train", "tiny", "--config", str(config), "-w", str(ws.root), columns=400)
    assert result.exit_code == 1 and "unknown [model] setting(s) embed_dimm" in result.stderr


def test_the_inspector_shows_a_markup_like_set_name_as_it_is(ws):
    from textual.widgets import OptionList

    from dmqn_inspect.app import InspectApp

    evil_run = next(r for r in RunStore(ws.store_path).list_runs() if r.dataset == EVIL and r.model == "dmqn-simple")

    async def main() -> None:
        app = InspectApp(ws, RunInspector(ws, evil_run.run_id), 987654321)  # no such user: the message names the set
        async with app.run_test(size=(80, 24)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert f"in data set {EVIL}." in str(app.query_one("#message").render())
            await pilot.press("r")
            await app.workers.wait_for_complete()
            await pilot.pause()
            runs = app.screen.query_one(OptionList)
            lines = [runs.render_line(y).text for y in range(runs.size.height)]
            assert any(evil_run.run_id in line and EVIL in line for line in lines)

    asyncio.run(main())


def test_prep_and_synth_print_markup_like_names_as_they_are(tmp_path):
    # A name with a slash is a path to prep, so '[/]' cannot name a set; '[red]evil' is the case.
    log = tmp_path / f"{EVIL}.csv"
    synth = invoke("synth", str(log), "--scale", "tiny", "--seed", "3", columns=400)
    assert synth.exit_code == 0 and f"{EVIL}.csv" in synth.stdout, synth.output
    target = Workspace(tmp_path / "w").ensure()
    result = invoke(
        "prep", str(log), "--format", "taobao", "--out", EVIL, "--max-len", "200", "-w", str(target.root), columns=400
    )
    assert result.exit_code == 0, result.output
    assert f"prepared {EVIL} " in result.stdout and str(target.dataset_path(EVIL)) in result.stdout
