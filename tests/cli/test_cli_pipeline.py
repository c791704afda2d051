"""synth → prep → train → eval → runs through the command line, on tiny data."""

from __future__ import annotations

import json

import duckdb
import pytest
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.runs.store import RunStore

SMALL_MODEL = ["--embed-dim", "8", "--codebooks", "2", "--codebook-size", "8", "--max-len", "60", "--batch-size", "128"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("cli")
    log = ws / "log.csv"
    assert invoke("synth", str(log), "--scale", "tiny", "--seed", "5").exit_code == 0
    result = invoke("prep", str(log), "--format", "taobao", "--out", "tiny", "--train-targets", "4", "-w", str(ws))
    assert result.exit_code == 0, result.output
    return ws


def test_train_eval_runs_end_to_end(workspace):
    ws = str(workspace)
    result = invoke("train", "tiny", "--model", "dmqn", "--epochs", "1", *SMALL_MODEL, "-w", ws)
    assert result.exit_code == 0, result.output
    store = RunStore(workspace / "runs.duckdb")
    run = store.list_runs()[-1]
    assert run.status == "finished" and run.epochs_done == 1 and run.model == "dmqn"
    assert run.best_valid_auc is not None
    # Every value used is stored, flags included.
    assert run.params["model"]["embed_dim"] == 8 and run.params["train"]["max_len"] == 60
    assert run.params["train"]["epochs"] == 1 and run.params["data"]["protocol"]["train_targets"] == 4
    assert (workspace / "runs" / run.run_id / "checkpoint.pt").exists()

    result = invoke("eval", "--split", "valid", "-w", ws)  # latest run by default
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "samples/s" in result.output
    tested = invoke("eval", run.run_id, "--split", "test", "--json", "-w", ws)
    assert json.loads(tested.stdout)["auc"] == pytest.approx(run.test_auc, abs=1e-6)  # the best weights again
    con = duckdb.connect(str(workspace / "runs.duckdb"), read_only=True)
    names = {
        r[0]
        for r in con.execute(
            "SELECT name FROM metrics WHERE run_id = ? AND split = 'valid' AND epoch IS NULL", [run.run_id]
        ).fetchall()
    }
    usage_rows = con.execute("SELECT count(*) FROM codebook_usage WHERE run_id = ?", [run.run_id]).fetchone()[0]
    con.close()
    assert {"auc", "gauc", "logloss", "samples_per_s"} <= names
    assert usage_rows == 2  # one row per codebook and epoch

    listing = invoke("runs", "-w", ws)
    assert listing.exit_code == 0 and run.run_id in listing.output
    shown = invoke("runs", "show", run.run_id, "-w", ws)
    assert shown.exit_code == 0 and "model.embed_dim" in shown.output and "perplexity" in shown.output


def test_same_seed_same_metrics(workspace):
    ws = str(workspace)
    aucs = []
    for _ in range(2):
        result = invoke(
            "train", "tiny", "--model", "dmqn-simple", "--epochs", "1", "--seed", "7", *SMALL_MODEL, "-w", ws
        )
        assert result.exit_code == 0, result.output
        aucs.append(RunStore(workspace / "runs.duckdb").list_runs()[-1])
    assert aucs[0].run_id != aucs[1].run_id
    assert aucs[0].test_auc == aucs[1].test_auc and aucs[0].best_valid_auc == aucs[1].best_valid_auc
    assert aucs[0].params["model"]["icim_layers"] == 0


def test_config_file_and_flag_precedence(workspace, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[model]\nembed_dim = 12\ncodebook_size = 4\n[train]\nepochs = 1\nlr = 0.01\n")
    result = invoke(
        "train", "tiny", "--config", str(config), "--embed-dim", "8", "--max-len", "40", "-w", str(workspace)
    )
    assert result.exit_code == 0, result.output
    run = RunStore(workspace / "runs.duckdb").list_runs()[-1]
    assert run.params["model"]["embed_dim"] == 8 and run.params["model"]["codebook_size"] == 4
    assert run.params["train"]["lr"] == 0.01


def test_popularity_baseline_trains_without_epochs(workspace):
    result = invoke("train", "tiny", "--model", "pop", "-w", str(workspace))
    assert result.exit_code == 0, result.output
    run = RunStore(workspace / "runs.duckdb").list_runs()[-1]
    assert run.model == "pop" and run.status == "finished" and run.n_parameters == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing-set"], "no prepared set"),
        (["train", "tiny", "--model", "nope"], "unknown model"),
        (["train", "tiny", "--epochs", "0"], "epochs must be at least 1"),
        (["eval", "no-such-run"], "unknown run"),
        (["runs", "show", "no-such-run"], "unknown run"),
        (["train", "--resume", "no-such-run"], "unknown run"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(workspace, args, message):
    result = invoke(*args, "-w", str(workspace))
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_config_file(workspace, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[model]\nno_such_setting = 1\n")
    result = invoke("train", "tiny", "--config", str(config), "-w", str(workspace))
    assert result.exit_code == 1 and "no_such_setting" in result.output


def test_sigterm_marks_the_run_interrupted_and_it_resumes(workspace):
    """`kill` (SIGTERM) is handled like Ctrl-C: the run is left resumable, not 'running'."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [
        sys.executable,
        "-m",
        "dmqn_cli",
        "train",
        "tiny",
        "--model",
        "dmqn",
        "--epochs",
        "50",
        "--patience",
        "50",
        *SMALL_MODEL,
        "-w",
        str(workspace),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    store = RunStore(workspace / "runs.duckdb")
    before = {r.run_id for r in store.list_runs()}
    # Wait until the first epoch is checkpointed. The deadline only guards against a hang: a loaded
    # shared machine can take minutes for an epoch, and a training that dies is reported at once.
    deadline = time.monotonic() + 900
    run = None
    while time.monotonic() < deadline and run is None and process.poll() is None:
        time.sleep(0.5)
        run = next((r for r in store.list_runs() if r.run_id not in before and r.epochs_done >= 1), None)
    if run is None:
        process.kill()
        raise AssertionError(f"no epoch was checkpointed (exit {process.wait()}): {process.stderr.read()}")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in stderr
    record = store.get_run(run.run_id)
    assert record.status == "interrupted" and record.epochs_done >= 1
    resumed = invoke("train", "--resume", run.run_id, "--epochs", str(record.epochs_done + 1), "-w", str(workspace))
    assert resumed.exit_code == 0, resumed.output
    assert store.get_run(run.run_id).status == "finished"
