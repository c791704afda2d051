"""`dmqn tune`: search spaces, studies that resume, trials that are runs, and the command's errors."""

from __future__ import annotations

import json
import time

import optuna
import pytest
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.config import ModelConfig
from dmqn_core.data.prep import prepare
from dmqn_core.data.synth import write_log
from dmqn_core.errors import DmqnError
from dmqn_core.models.registry import build_model, model_names
from dmqn_core.runs.store import RunStore
from dmqn_core.training import tune as tune_module
from dmqn_core.training.bench import describe_budget, run_bench
from dmqn_core.training.search_spaces import DEFAULT_SPACES, FULL_SPACES, MAX_OWN, SHARED, suggest
from dmqn_core.training.train import TrainConfig
from dmqn_core.training.tune import show_study, tune
from dmqn_core.training.tune import study as tune_study
from dmqn_core.workspace import Workspace

# Tiny budgets: the search space's embedding sizes are fixed to 8, one epoch per trial.
MODEL = {"embed_dim": 8}
TRAIN = {"max_len": 60, "batch_size": 256}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """A workspace of its own (studies are written into it) with two prepared sets: 'tiny' and 'other'."""
    ws = Workspace(tmp_path_factory.mktemp("tune")).ensure()
    for name, seed in (("tiny", 3), ("other", 4)):
        log = ws.root / f"{name}.csv"
        write_log(log, "tiny", seed=seed)
        prepare(log, "taobao", name, workspace=ws, max_len=200, train_targets=5, seed=seed)
    return ws


def small(ws: Workspace, model: str, trials: int, **kwargs) -> tune_module.TuneResult:
    return tune(ws, "tiny", model, trials, epochs=1, model_settings=MODEL, train_settings=TRAIN, **kwargs)


def test_every_registered_model_has_a_search_space():
    assert set(DEFAULT_SPACES) == set(FULL_SPACES) == set(model_names())
    # The popularity scorer learns nothing: it is the only model without settings to search.
    assert [name for name, params in DEFAULT_SPACES.items() if not params] == ["pop"]


def test_the_default_spaces_search_equally_broadly():
    """Every model searches the shared settings and at most MAX_OWN of its own by default; DMQN's quantizer
    mechanics are searched only in the full space."""
    for name, params in DEFAULT_SPACES.items():
        own = [p.name for p in params if p not in SHARED]
        assert len(own) <= MAX_OWN and (not params or set(SHARED) <= set(params)), name
        assert set(params) <= set(FULL_SPACES[name]), name
    assert [p.name for p in DEFAULT_SPACES["dmqn"] if p not in SHARED] == [
        "codebook_size",
        "n_codebooks",
        "icim_layers",
    ]
    full_only = {p.name for p in FULL_SPACES["dmqn"]} - {p.name for p in DEFAULT_SPACES["dmqn"]}
    assert {"tau", "assign_noise", "straight_through", "codebook_init", "dead_codeword_reset"} <= full_only


def test_a_study_keeps_its_search_space(workspace):
    study = "space-test"
    small(workspace, "dmqn-simple", 1, study=study, search_space="full")
    with pytest.raises(DmqnError, match="searches the 'full' space, not 'default'"):
        small(workspace, "dmqn-simple", 2, study=study)
    rows = show_study(workspace, study).trials
    assert "tau" in rows[0].params  # the full space searched the temperature
    with pytest.raises(DmqnError, match="unknown search space 'wide'"):
        small(workspace, "dmqn-simple", 1, study="space-bad", search_space="wide")


def test_workers_share_a_study_and_run_exactly_its_trials(workspace):
    result = small(workspace, "din-short", 3, study="workers-test", workers=2)
    assert result.finished == 3 and len(result.trials) == 3
    study = optuna.load_study(study_name="workers-test", storage=tune_module.default_storage(workspace))
    processes = {trial.user_attrs["process"] for trial in study.trials}
    assert len(processes) == 2  # this process ran two trials, the other worker one
    store = RunStore(workspace.store_path)
    assert all(store.get_run(row.run_id).status == "finished" for row in result.trials)
    assert {store.get_run(row.run_id).params["train"]["seed"] for row in result.trials} == {0}
    with pytest.raises(DmqnError, match="workers must be in 1 .. 64, got 0"):
        small(workspace, "din-short", 3, study="workers-test", workers=0)


