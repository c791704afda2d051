"""Training, evaluation and the run store under hostile or broken input: crafted and damaged
checkpoints, a data set prepared again under a run's feet, settings of the wrong type or out of
range, a damaged run store, runs killed with SIGKILL, names that would leave the workspace.

Every failure the user can cause must be one DmqnError line, leave no half-made run behind and
never run code from a file.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_set_workspace
from typer.testing import CliRunner

import dmqn_core.training.trainer as trainer_module
from dmqn_cli.main import app
from dmqn_core.data.prep import prepare
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.data.synth import write_log
from dmqn_core.errors import DmqnError
from dmqn_core.runs.checkpoint import BEST, CHECKPOINT
from dmqn_core.runs.inspection import RunInspector
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RunStore
from dmqn_core.training.bench import run_bench
from dmqn_core.training.evaluate import evaluate_run
from dmqn_core.training.train import read_config_file, train
from dmqn_core.workspace import Workspace

SMALL = {"embed_dim": 8, "mlp_hidden": [16]}
QUICK = {"epochs": 1, "max_len": 50, "batch_size": 256, "inspect_users": 0}


def run_entries(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.runs_dir.iterdir()) if ws.runs_dir.exists() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Workspace, str, str]:
    """A workspace with a finished din-short run and an interrupted one that has a checkpoint.

    Tests may replace the runs' checkpoint files but must put the originals back.
    """
    ws = tiny_set_workspace(tmp_path_factory.mktemp("trained"))
    finished = train(ws, "tiny", "din-short", SMALL, QUICK).run_id
    interrupted = train(ws, "tiny", "din-short", SMALL, QUICK).run_id
    RunStore(ws.store_path).update_run(interrupted, status="interrupted")  # resumable, checkpoint after epoch 1
    return ws, finished, interrupted


class RunsShellCommand:
    """Unpickling this object calls os.system: what a crafted checkpoint does to weights_only=False."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _swap(path: Path, content: bytes) -> bytes:
    original = path.read_bytes()
    path.write_bytes(content)
    return original


# -- item 1: a checkpoint that would run code is refused before any of it runs -----------------
def test_a_checkpoint_that_would_run_code_is_refused_by_eval_and_resume(trained, tmp_path):
    ws, finished, interrupted = trained
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"model_state": RunsShellCommand(f"touch {marker}"), "epoch": 1}, buffer)
    evil = buffer.getvalue()
    best = ws.run_dir(finished) / BEST
    checkpoint = ws.run_dir(interrupted) / CHECKPOINT
    originals = {best: _swap(best, evil), checkpoint: _swap(checkpoint, evil)}
    try:
        # eval, and through Run.model export-cache, score, report --user and inspect --user.
        with pytest.raises(DmqnError, match=r"is not a safe checkpoint: it would load the Python object \w+\.system"):
            evaluate_run(ws, finished)
        with pytest.raises(DmqnError, match="is not a safe checkpoint"):
            Run.open(ws, finished).model()
        with pytest.raises(DmqnError, match="is not a safe checkpoint"):
            train(ws, resume=interrupted)
        result = CliRunner().invoke(app, ["eval", finished, "-w", str(ws.root)])
        assert result.exit_code == 1 and "not a safe checkpoint" in result.output
        assert "Traceback" not in result.output
    finally:
        for path, content in originals.items():
            path.write_bytes(content)
    assert not marker.exists()  # nothing of the file ran
    # A refused resume leaves the run as it was: resumable, nothing logged past its checkpoint.
    assert RunStore(ws.store_path).get_run(interrupted).status == "interrupted"


# -- item 11: damaged checkpoints are one line --------------------------------------------------
def _truncated_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model_state": {"w": torch.zeros(10_000)}}, buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _foreign_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    return buffer.getvalue()


def _saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


