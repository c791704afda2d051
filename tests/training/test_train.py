"""Training loop: interruption and resume, early stopping, run-store records."""

from __future__ import annotations

import math

import pytest
import torch

import dmqn_core.training.codebooks as codebooks_module
from dmqn_core.errors import DmqnError
from dmqn_core.models.dmqn.mcqm import MultiCodebookQuantizer
from dmqn_core.models.registry import model_names
from dmqn_core.progress import NullProgress
from dmqn_core.runs.store import RunStore
from dmqn_core.training.evaluate import evaluate_run
from dmqn_core.training.train import train
from dmqn_core.training.trainer import Trainer

MODEL = {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8}
TRAIN = {"epochs": 2, "max_len": 50, "batch_size": 128, "seed": 11, "patience": 5}


def test_interrupted_run_resumes_to_the_same_result(tiny_workspace, monkeypatch):
    reference = train(tiny_workspace, "tiny", "dmqn", MODEL, TRAIN)

    real_epoch = Trainer.train_epoch
    calls = {"n": 0}

    def interrupt_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_workspace, "tiny", "dmqn", MODEL, TRAIN)
    store = RunStore(tiny_workspace.store_path)
    interrupted = store.list_runs()[-1]
    assert interrupted.status == "interrupted" and interrupted.epochs_done == 1
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)

    resumed = train(tiny_workspace, resume=interrupted.run_id)
    record = store.get_run(interrupted.run_id)
    assert record.status == "finished" and record.epochs_done == 2

    # Same seed, same data: the resumed run ends exactly where the uninterrupted one did.
    def quality(metrics):
        return {k: v for k, v in metrics.items() if k != "samples_per_s"}

    # Equal up to float32 rounding, not bit for bit: with more than one thread, CPU kernels that
    # accumulate in parallel (the embeddings' backward) may add in another order from one run to the
    # next, and a last-bit difference in a weight reaches the test logloss (seen: 1e-10). A resume
    # that restored the wrong state (optimizer, RNG, epoch) misses by orders of magnitude more.
    assert quality(resumed.test) == pytest.approx(quality(reference.test), rel=1e-5, abs=1e-7)
    assert resumed.best_valid_auc == pytest.approx(reference.best_valid_auc, rel=1e-5, abs=1e-7)
    epochs = [e for e, split, name, _ in store.metric_history(record.run_id) if split == "valid" and name == "auc"]
    assert epochs == [1, 2]  # nothing logged twice

    with pytest.raises(DmqnError, match="already finished"):
        train(tiny_workspace, resume=interrupted.run_id)


def test_early_stopping_and_best_epoch(tiny_workspace):
    # A learning rate this high makes validation AUC stop improving quickly.
    result = train(tiny_workspace, "tiny", "dmqn-simple", MODEL, {**TRAIN, "epochs": 6, "patience": 1, "lr": 0.05})
    record = RunStore(tiny_workspace.store_path).get_run(result.run_id)
    aucs = [h["valid_auc"] for h in result.history]
    assert record.best_epoch == 1 + aucs.index(max(aucs))
    assert record.best_valid_auc == max(aucs)
    if record.epochs_done < 6:
        assert record.epochs_done == record.best_epoch + 1  # stopped after one stale epoch


def test_unknown_settings_are_refused(tiny_workspace):
    with pytest.raises(DmqnError, match="unknown \\[model\\] setting"):
        train(tiny_workspace, "tiny", "dmqn", {"codebook": 3}, TRAIN)
    with pytest.raises(DmqnError, match="come\\(s\\) from the data set"):
        train(tiny_workspace, "tiny", "dmqn", {"n_items": 3}, TRAIN)


def test_example_config_documents_every_setting_with_its_default():
    """examples/dmqn.toml lists every model and training setting, at the default value."""
    from dataclasses import fields
    from pathlib import Path

    from dmqn_core.config import ModelConfig
    from dmqn_core.training.train import TrainConfig, read_config_file

    example = Path(__file__).resolve().parents[2] / "examples" / "dmqn.toml"
    model, train_settings = read_config_file(example)
    vocab = {"n_items", "n_categories", "n_behavior_types"}
    # TOML has no null: a setting whose default is None (each model's own) is documented in a comment.
    unset = {f.name for f in fields(ModelConfig) if f.default is None}
    assert set(model) == {f.name for f in fields(ModelConfig)} - vocab - unset
    assert all(f"# {name} = " in example.read_text() for name in unset)
    defaults = ModelConfig(n_items=2, n_categories=2, n_behavior_types=2)
    for name, value in model.items():
        assert getattr(defaults, name) == (tuple(value) if isinstance(value, list) else value), name
    assert set(train_settings) == {f.name for f in fields(TrainConfig)} - {"max_len"}
    for name, value in train_settings.items():
        assert getattr(TrainConfig(), name) == value, name