@pytest.mark.parametrize("model_name", [name for name in model_names() if name != "pop"])
def test_suggestions_build_valid_configs(model_name):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        model_settings, train_settings = suggest(study.ask(), model_name)
        assert model_settings and {"lr", "weight_decay"} <= set(train_settings)
        config = ModelConfig(n_items=50, n_categories=8, n_behavior_types=5, **model_settings)
        TrainConfig.from_dict(train_settings)
        build_model(model_name, config)


def test_fixed_settings_are_not_searched():
    study = optuna.create_study()
    trial = study.ask()
    model_settings, _ = suggest(trial, "dmqn", fixed={"embed_dim", "tau"})
    assert "embed_dim" not in model_settings and "tau" not in model_settings
    assert "embed_dim" not in trial.params and "codebook_size" in trial.params


def test_trials_are_runs_and_a_study_resumes(workspace):
    first = small(workspace, "din-full", 2)
    assert first.study == "tiny-din-full" and first.new_trials == 2 and first.finished == 2
    store = RunStore(workspace.store_path)
    runs = {r.run_id: r for r in store.list_runs(model="din-full")}
    assert {row.run_id for row in first.trials} == set(runs)
    for row in first.trials:
        run = runs[row.run_id]
        assert run.status == "finished" and run.best_valid_auc == pytest.approx(row.value)
        assert run.params["train"]["lr"] == pytest.approx(row.params["lr"])
        assert run.params["model"]["embed_dim"] == 8 and run.params["train"]["epochs"] == 1
    assert first.best_value == max(row.value for row in first.trials)
    assert first.best_train_settings["lr"] == runs[first.best_run_id].params["train"]["lr"]

    # --trials counts the study's finished trials: a study stopped at 2 of 3 runs one more.
    second = small(workspace, "din-full", 3)
    assert second.new_trials == 1 and second.finished == 3
    assert len(store.list_runs(model="din-full")) == 3
    # The resumed sampler does not draw the first trials' settings again.
    assert len({row.params["lr"] for row in second.trials}) == 3
    assert small(workspace, "din-full", 3).new_trials == 0
    assert show_study(workspace, "tiny-din-full").best_run_id == second.best_run_id


def test_a_timeout_starts_no_trial_after_it(workspace):
    result = small(workspace, "din-full", 3, study="timed", timeout=0.01)
    assert result.new_trials == 1 and result.finished == 1


def test_the_same_seed_suggests_the_same_settings(workspace):
    a = small(workspace, "sim", 1, study="seed-a", seed=7)
    b = small(workspace, "sim", 1, study="seed-b", seed=7)
    c = small(workspace, "sim", 1, study="seed-c", seed=8)
    assert a.trials[0].params == b.trials[0].params != c.trials[0].params


