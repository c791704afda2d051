"""dmqn bench: resumable runs, Tables 2 and 3 as Markdown and CSV, the CLI."""

from __future__ import annotations

import csv
import statistics

import pytest
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.errors import DmqnError
from dmqn_core.models.registry import model_names
from dmqn_core.runs.store import RunStore
from dmqn_core.training.bench import format_mean_std, mean_std, resolve_models, run_bench
from dmqn_core.training.trainer import Trainer

MODEL = {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8, "mlp_hidden": (16,)}
TRAIN = {"epochs": 1, "max_len": 50, "batch_size": 256, "eval_batch_size": 512}


def test_resolve_models():
    assert resolve_models("dmqn, pop,dmqn") == ["dmqn", "pop"]
    everything = resolve_models("all")
    assert sorted(everything) == sorted(model_names())
    assert everything[0] == "pop" and everything[-1] == "dmqn"
    with pytest.raises(DmqnError, match="nope"):
        resolve_models("dmqn,nope")
    with pytest.raises(DmqnError):
        resolve_models(" , ")


def test_mean_std_is_the_sample_statistic():
    assert mean_std([]) == (None, None)
    assert mean_std([0.5]) == (0.5, None)
    mean, std = mean_std([0.6, 0.7, 0.8])
    assert mean == pytest.approx(0.7) and std == pytest.approx(statistics.stdev([0.6, 0.7, 0.8]))
    assert format_mean_std([0.6, 0.7, 0.8]) == "0.7000 ± 0.1000"
    assert format_mean_std([]) == "-"