@pytest.mark.parametrize("model_name", model_names())
def test_every_registered_model_trains_through_the_one_code_path(tiny_workspace, model_name):
    result = train(
        tiny_workspace,
        "tiny",
        model_name,
        {"embed_dim": 8, "mlp_hidden": [16]},
        {"epochs": 1, "max_len": 60, "batch_size": 256, "seed": 2},
    )
    record = RunStore(tiny_workspace.store_path).get_run(result.run_id)
    assert record.status == "finished" and record.model == model_name
    # The test metrics are the best checkpoint's: evaluating the run again reproduces them.
    _, again = evaluate_run(tiny_workspace, result.run_id, "test")
    for name in ("auc", "gauc", "logloss"):
        assert again[name] == pytest.approx(result.test[name], abs=1e-6) and record.test_auc == result.test["auc"]
    assert math.isfinite(result.test["logloss"])


def test_a_run_in_training_cannot_be_trained_by_a_second_process(tiny_workspace, tmp_path):
    import subprocess
    import sys

    from dmqn_core.workspace import exclusive_lock

    store = RunStore(tiny_workspace.store_path)
    run_id = store.create_run(
        model="dmqn",
        dataset="tiny",
        dataset_path=str(tiny_workspace.dataset_path("tiny")),
        params={},
        seed=0,
        n_parameters=0,
    )
    lock = tiny_workspace.run_dir(run_id) / ".lock"
    with exclusive_lock(lock, "test"):  # as if another process were training the run
        with pytest.raises(DmqnError, match=f"run {run_id} is in use by another process"):
            train(tiny_workspace, resume=run_id)
    # A holder killed with SIGKILL leaves no stale lock behind.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from dmqn_core.workspace import exclusive_lock\n"
                f"with exclusive_lock(Path({str(lock)!r}), 'x'):\n    print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DmqnError, match=r"\(pid \d+\)"):
        with exclusive_lock(lock, "test"):
            pass
    holder.kill()
    holder.wait()
    with exclusive_lock(lock, "test"):
        pass


def test_a_one_process_run_records_its_world_size(tiny_workspace):
    result = train(tiny_workspace, "tiny", "pop", {}, {"max_len": 60})
    record = RunStore(tiny_workspace.store_path).get_run(result.run_id)
    assert record.params["distributed"] == {"world_size": 1, "backend": None}


def test_quantizer_diagnostics_are_recorded_every_epoch_and_shown(tiny_workspace, monkeypatch):
    import json

    from typer.testing import CliRunner

    from dmqn_cli.main import app

    result = train(tiny_workspace, "tiny", "dmqn", MODEL, TRAIN)
    store = RunStore(tiny_workspace.store_path)
    quantizer = store.quantizer_stats(result.run_id)
    assert [(epoch, codebook) for epoch, codebook, _, _ in quantizer] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(0.0 <= agreement <= 1.0 and margin > 0 for _, _, agreement, margin in quantizer)
    icim = store.icim_stats(result.run_id)
    assert [(epoch, layer) for epoch, layer, _ in icim] == [(1, 0), (2, 0)] and all(r > 0 for *_, r in icim)

    def invoke(*args: str) -> str:
        out = CliRunner().invoke(app, ["runs", "show", result.run_id, *args, "-w", str(tiny_workspace.root)])
        assert out.exit_code == 0, out.output
        return out.stdout

    text = invoke()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text  # a pipe is 80 columns wide
    lines = [line.split() for line in text.splitlines()]
    for epoch, codebook, agreement, margin in quantizer:
        assert [str(epoch), str(codebook), f"{agreement:.1%}", f"{margin:.3f}"] in lines
    for epoch, layer, ratio in icim:
        assert [str(epoch), str(layer), f"{ratio:.4f}"] in lines
    shown = json.loads(invoke("--json"))
    assert [tuple(row.values()) for row in shown["quantizer_stats"]] == quantizer
    assert [tuple(row.values()) for row in shown["icim_stats"]] == icim
    assert list(shown["quantizer_stats"][0]) == ["epoch", "codebook", "agreement", "margin"]

    # Measuring draws its noise from a generator of its own: without it the run trains the same. Had it
    # drawn from the training's stream, every later Gumbel draw would differ and the metrics by far more
    # than the float32 rounding that parallel CPU kernels may change from one run to the next.
    monkeypatch.setattr(codebooks_module, "DIAGNOSTIC_BATCHES", 0)
    unmeasured = train(tiny_workspace, "tiny", "dmqn", MODEL, TRAIN)
    same = {**result.test, "samples_per_s": unmeasured.test["samples_per_s"]}
    assert unmeasured.test == pytest.approx(same, rel=1e-5, abs=1e-7)
    assert len(unmeasured.history) == len(result.history)
    for measured, plain in zip(result.history, unmeasured.history):
        assert plain == pytest.approx(measured, rel=1e-5, abs=1e-7)


