"""--device auto and --precision on a machine without a GPU (the conftest keeps every test not marked cuda on
the CPU, also on a GPU machine): auto resolves to cpu and the run records it; CUDA and bf16 asked for here are
one-line errors that leave nothing behind; a resumed run keeps its recorded device unless told otherwise."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.devices import check_device, check_precision, resolve_device
from dmqn_core.errors import DmqnError
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RunStore
from dmqn_core.training.bench import budget_of
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace

MODEL = {"embed_dim": 8, "mlp_hidden": [16]}
TRAIN = {"epochs": 2, "patience": 5, "max_len": 30, "batch_size": 128, "inspect_users": 0}


@pytest.fixture
def ws(tiny_workspace, tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws").ensure()
    shutil.copytree(tiny_workspace.dataset_path("tiny"), ws.dataset_path("tiny"))
    return ws


def test_auto_is_the_cpu_here_and_bad_devices_are_one_line():
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    for device, message in (
        ("gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("cuda:x", "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        ("cuda", "--device cuda was asked for but this torch build sees no CUDA device"),
        ("cuda:1", "--device cuda:1 was asked for but this torch build sees no CUDA device"),
    ):
        with pytest.raises(DmqnError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
            check_device(device)
    refused = r"^--precision bf16 needs a CUDA device; this command runs on cpu \(use fp32\)$"
    with pytest.raises(DmqnError, match=refused):
        check_precision("bf16", "cpu")
    with pytest.raises(DmqnError, match="^precision must be fp32 or bf16, got 'fp16'$"):
        check_precision("fp16", "cpu")


def test_a_run_records_and_prints_the_device_it_resolved(ws):
    result = CliRunner().invoke(
        app, ["train", "tiny", "--model", "din-short", "--epochs", "1", "--embed-dim", "8", "--max-len", "30",
              "--inspect-users", "0", "-w", str(ws.root)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "s of training on cpu" in " ".join(result.output.split())
    (record,) = RunStore(ws.store_path).list_runs()
    assert record.params["train"]["device"] == "cpu" and record.params["train"]["precision"] == "fp32"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "bf16"], "error: --precision bf16 needs a CUDA device; this command runs on cpu (use fp32)"),
        (["--device", "cuda"], "error: --device cuda was asked for but this torch build sees no CUDA device"),
        (["--device", "tpu"], "error: device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--precision", "fp16"], "error: precision must be fp32 or bf16, got 'fp16'"),
    ],
)
def test_cuda_or_bf16_asked_for_here_is_one_line_and_leaves_no_run(ws, args, message):
    result = CliRunner().invoke(app, ["train", "tiny", "--model", "din-short", *args, "-w", str(ws.root)])
    assert result.exit_code == 1 and result.output.strip() == message, result.output
    assert RunStore(ws.store_path).list_runs() == [] and not any(ws.root.joinpath("runs").glob("*"))


def test_eval_export_and_score_take_a_device_and_refuse_what_is_not_here(ws):
    run_id = train(ws, "tiny", "dmqn", {**MODEL, "n_codebooks": 2, "codebook_size": 8}, {**TRAIN, "epochs": 1}).run_id
    runner = CliRunner()
    for command in (
        ["eval", run_id, "--precision", "bf16"],
        ["eval", run_id, "--device", "cuda"],
        ["export-cache", run_id, "--device", "cuda"],
        ["score", run_id, "--user", "1", "--items", "1", "--device", "cuda"],
    ):
        result = runner.invoke(app, [*command, "-w", str(ws.root)])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, (command, result.output)
        assert result.output.startswith("error: ") and "Traceback" not in result.output, command
    assert runner.invoke(app, ["eval", run_id, "--device", "auto", "-w", str(ws.root)]).exit_code == 0
    assert runner.invoke(app, ["export-cache", run_id, "--device", "cpu", "-w", str(ws.root)]).exit_code == 0


def test_a_resumed_run_keeps_its_recorded_device_unless_told(ws):
    stopped = train(ws, "tiny", "din-short", MODEL, TRAIN, on_epoch=lambda epoch, valid: True)
    store = RunStore(ws.store_path)
    params = store.get_run(stopped.run_id).params
    # As if it had trained on a GPU machine and were resumed on this one.
    store.update_run(stopped.run_id, params={**params, "train": {**params["train"], "device": "cuda"}})
    store.finish_run(stopped.run_id, "interrupted", error="stopped by the test")
    with pytest.raises(DmqnError, match=r"trained on cuda, which this machine does not have; pass --device cpu"):
        train(ws, resume=stopped.run_id)
    resumed = train(ws, resume=stopped.run_id, train_settings={"device": "auto"})
    assert resumed.device == "cpu" and len(resumed.history) == 2
    assert Run.open(ws, stopped.run_id).train_settings["device"] == "cpu"


def test_a_bench_budget_holds_the_resolved_device_and_no_fp32(ws):
    """A bench's default name hashes its budget: fp32 is left out so that benches named before --precision
    existed keep their names and resume."""
    budget = budget_of(PreparedSet.open(ws.dataset_path("tiny")), {}, {"device": "auto"})
    assert budget["train"]["device"] == "cpu" and "precision" not in budget["train"]