# study.ask() outside optimize() is how a test plays the killed process; Optuna warns about it.
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_of_a_killed_process_is_failed_and_not_counted(workspace, monkeypatch):
    monkeypatch.setattr(tune_study, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(tune_study, "GRACE_PERIOD", 1)
    storage = tune_study.open_storage(workspace, None)
    study = optuna.create_study(study_name="killed", storage=storage, direction="maximize")
    # What a process killed during its trial leaves behind: a running trial whose heartbeat stopped.
    stale = study.ask()
    storage.record_heartbeat(stale._trial_id)
    time.sleep(2.1)
    result = small(workspace, "din-short", 1, study="killed")
    assert [row.state for row in result.trials] == ["failed", "complete"] and result.new_trials == 1


def test_a_study_belongs_to_one_model_and_data_set(workspace):
    small(workspace, "din-middle", 1, study="owned")
    with pytest.raises(DmqnError, match="tunes model 'din-middle', not 'sim'"):
        small(workspace, "sim", 1, study="owned")
    with pytest.raises(DmqnError, match="made for data set 'tiny'"):
        tune(workspace, "other", "din-middle", 1, study="owned", epochs=1)


def cli(workspace: Workspace, *args: str):
    return CliRunner().invoke(app, [*args, "-w", str(workspace.root)], terminal_width=80)


def test_tune_command_tunes_and_shows(workspace, tmp_path):
    config = tmp_path / "small.toml"
    config.write_text("[model]\nembed_dim = 8\n[train]\nmax_len = 60\n")
    args = ("tune", "tiny", "--model", "dmqn", "--trials", "1", "--epochs", "1", "--config", str(config))
    result = cli(workspace, *args)
    assert result.exit_code == 0, result.output
    assert "study tiny-dmqn" in result.output and "best: trial 0" in result.output

    shown = cli(workspace, "tune", "--show", "tiny-dmqn")
    assert shown.exit_code == 0, shown.output
    # The caption naming the hidden columns wraps at 80 columns wherever its words fall.
    assert "trials" in shown.output and "--wide shows them" in " ".join(shown.output.split())
    assert max(len(line) for line in shown.output.splitlines()) <= 80

    fields = json.loads(cli(workspace, "tune", "--show", "tiny-dmqn", "--json").stdout)
    assert fields["model"] == "dmqn" and fields["finished_trials"] == 1
    (trial,) = fields["trials"]
    assert trial["run_id"] == fields["best_run_id"] and fields["best_model_settings"]["embed_dim"] == 8
    assert {"lr", "codebook_size", "n_codebooks"} <= set(trial["params"]) and "tau" not in trial["params"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tune", "tiny", "--model", "bogus"), "unknown model 'bogus'"),
        (("tune", "tiny", "--model", "pop"), "no settings to tune"),
        (("tune", "tiny", "--model", "sim", "--trials", "0"), "trials must be at least 1"),
        (("tune", "tiny", "--model", "sim", "--timeout", "0"), "timeout must be a positive number"),
        (("tune", "tiny"), "--model"),
        (("tune", "--show", "nope"), "no study 'nope'"),
        (("tune", "tiny", "--model", "sim", "--study", "owned", "--epochs", "1"), "tunes model 'din-middle'"),
        (("tune", "other", "--model", "din-middle", "--study", "owned"), "made for data set 'tiny'"),
    ],
)
def test_tune_command_rejects_bad_input(workspace, args, message):
    small(workspace, "din-middle", 1, study="owned")  # the study the last cases misuse (made once)
    result = cli(workspace, *args)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_bench_trains_tuned_models_with_their_best_settings(workspace):
    tuned = small(workspace, "din-short", 1, study="for-bench")
    best = tuned.trials[0].params
    train_settings = {"epochs": 1, **TRAIN}
    report = run_bench(workspace, "tiny", ["pop", "din-short"], [0], MODEL, train_settings, tuned=["for-bench"])
    assert report.budget["tuned"]["din-short"]["study"] == "for-bench" and "for-bench" in describe_budget(
        report.budget, [0]
    )
    store = RunStore(workspace.store_path)
    (row,) = [r for r in report.rows if r.model == "din-short"]
    params = store.get_run(row.run_ids[0]).params
    # The searched settings; embed_dim was fixed in the study, so the bench's stays.
    assert params["model"]["short_len"] == best["short_len"] and params["model"]["dropout"] == best["dropout"]
    assert "embed_dim" not in best and params["model"]["embed_dim"] == 8
    assert params["train"]["lr"] == best["lr"] and params["train"]["epochs"] == 1
    # The untuned model keeps the bench's settings.
    (pop,) = [r for r in report.rows if r.model == "pop"]
    assert store.get_run(pop.run_ids[0]).params["model"]["embed_dim"] == 8
    # A tuned bench is another budget: its default name differs from the untuned bench's.
    assert report.name != run_bench(workspace, "tiny", ["pop"], [0], MODEL, train_settings).name


def test_a_bench_refuses_studies_it_cannot_use(workspace):
    small(workspace, "din-middle", 1, study="owned")
    with pytest.raises(DmqnError, match="no study of --tuned tunes a model the bench trains"):
        run_bench(workspace, "tiny", ["pop"], [0], MODEL, TRAIN, tuned=["owned"])
    with pytest.raises(DmqnError, match="another data set"):
        run_bench(workspace, "other", ["din-middle"], [0], MODEL, TRAIN, tuned=["owned"])
    result = cli(workspace, "bench", "tiny", "--models", "din-middle", "--seeds", "1", "--tuned", "owned,nope")
    assert result.exit_code == 1 and "no study 'nope'" in result.output


