"""Training loop: interruption and resume, early stopping, run-store records."""

from __future__ import annotations

import math

import pytest

import dmqn_core.training.train as train_module
from dmqn_core.errors import DmqnError
from dmqn_core.models.registry import model_names
from dmqn_core.runs.store import RunStore
from dmqn_core.training.train import train

MODEL = {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8}
TRAIN = {"epochs": 2, "max_len": 50, "batch_size": 128, "seed": 11, "patience": 5}


def test_interrupted_run_resumes_to_the_same_result(tiny_workspace, monkeypatch):
    reference = train(tiny_workspace, "tiny", "dmqn", MODEL, TRAIN)

    real_epoch = train_module._train_epoch
    calls = {"n": 0}

    def interrupt_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_workspace, "tiny", "dmqn", MODEL, TRAIN)
    store = RunStore(tiny_workspace.store_path)
    interrupted = store.list_runs()[-1]
    assert interrupted.status == "interrupted" and interrupted.epochs_done == 1
    monkeypatch.setattr(train_module, "_train_epoch", real_epoch)

    resumed = train(tiny_workspace, resume=interrupted.run_id)
    record = store.get_run(interrupted.run_id)
    assert record.status == "finished" and record.epochs_done == 2

    # Same seed, same data: the resumed run ends exactly where the uninterrupted one did.
    def quality(metrics):
        return {k: v for k, v in metrics.items() if k != "samples_per_s"}

    assert quality(resumed.test) == quality(reference.test)
    assert resumed.best_valid_auc == reference.best_valid_auc
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

    model, train_settings = read_config_file(Path(__file__).resolve().parents[2] / "examples" / "dmqn.toml")
    vocab = {"n_items", "n_categories", "n_behavior_types"}
    assert set(model) == {f.name for f in fields(ModelConfig)} - vocab
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
    assert 0.0 <= result.test["auc"] <= 1.0 and math.isfinite(result.test["logloss"])


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