def test_without_assignment_noise_the_training_codeword_is_the_inference_one(tiny_workspace):
    result = train(tiny_workspace, "tiny", "dmqn", {**MODEL, "assign_noise": "none"}, {**TRAIN, "epochs": 1})
    rows = RunStore(tiny_workspace.store_path).quantizer_stats(result.run_id)
    assert len(rows) == MODEL["n_codebooks"] and all(agreement == 1.0 for _, _, agreement, _ in rows)


def test_quantizer_flags_reach_the_model_and_the_tau_schedule_runs_per_epoch(tiny_workspace, monkeypatch):
    from typer.testing import CliRunner

    from dmqn_cli.main import app

    taus = []
    real_epoch = Trainer.train_epoch

    def record_tau(trainer, *args, **kwargs):
        taus.append(trainer.model.quantizer.tau)
        return real_epoch(trainer, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", record_tau)
    flags = ["--assign-noise", "gumbel", "--tau-placement", "before_noise", "--tau", "2", "--tau-decay", "0.25"]
    flags += ["--tau-min", "0.2", "--straight-through", "centred", "--epochs", "3", "--patience", "3"]
    flags += ["--embed-dim", "8", "--codebooks", "2", "--codebook-size", "8", "--max-len", "50", "--inspect-users", "0"]
    out = CliRunner().invoke(app, ["train", "tiny", *flags, "-w", str(tiny_workspace.root)])
    assert out.exit_code == 0, out.output
    record = RunStore(tiny_workspace.store_path).list_runs()[-1]
    model = record.params["model"]
    assert (model["tau_placement"], model["tau_decay"], model["tau_min"], model["straight_through"]) == (
        "before_noise",
        0.25,
        0.2,
        "centred",
    )
    assert taus == [2.0, 0.5, 0.2]  # max(tau_min, tau · decay^(e-1)) for epochs 1, 2, 3

    refused = CliRunner().invoke(app, ["train", "tiny", "--assign-noise", "uniform", "-w", str(tiny_workspace.root)])
    assert refused.exit_code != 0 and "assign_noise must be one of gumbel, none" in refused.output


def test_a_callers_epoch_hook_sees_each_epoch_and_can_stop_the_training(tiny_workspace):
    seen = []

    def stop_after_the_second(epoch: int, valid: dict[str, float]) -> bool:
        seen.append((epoch, valid["auc"]))
        return epoch == 2

    result = train(
        tiny_workspace,
        "tiny",
        "din-short",
        MODEL,
        {**TRAIN, "epochs": 4, "patience": 4},
        on_epoch=stop_after_the_second,
    )
    assert [epoch for epoch, _ in seen] == [1, 2]
    assert [auc for _, auc in seen] == [row["valid_auc"] for row in result.history]
    record = RunStore(tiny_workspace.store_path).get_run(result.run_id)
    assert record.status == "finished" and record.epochs_done == 2 and record.test_auc == result.test["auc"]


class LogLines(NullProgress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_kmeans_init_starts_a_new_run_from_data_and_a_resumed_run_from_its_checkpoint(tiny_workspace, monkeypatch):
    calls = []
    real_init = MultiCodebookQuantizer.init_from_data

    def counted_init(self, *args, **kwargs):
        calls.append(args[0].shape)
        return real_init(self, *args, **kwargs)

    starts = []  # the codebooks each epoch starts from
    real_epoch = Trainer.train_epoch

    def record_or_interrupt(trainer, *args, **kwargs):
        starts.append(trainer.model.quantizer.codebooks.detach().clone())
        if len(starts) == 3:  # the second epoch of the k-means run
            raise KeyboardInterrupt
        return real_epoch(trainer, *args, **kwargs)

    monkeypatch.setattr(MultiCodebookQuantizer, "init_from_data", counted_init)
    monkeypatch.setattr(Trainer, "train_epoch", record_or_interrupt)
    train(tiny_workspace, "tiny", "dmqn", MODEL, {**TRAIN, "epochs": 1})  # the default: random codewords
    assert calls == []
    log = LogLines()
    with pytest.raises(KeyboardInterrupt):
        train(tiny_workspace, "tiny", "dmqn", {**MODEL, "codebook_init": "kmeans"}, TRAIN, progress=log)
    assert len(calls) == 1 and 0 < calls[0][0] <= codebooks_module.CODEBOOK_SAMPLE_BEHAVIORS
    assert calls[0][1] == MODEL["embed_dim"]
    assert "codewords initialised by k-means of the first training behaviors" in log.lines
    random_start, kmeans_start = starts[0], starts[1]
    assert random_start.shape == kmeans_start.shape and not torch.allclose(random_start, kmeans_start)
    store = RunStore(tiny_workspace.store_path)
    interrupted = store.list_runs()[-1]
    assert interrupted.params["model"]["codebook_init"] == "kmeans" and interrupted.epochs_done == 1

    train(tiny_workspace, resume=interrupted.run_id)
    assert len(calls) == 1  # resuming keeps the trained codewords
    assert store.get_run(interrupted.run_id).status == "finished"


def test_dead_codeword_reset_moves_the_dead_codewords_and_zeroes_their_adam_moments(tiny_workspace, monkeypatch):
    resets = []
    real_reset = codebooks_module.reset_dead_codewords

    def check_reset(model, optimizer, *args, **kwargs):
        before = model.quantizer.codebooks.detach().clone()
        reset = real_reset(model, optimizer, *args, **kwargs)
        after = model.quantizer.codebooks.detach()
        assert torch.equal(after[~reset], before[~reset])
        assert not torch.isclose(after[reset], before[reset]).all(dim=-1).any()
        moments = optimizer.state[model.quantizer.codebooks]
        assert (moments["exp_avg"][reset] == 0).all() and (moments["exp_avg_sq"][reset] == 0).all()
        resets.append(int(reset.sum()))
        return reset

    monkeypatch.setattr(codebooks_module, "reset_dead_codewords", check_reset)
    log = LogLines()
    # 32 codewords per codebook for the tiny set's few hundred validation histories: some go unused.
    model = {**MODEL, "codebook_size": 32, "dead_codeword_reset": True}
    result = train(tiny_workspace, "tiny", "dmqn", model, TRAIN, progress=log)
    usage = RunStore(tiny_workspace.store_path).codebook_usage(result.run_id)
    dead = [sum(row[3] for row in usage if row[0] == epoch) for epoch in (1, 2)]
    assert resets == dead and dead[0] > 0
    assert [line for line in log.lines if "dead codewords" in line] == [
        f"epoch {epoch}: reset {n} dead codewords" for epoch, n in zip((1, 2), dead)
    ]


def test_codebook_flags_reach_the_run(tiny_workspace):
    from typer.testing import CliRunner

    from dmqn_cli.main import app

    flags = ["--codebook-init", "kmeans", "--dead-codeword-reset", "--epochs", "1", "--inspect-users", "0"]
    flags += ["--embed-dim", "8", "--codebooks", "2", "--codebook-size", "8", "--max-len", "50"]
    out = CliRunner().invoke(app, ["train", "tiny", *flags, "-w", str(tiny_workspace.root)])
    assert out.exit_code == 0, out.output
    model = RunStore(tiny_workspace.store_path).list_runs()[-1].params["model"]
    assert (model["codebook_init"], model["dead_codeword_reset"]) == ("kmeans", True)

    refused = CliRunner().invoke(app, ["train", "tiny", "--codebook-init", "pca", "-w", str(tiny_workspace.root)])
    assert refused.exit_code != 0 and "codebook_init must be one of random, kmeans" in refused.output