def test_disjoint_model_lists_of_one_tuned_bench_share_its_runs(workspace):
    # Two processes may split a tuned bench by --models under one name; the budget names every study,
    # so a third command with all the models reuses both halves instead of training them again.
    small(workspace, "din-short", 1, study="half-a")
    small(workspace, "din-middle", 1, study="half-b")
    studies = ["half-a", "half-b"]
    first = run_bench(workspace, "tiny", ["din-short"], [0], MODEL, TRAIN, name="split", tuned=studies)
    second = run_bench(workspace, "tiny", ["din-middle"], [0], MODEL, TRAIN, name="split", tuned=studies)
    whole = run_bench(workspace, "tiny", ["din-short", "din-middle"], [0], MODEL, TRAIN, name="split", tuned=studies)
    assert (first.trained, second.trained, whole.trained, whole.reused) == (1, 1, 0, 2)
    runs = {row.model: row.run_ids[0] for row in whole.rows}
    assert runs == {"din-short": first.rows[0].run_ids[0], "din-middle": second.rows[0].run_ids[0]}
    # Each half trained its own model with its own study's settings.
    store = RunStore(workspace.store_path)
    best = show_study(workspace, "half-b").best_model_settings
    assert store.get_run(runs["din-middle"]).params["model"]["middle_len"] == best["middle_len"]


@pytest.mark.parametrize(
    "storage",
    [
        "postgresql://tuner:s3cr3t-pw@127.0.0.1:1/studies",  # no driver installed, or nothing listening
        "sqlite:////nonexistent-dir/s3cr3t-pw/studies.db",  # not a password: a path is shown as given
    ],
)
def test_a_study_storage_password_is_never_shown(workspace, storage):
    result = cli(workspace, "tune", "--show", "any", "--storage", storage)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    if storage.startswith("postgresql"):
        assert "s3cr3t-pw" not in result.output and "tuner:***@127.0.0.1" in result.output


def test_the_pruner_never_judges_a_first_epoch_nor_the_first_two_trials():
    study = optuna.create_study(direction="maximize", pruner=tune_module.epoch_pruner())
    for _ in range(2):  # two earlier trials that did well at every epoch
        good = study.ask()
        for epoch in (1, 2, 3):
            good.report(0.9, epoch)
        study.tell(good, 0.9)
    poor = study.ask()
    poor.report(0.5, 1)
    assert not poor.should_prune()  # far below the median, but at its first epoch
    poor.report(0.5, 2)
    assert poor.should_prune()
    # With one earlier trial only, nothing is pruned even at a later epoch.
    early = optuna.create_study(direction="maximize", pruner=tune_module.epoch_pruner())
    first = early.ask()
    first.report(0.9, 2)
    early.tell(first, 0.9)
    second = early.ask()
    second.report(0.5, 2)
    assert not second.should_prune()


def test_a_pruned_trial_stops_its_run_at_that_epoch_and_counts(workspace, monkeypatch):
    # The median pruner's verdict is replaced by a fixed one, so that the test does not depend on
    # which AUCs the trials happen to reach: trial 1 is pruned after its second epoch.
    def verdict(trial: optuna.Trial) -> bool:
        return trial.number == 1 and bool(trial.storage.get_trial(trial._trial_id).intermediate_values.get(2))

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", verdict)
    result = tune(
        workspace,
        "tiny",
        "din-short",
        2,
        study="pruned",
        epochs=4,
        model_settings=MODEL,
        train_settings={**TRAIN, "patience": 4},
    )
    states = {row.number: row.state for row in result.trials}
    assert states == {0: "complete", 1: "pruned"} and result.finished == 2
    store = RunStore(workspace.store_path)
    epochs = {row.number: store.get_run(row.run_id).epochs_done for row in result.trials}
    assert epochs == {0: 4, 1: 2}
    assert store.get_run(result.trials[1].run_id).status == "finished"