DAMAGED = {
    "empty": b"",
    "text": b"hello, world\n",
    "truncated": _truncated_checkpoint(),
    "foreign zip": _foreign_zip(),
    "a list": _saved([1, 2, 3]),
    "other weights": _saved(
        {
            "model_state": {"w": torch.zeros(3)},
            "optimizer_state": {},
            "train_state": {},
            "torch_rng": torch.get_rng_state(),
        }
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_a_damaged_checkpoint_is_one_line_for_eval_and_resume(trained, kind):
    ws, finished, interrupted = trained
    best = ws.run_dir(finished) / BEST
    checkpoint = ws.run_dir(interrupted) / CHECKPOINT
    originals = {best: _swap(best, DAMAGED[kind]), checkpoint: _swap(checkpoint, DAMAGED[kind])}
    message = r"checkpoint .* is damaged or not a checkpoint|checkpoint .* does not fit|is damaged or not this run's"
    try:
        with pytest.raises(DmqnError, match=message) as refused:
            evaluate_run(ws, finished)
        assert "\n" not in str(refused.value)
        with pytest.raises(DmqnError, match=message) as refused:
            train(ws, resume=interrupted)
        assert "\n" not in str(refused.value)
    finally:
        for path, content in originals.items():
            path.write_bytes(content)
    assert RunStore(ws.store_path).get_run(interrupted).status == "interrupted"


# -- item 8: a run refuses a data set prepared again under its name ----------------------------
def test_a_run_refuses_a_data_set_prepared_again_under_its_name(tmp_path):
    ws = tiny_set_workspace(tmp_path / "ws")
    store = RunStore(ws.store_path)
    finished = train(ws, "tiny", "din-short", SMALL, QUICK).run_id
    interrupted = train(ws, "tiny", "din-short", SMALL, QUICK).run_id
    store.update_run(interrupted, status="interrupted")
    recorded = store.get_run(interrupted).params
    assert recorded["data"]["fingerprint"]

    # Another log, so other vocabulary sizes too (before: an IndexError deep in an embedding).
    other = ws.root / "other.csv"
    write_log(other, "tiny", seed=8)
    prepare(other, "taobao", "tiny", workspace=ws, max_len=200, train_targets=5, seed=4, overwrite=True)
    with pytest.raises(DmqnError, match=f"not the one run {interrupted} was trained on"):
        train(ws, resume=interrupted)
    with pytest.raises(DmqnError, match=f"not the one run {finished} was trained on"):
        evaluate_run(ws, finished)
    assert store.get_run(interrupted).params == recorded  # its protocol was not rewritten
    assert store.get_run(interrupted).status == "interrupted"


def test_a_run_recorded_without_a_fingerprint_compares_protocol_and_vocabularies(tmp_path):
    ws = tiny_set_workspace(tmp_path / "ws")
    store = RunStore(ws.store_path)
    run = train(ws, "tiny", "din-short", SMALL, QUICK).run_id
    params = store.get_run(run).params
    del params["data"]["fingerprint"]  # as runs recorded before fingerprints
    store.update_run(run, params=params)
    evaluate_run(ws, run)  # the same set: accepted

    # Another log prepared with the same settings: the same protocol, other vocabularies.
    other = ws.root / "other.csv"
    write_log(other, "tiny", seed=8)
    prepare(other, "taobao", "tiny", workspace=ws, max_len=200, train_targets=5, seed=3, overwrite=True)
    data = PreparedSet.open(ws.dataset_path("tiny"))
    assert data.meta["protocol"] == params["data"]["protocol"] and data.n_items + 1 != params["model"]["n_items"]
    with pytest.raises(DmqnError, match="not the one run"):
        evaluate_run(ws, run)
    # The run's log with another sampling seed: the same vocabularies, another protocol.
    prepare(ws.root / "tiny.csv", "taobao", "tiny", workspace=ws, max_len=200, train_targets=5, seed=9, overwrite=True)
    with pytest.raises(DmqnError, match="not the one run"):
        evaluate_run(ws, run)


# -- items 9 and 11: refused settings leave nothing behind --------------------------------------
@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory) -> Workspace:
    return tiny_set_workspace(tmp_path_factory.mktemp("prepared"))


@pytest.fixture
def refusing_workspace(prepared_once, tmp_path) -> Workspace:
    """A workspace of this test's own (so that what one test leaves cannot fail another) with 'tiny'."""
    ws = Workspace(tmp_path / "ws").ensure()
    shutil.copytree(prepared_once.dataset_path("tiny"), ws.dataset_path("tiny"))
    return ws


REFUSED = {
    "lr nan": ("din-short", {}, {"lr": float("nan")}, "lr must be a positive number, got nan"),
    "lr inf": ("din-short", {}, {"lr": float("inf")}, "lr must be a positive number"),
    "weight decay nan": ("din-short", {}, {"weight_decay": float("nan")}, "weight-decay must be 0 or a positive"),
    "negative weight decay": ("din-short", {}, {"weight_decay": -1.0}, "weight-decay must be 0 or a positive"),
    "patience 0": ("din-short", {}, {"patience": 0}, "patience must be at least 1"),
    "negative seed": ("din-short", {}, {"seed": -1}, "seed must be in 0"),
    "tau 0": ("dmqn", {"tau": 0.0}, {}, "invalid model setting: tau must be > 0"),
    "tau nan": ("dmqn", {"tau": float("nan")}, {}, "invalid model setting: tau must be a finite number"),
    "codebooks 0": ("dmqn", {"n_codebooks": 0}, {}, "invalid model setting: n_codebooks must be >= 1"),
    "dropout 1.5": ("din-short", {"dropout": 1.5}, {}, r"invalid model setting: dropout must be in \[0, 1\)"),
    "usage weight nan": ("dmqn", {"usage_loss_weight": float("nan")}, {}, "usage_loss_weight must be a finite"),
    "epochs true": ("din-short", {}, {"epochs": True}, r"\[train\] setting epochs must be an integer, got true"),
    "epochs text": ("din-short", {}, {"epochs": "3"}, r"\[train\] setting epochs must be an integer, got \"3\""),
    "lr text": ("din-short", {}, {"lr": "0.1"}, r"\[train\] setting lr must be a number"),
    "device number": ("din-short", {}, {"device": 0}, r"\[train\] setting device must be a string"),
    "embed dim float": ("din-short", {"embed_dim": 8.5}, {}, r"\[model\] setting embed_dim must be an integer"),
    "mlp text": ("din-short", {"mlp_hidden": "16"}, {}, r"\[model\] setting mlp_hidden must be a list of integers"),
    "mlp bools": ("din-short", {"mlp_hidden": [16, True]}, {}, r"mlp_hidden must be a list of integers"),
    "size bias 1": ("dmqn", {"ctam_size_bias": 1}, {}, r"\[model\] setting ctam_size_bias must be true or false"),
    "short term": ("sim", {"short_term": "lstm"}, {}, "invalid model setting: short_term must be one of din, mean"),
    "match 1": ("sim", {"match_features": 1}, {}, r"\[model\] setting match_features must be true or false"),
    "time text": ("dmqn", {"behavior_time": "yes"}, {}, r"\[model\] setting behavior_time must be true or false"),
    "categories 256": ("dmqn", {"cluster_categories": 256}, {}, "cluster_categories must be in \\[0, 255\\]"),
    "unknown model": ("nope", {}, {}, "unknown model 'nope'"),
    "bad run id": ("din-short", {}, {}, "run id '../escape' is not a plain name"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_training_leaves_no_run_behind(refusing_workspace, case):
    ws = refusing_workspace
    model, model_settings, train_settings, message = REFUSED[case]
    run_id = "../escape" if case == "bad run id" else None
    with pytest.raises(DmqnError, match=message):
        train(ws, "tiny", model, {**SMALL, **model_settings}, {**QUICK, **train_settings}, run_id=run_id)
    assert RunStore(ws.store_path).list_runs() == [] and run_entries(ws) == []
    assert not (ws.root / "escape").exists()  # runs/../escape


def test_a_missing_data_set_leaves_no_run_behind(refusing_workspace):
    with pytest.raises(DmqnError, match="no prepared set"):
        train(refusing_workspace, "absent", "din-short", SMALL, QUICK)
    assert run_entries(refusing_workspace) == []


def test_toml_values_of_the_wrong_type_are_one_line_from_the_command_line(refusing_workspace, tmp_path):
    config = tmp_path / "wrong.toml"
    config.write_text("[model]\nembed_dim = 8\n[train]\nepochs = true\n")
    assert read_config_file(config)[1] == {"epochs": True}
    for args in (
        ["--config", str(config)],
        ["--lr", "nan"],
        ["--tau", "0"],
        ["--codebooks", "0"],
        ["--dropout", "1.5"],
        ["--short-term", "lstm"],
    ):
        result = CliRunner().invoke(app, ["train", "tiny", *args, "-w", str(refusing_workspace.root)])
        assert result.exit_code == 1 and "error:" in result.output, (args, result.output)
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), args
    assert run_entries(refusing_workspace) == []
    # Typer's own range check: a usage error (exit code 2), no run either.
    result = CliRunner().invoke(
        app, ["train", "tiny", "--cluster-categories", "300", "-w", str(refusing_workspace.root)]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert run_entries(refusing_workspace) == []


# -- item 9: a run that fails after it started is marked failed --------------------------------
def test_a_run_that_fails_between_its_record_and_its_first_epoch_is_marked_failed(tmp_path, monkeypatch):
    ws = tiny_set_workspace(tmp_path / "ws")

    def loader_fails(*args, **kwargs):
        raise RuntimeError("the loader broke")

    monkeypatch.setattr(trainer_module, "BatchLoader", loader_fails)
    with pytest.raises(RuntimeError, match="the loader broke"):
        train(ws, "tiny", "din-short", SMALL, QUICK)
    (record,) = RunStore(ws.store_path).list_runs()
    assert record.status == "failed" and record.error == "RuntimeError: the loader broke"


def test_a_new_run_the_store_cannot_record_leaves_no_directory(tmp_path, monkeypatch):
    ws = tiny_set_workspace(tmp_path / "ws")

    def store_refuses(self, **kwargs):
        raise DmqnError(f"cannot use run store {self.path}: Permission denied")

    monkeypatch.setattr(RunStore, "create_run", store_refuses)
    with pytest.raises(DmqnError, match="Permission denied"):
        train(ws, "tiny", "din-short", SMALL, QUICK)
    assert run_entries(ws) == []


# -- item 11: a workspace that turns read-only in training -------------------------------------
def test_a_workspace_that_turns_read_only_fails_the_run_with_its_own_error(tmp_path, monkeypatch):
    ws = tiny_set_workspace(tmp_path / "ws")

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    def store_read_only(self, run_id, status, **fields):
        raise DmqnError(f"cannot use run store {self.path}: Permission denied")

    monkeypatch.setattr("dmqn_core.runs.checkpoint.atomic_write_bytes", read_only)  # what checkpoints are written with
    monkeypatch.setattr(RunStore, "finish_run", store_read_only)
    # The checkpoint's PermissionError, not the store's, reaches the command line (one line there).
    with pytest.raises(PermissionError):
        train(ws, "tiny", "din-short", SMALL, QUICK)
    (record,) = RunStore(ws.store_path).list_runs()
    assert record.status == "dead"  # unrecorded end, lock released: resumable
    assert sorted(p.name for p in ws.run_dir(record.run_id).iterdir()) == [".lock", "vocab"]  # no checkpoint

    monkeypatch.undo()
    train(ws, resume=record.run_id)
    assert RunStore(ws.store_path).get_run(record.run_id).status == "finished"


# -- item 11: a damaged run store is one line naming the file ----------------------------------
def test_a_damaged_run_store_is_one_line_naming_the_file(tmp_path):
    ws = tiny_set_workspace(tmp_path / "ws")
    store = RunStore(ws.store_path)
    run = store.create_run(
        model="pop", dataset="tiny", dataset_path=str(ws.dataset_path("tiny")), params={}, seed=0, n_parameters=0
    )
    store.finish_run(run, "finished")
    content = bytearray(ws.store_path.read_bytes())
    for i in range(12_388, 12_588):  # inside the first data block, after the headers
        content[i] ^= 0x5A
    ws.store_path.write_bytes(bytes(content))
    message = f"run store {ws.store_path} is damaged"
    with pytest.raises(DmqnError, match=message):
        store.list_runs()
    with pytest.raises(DmqnError, match=message):
        store.create_run(model="pop", dataset="tiny", dataset_path="x", params={}, seed=0, n_parameters=0)
    with pytest.raises(DmqnError, match=message):
        evaluate_run(ws)
    with pytest.raises(DmqnError, match=message):
        train(ws, "tiny", "pop", {}, QUICK)
    assert run_entries(ws) == []
    result = CliRunner().invoke(app, ["runs", "-w", str(ws.root)])
    assert result.exit_code == 1 and "is damaged" in result.output and "Traceback" not in result.output


# -- item 10: a run killed with SIGKILL reads dead, is not "the latest run", and resumes --------
def test_a_run_killed_with_sigkill_reads_dead_and_resumes(tmp_path):
    ws = tiny_set_workspace(tmp_path / "ws")
    command = [
        sys.executable,
        "-m",
        "dmqn_cli",
        "train",
        "tiny",
        "--model",
        "din-short",
        "--embed-dim",
        "8",
        "--epochs",
        "50",
        "--patience",
        "50",
        "--max-len",
        "50",
        "--inspect-users",
        "0",
        "-w",
        str(ws.root),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    store = RunStore(ws.store_path)
    try:
        deadline = time.monotonic() + 120
        run = None
        while run is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.3)
            run = next((r for r in store.list_runs() if r.epochs_done >= 1), None)
        assert run is not None, process.stderr.read() if process.poll() is not None else "no epoch in time"
        assert run.status == "running"  # its process holds the lock
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    record = store.get_run(run.run_id)
    assert record.status == "dead" and [r.status for r in store.list_runs()] == ["dead"]
    with pytest.raises(DmqnError, match="no finished run .* yet; name a run"):
        evaluate_run(ws)  # "the latest run" skips it
    assert store.resolve_run_id(None, finished_only=False) == run.run_id

    result = train(ws, resume=run.run_id, train_settings={"epochs": record.epochs_done + 1})
    assert result.run_id == run.run_id
    assert store.get_run(run.run_id).status == "finished"
    assert evaluate_run(ws)[0] == run.run_id


def test_commands_without_a_run_id_take_the_latest_finished_run(tmp_path):
    """eval, export-cache, score (Run.open) and report, inspect (RunInspector)."""
    ws = tiny_set_workspace(tmp_path / "ws")
    store = RunStore(ws.store_path)
    finished = train(ws, "tiny", "dmqn-simple", {**SMALL, "n_codebooks": 2, "codebook_size": 8}, QUICK).run_id
    record = store.get_run(finished)
    newer = store.create_run(
        model="dmqn", dataset="tiny", dataset_path=record.dataset_path, params=record.params, seed=0, n_parameters=0
    )  # as a run whose process died before its first epoch
    assert store.get_run(newer).status == "dead"
    assert Run.open(ws).run_id == finished
    assert RunInspector(ws).run_id == finished


# -- item 11: user-given names stay inside the workspace ---------------------------------------
@pytest.mark.parametrize("name", ["../../x", "../x", "a/b", ".hidden", "..", "", "x" * 101, "tab\tname"])
def test_a_bench_name_must_be_a_plain_name(refusing_workspace, name):
    ws = refusing_workspace
    before = sorted(p.name for p in ws.root.parent.iterdir())
    with pytest.raises(DmqnError, match="bench name .* is not a plain name"):
        run_bench(ws, "tiny", ["pop"], [0], {}, {"max_len": 50}, name=name)
    assert sorted(p.name for p in ws.root.parent.iterdir()) == before
    assert not (ws.root / "benches").exists() and run_entries(ws) == []


def test_a_plain_bench_name_is_accepted(tmp_path):
    ws = tiny_set_workspace(tmp_path / "ws")
    report = run_bench(ws, "tiny", ["pop"], [0], {}, {"max_len": 50}, name="v1.2_final-A")
    assert report.directory == ws.root / "benches" / "v1.2_final-A" and (report.directory / "table2.md").exists()


def test_a_run_id_to_resume_must_be_a_plain_name(refusing_workspace):
    with pytest.raises(DmqnError, match="run id '../../etc' is not a plain name"):
        train(refusing_workspace, resume="../../etc")
    assert run_entries(refusing_workspace) == []


def test_an_atomic_write_that_fails_leaves_neither_a_part_nor_a_temporary(tmp_path, monkeypatch):
    from dmqn_core.workspace import atomic_write_bytes

    target = tmp_path / "best.pt"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