def test_interrupted_bench_resumes_without_redoing_finished_runs(tiny_workspace, monkeypatch):
    real_epoch = Trainer.train_epoch
    calls = {"n": 0}

    def interrupt_the_second_trained_model(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # seed 0: din-short trains (call 1), then dmqn-simple is interrupted
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt_the_second_trained_model)
    steps = []
    models = ["pop", "din-short", "dmqn-simple", "dmqn"]
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny_workspace, "tiny", models, [0, 1], MODEL, TRAIN, name="resume-test", on_step=steps.append)
    assert [(s.model, s.seed, s.action) for s in steps] == [
        ("pop", 0, "train"),
        ("din-short", 0, "train"),
        ("dmqn-simple", 0, "train"),
    ]
    interrupted_run = steps[-1].run_id
    store = RunStore(tiny_workspace.store_path)
    assert store.get_run(interrupted_run).status == "interrupted"

    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    steps.clear()
    report = run_bench(tiny_workspace, "tiny", models, [0, 1], MODEL, TRAIN, name="resume-test", on_step=steps.append)
    actions = [(s.model, s.seed, s.action) for s in steps]
    assert actions[:4] == [
        ("pop", 0, "done"),
        ("din-short", 0, "done"),
        ("dmqn-simple", 0, "resume"),
        ("dmqn", 0, "train"),
    ]
    assert [a[2] for a in actions[4:]] == ["train"] * 4
    assert steps[2].run_id == interrupted_run  # the same run continued, not a new one
    assert report.trained == 6 and report.reused == 2 and not report.failures

    # Every model has one finished run per seed, and the rows are the run store's numbers.
    for row in report.rows:
        assert len(row.run_ids) == 2 and not row.failed
        aucs = [store.get_run(r).test_auc for r in row.run_ids]
        assert row.auc == aucs
    assert {r.model: r.train_samples_per_s is None for r in report.rows} == {
        "pop": True,
        "din-short": False,
        "dmqn-simple": False,
        "dmqn": False,
    }
    assert all(r.infer_samples_per_s > 0 for r in report.rows)
    assert [r.model for r in report.table3()] == ["dmqn-simple", "dmqn"]

    # A third call trains nothing.
    again = run_bench(tiny_workspace, "tiny", models, [0, 1], MODEL, TRAIN, name="resume-test")
    assert again.trained == 0 and again.reused == 8

    # The tables on disk.
    table2 = (report.directory / "table2.md").read_text()
    assert "| model | runs | test AUC |" in table2 and "Budget: seeds 0, 1; at most 1 epochs" in table2
    assert table2.count("\n| ") == 2 + len(models)
    with open(report.directory / "table2.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == models
    dmqn = next(r for r in report.rows if r.model == "dmqn")
    assert float(rows[-1]["auc_mean"]) == pytest.approx(statistics.fmean(dmqn.auc))
    table3 = (report.directory / "table3.md").read_text()
    assert "| dmqn-simple | 2 |" in table3 and "+0.0000" in table3


def test_a_bench_name_keeps_its_budget(tiny_workspace):
    run_bench(tiny_workspace, "tiny", ["pop"], [0], MODEL, TRAIN, name="budget-test")
    with pytest.raises(DmqnError, match="other settings"):
        run_bench(tiny_workspace, "tiny", ["pop"], [0], MODEL, {**TRAIN, "epochs": 2}, name="budget-test")
    with pytest.raises(DmqnError, match="--seeds"):
        run_bench(tiny_workspace, "tiny", ["pop"], [0], MODEL, {**TRAIN, "seed": 4}, name="budget-test")


def test_bench_command_prints_both_tables(tiny_workspace):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "tiny",
            "--models",
            "pop,dmqn-simple,dmqn",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--max-len",
            "50",
            "--embed-dim",
            "8",
            "--batch-size",
            "256",
            "-w",
            str(tiny_workspace.root),
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "Table 2" in result.output and "Table 3" in result.output and "table2.md" in result.output
    second = CliRunner().invoke(
        app,
        [
            "bench",
            "tiny",
            "--models",
            "pop,dmqn-simple,dmqn",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--max-len",
            "50",
            "--embed-dim",
            "8",
            "--batch-size",
            "256",
            "-w",
            str(tiny_workspace.root),
        ],
        terminal_width=200,
    )
    assert second.exit_code == 0 and "0 run(s) trained now, 3 reused" in second.output


def test_bench_command_rejects_unknown_models(tiny_workspace):
    result = CliRunner().invoke(app, ["bench", "tiny", "--models", "dmqn,bogus", "-w", str(tiny_workspace.root)])
    assert result.exit_code == 1 and "bogus" in result.output


def test_against_adds_paired_differences_that_match_the_runs_test_metrics(tiny_workspace, tmp_path):
    """--against: Δ is the seed mean of the runs' own test metrics minus the reference's (so the test
    predictions it pairs are each run's, sample by sample), inside its interval; files and JSON carry it."""
    import json

    from dmqn_core.runs.run import Run
    from dmqn_core.training.evaluate import split_logits
    from dmqn_core.training.metrics import auc, gauc

    models = ["pop", "din-short", "dmqn"]
    report = run_bench(tiny_workspace, "tiny", models, [0, 1], MODEL, TRAIN, name="against-test", against="dmqn")
    assert report.against == "dmqn"
    rows = {row.model: row for row in report.rows}
    assert rows["dmqn"].against is None
    store = RunStore(tiny_workspace.store_path)
    for run_id in rows["din-short"].run_ids:  # the logits are the run's test predictions, in split order
        run = Run.open(tiny_workspace, run_id)
        test, logits = run.data.split("test"), split_logits(run)
        record = store.get_run(run_id)
        assert auc(test.label, logits) == pytest.approx(record.test_auc, abs=1e-12)
        assert gauc(test.user, test.label, logits) == pytest.approx(record.test_gauc, abs=1e-12)
    for model in ("pop", "din-short"):
        diff = rows[model].against
        for metric in ("auc", "gauc"):
            expected = statistics.fmean(getattr(rows[model], metric)) - statistics.fmean(getattr(rows["dmqn"], metric))
            assert diff[metric].delta == pytest.approx(expected, abs=1e-9)
            assert diff[metric].low <= diff[metric].delta <= diff[metric].high
            assert diff[metric].high - diff[metric].low > 0
    table = (report.directory / "table2.md").read_text()
    assert "Δ AUC 95% CI" in table and "paired bootstrap" in table
    with open(report.directory / "table2.csv", newline="") as fh:
        csv_rows = {row["model"]: row for row in csv.DictReader(fh)}
    assert float(csv_rows["pop"]["delta_auc"]) == pytest.approx(rows["pop"].against["auc"].delta)
    assert csv_rows["dmqn"]["delta_auc"] == ""

    config = tmp_path / "budget.toml"  # the budget of MODEL and TRAIN: the same bench, every run reused
    config.write_text(
        "[model]\nembed_dim = 8\nn_codebooks = 2\ncodebook_size = 8\nmlp_hidden = [16]\n"
        "[train]\nepochs = 1\nmax_len = 50\nbatch_size = 256\neval_batch_size = 512\n"
    )
    args = ["bench", "tiny", "--models", ",".join(models), "--seeds", "2", "--name", "against-test"]
    args += ["--config", str(config), "--against", "dmqn"]
    result = CliRunner().invoke(app, [*args, "--json", "-w", str(tiny_workspace.root)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["against_model"] == "dmqn" and printed["reused"] == 6
    by_model = {row["model"]: row for row in printed["rows"]}
    assert by_model["dmqn"]["against"] is None
    assert by_model["pop"]["against"]["delta_auc"]["delta"] == pytest.approx(rows["pop"].against["auc"].delta)


def test_against_must_name_a_model_of_the_bench(tiny_workspace):
    with pytest.raises(DmqnError, match="--against 'twin' is not one of the bench's models"):
        run_bench(tiny_workspace, "tiny", ["pop", "dmqn"], [0], MODEL, TRAIN, name="against-bad", against="twin")
    result = CliRunner().invoke(
        app, ["bench", "tiny", "--models", "pop", "--seeds", "1", "--against", "dmqn", "-w", str(tiny_workspace.root)]
    )
    assert result.exit_code == 1 and result.output.startswith("error: --against 'dmqn'")
    assert len(result.output.strip().splitlines()) == 1


def test_the_budget_line_names_the_signals_every_model_gets():
    from dmqn_core.training.bench import describe_budget

    train = {"epochs": 8, "patience": 2, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.0, "max_len": 100}
    model = {"embed_dim": 32, "mlp_hidden": [200, 80]}
    before = describe_budget({"train": train, "model": model}, [0])  # a bench registered before the settings
    assert "short-term each model's own; match features off" in before
    now = describe_budget({"train": train, "model": {**model, "short_term": "din", "match_features": True}}, [0, 1])
    assert "short-term din; match features on" in now
