"""The Run handle (dmqn_core.runs.run): the record read once, the run folder's files, the vocabularies
kept with the run so that `dmqn score` and CachedScorer serve without the prepared set."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import tiny_set_workspace
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.config import ModelConfig
from dmqn_core.data.prep import prepare
from dmqn_core.data.prepared import VOCAB_ARRAYS, PreparedSet
from dmqn_core.data.synth import write_log
from dmqn_core.errors import DmqnError
from dmqn_core.runs.inspection import RunInspector
from dmqn_core.runs.run import Run, Vocabulary
from dmqn_core.runs.store import RunStore
from dmqn_core.serving.cache import CachedScorer, export_states
from dmqn_core.training.evaluate import evaluate_run
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace

MODEL = {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8, "mlp_hidden": [16]}
TRAIN = {"epochs": 1, "max_len": 60, "batch_size": 256, "seed": 4, "inspect_users": 4}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Workspace, str, str]:
    """A workspace of this module's own (its tests move the prepared set away) with a dmqn run whose
    states are exported, and a pop run. Tests that move or replace the set put it back."""
    ws = tiny_set_workspace(tmp_path_factory.mktemp("run"))
    dmqn = train(ws, "tiny", "dmqn", MODEL, TRAIN).run_id
    pop = train(ws, "tiny", "pop", train_settings={"seed": 0}).run_id
    export_states(ws, dmqn)
    return ws, dmqn, pop


@contextmanager
def set_moved_away(ws: Workspace) -> Iterator[None]:
    """The prepared set 'tiny' is elsewhere meanwhile, as on a serving machine that never had it."""
    here, away = ws.dataset_path("tiny"), ws.root / "elsewhere"
    os.replace(here, away)
    try:
        yield
    finally:
        os.replace(away, here)


def score_command(ws: Workspace, run_id: str, user: int, items: list[int]) -> list[float]:
    result = CliRunner().invoke(
        app, ["score", run_id, "--user", str(user), "--items", ",".join(map(str, items)), "--json", "-w", str(ws.root)]
    )
    assert result.exit_code == 0, result.output
    return [entry["probability"] for entry in json.loads(result.stdout)["scores"]]


def test_open_reads_the_record_and_names_the_run_folders_files(served):
    ws, dmqn, pop = served
    run = Run.open(ws, dmqn)
    record = RunStore(ws.store_path).get_run(dmqn)
    assert run.run_id == dmqn and run.record == record and run.model_name == "dmqn"
    assert run.config == ModelConfig.from_dict(record.params["model"]) and run.config.n_codebooks == 2
    assert run.train_settings == record.params["train"] and run.max_len == TRAIN["max_len"]
    assert run.directory == ws.run_dir(dmqn)
    assert run.best_path == run.directory / "best.pt" and run.checkpoint_path == run.directory / "checkpoint.pt"
    assert run.has_weights and run.has_codebooks
    assert not Run.open(ws, pop).has_codebooks
    assert Run.open(ws).run_id == pop  # the latest finished run
    with pytest.raises(DmqnError, match="unknown run 'no-such-run'"):
        Run.open(ws, "no-such-run")
    with pytest.raises(DmqnError, match="no runs in"):
        Run.open(Workspace(ws.root / "empty"))


def test_the_latest_run_of_any_status_and_a_run_without_weights(served):
    ws, dmqn, _ = served
    store = RunStore(ws.store_path)
    record = store.get_run(dmqn)
    newer = store.create_run(
        model="dmqn", dataset="tiny", dataset_path=record.dataset_path, params=record.params, seed=0, n_parameters=0
    )  # as a run whose process died before its first epoch
    try:
        assert Run.open(ws).run_id != newer
        run = Run.open(ws, finished_only=False)
        assert run.run_id == newer and run.record.status == "dead" and not run.has_weights
        with pytest.raises(DmqnError, match=f"run {newer} has no trained weights yet"):
            run.model()
    finally:
        store.update_run(newer, status="failed")  # no longer "the latest run" of other tests' interest


def test_training_keeps_the_sets_vocabularies_in_the_run_folder(served):
    ws, dmqn, pop = served
    for run_id in (dmqn, pop):
        folder, prepared = ws.run_dir(run_id) / "vocab", ws.dataset_path("tiny") / "vocab"
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}.npy" for name in VOCAB_ARRAYS)
        for name in VOCAB_ARRAYS:
            assert (folder / f"{name}.npy").read_bytes() == (prepared / f"{name}.npy").read_bytes()
        assert not [p for p in ws.run_dir(run_id).iterdir() if p.name.startswith(".vocab")]  # no temporary left
    run, data = Run.open(ws, dmqn), PreparedSet.open(ws.dataset_path("tiny"))
    vocabulary = run.vocabulary
    assert isinstance(vocabulary, Vocabulary)
    raw_items = data.raw_item(np.arange(1, data.n_items + 1))
    assert np.array_equal(vocabulary.item_index(raw_items), np.arange(1, data.n_items + 1))
    assert np.array_equal(vocabulary.item_index([10**12, int(raw_items[0])]), [0, 1])
    with pytest.raises(DmqnError, match="unknown item"):
        vocabulary.item_index([10**12], strict=True)
    users = np.arange(1, data.n_users + 1)
    assert np.array_equal(vocabulary.raw_user(users), data.raw_user(users))
    assert np.array_equal(vocabulary.user_index(data.raw_user(users)), users)
    assert np.array_equal(vocabulary.item_category, data.item_category)
    assert np.array_equal(vocabulary.item_popularity, data.item_popularity)
    assert (vocabulary.n_users, vocabulary.n_items) == (data.n_users, data.n_items)


def test_score_and_the_cached_scorer_need_no_prepared_set(served):
    ws, dmqn, _ = served
    data = Run.open(ws, dmqn).data
    user = int(data.raw_user(3))
    items = data.raw_item(np.arange(1, 6)).tolist()
    with CachedScorer(ws, dmqn) as scorer:
        before = scorer.score(user, items)
    command_before = score_command(ws, dmqn, user, items)

    with set_moved_away(ws):
        with CachedScorer(ws, dmqn) as scorer:
            assert np.array_equal(scorer.score(user, items), before)
            with pytest.raises(DmqnError, match="unknown item"):
                scorer.score(user, [10**12])
        assert score_command(ws, dmqn, user, items) == command_before
        # What encodes histories or evaluates needs the set, and says so.
        with pytest.raises(DmqnError, match="no prepared set"):
            export_states(ws, dmqn, users=[user])
        with pytest.raises(DmqnError, match="no prepared set"):
            evaluate_run(ws, dmqn)
    np.testing.assert_allclose(before, command_before, atol=1e-6)


def test_a_set_prepared_again_differently_is_refused_where_the_data_is_used(served):
    ws, dmqn, _ = served
    run = Run.open(ws, dmqn)
    user = int(run.data.raw_user(3))
    items = run.data.raw_item(np.arange(1, 4)).tolist()
    with CachedScorer(ws, dmqn) as scorer:
        before = scorer.score(user, items)
    original, kept = ws.dataset_path("tiny"), ws.root / "tiny-as-trained"
    os.replace(original, kept)
    try:
        other = ws.root / "other.csv"
        write_log(other, "tiny", seed=8)
        prepare(other, "taobao", "tiny", workspace=ws, max_len=200, train_targets=5, seed=4)
        # Scoring reads the run's own vocabularies: the ids mean what they meant in training.
        with CachedScorer(ws, dmqn) as scorer:
            assert np.array_equal(scorer.score(user, items), before)
        not_the_one = f"not the one run {dmqn} was trained on"
        with pytest.raises(DmqnError, match=not_the_one):
            _ = Run.open(ws, dmqn).data
        with pytest.raises(DmqnError, match=not_the_one):
            export_states(ws, dmqn, users=[user])
        with pytest.raises(DmqnError, match=not_the_one):
            evaluate_run(ws, dmqn)
        inspector = RunInspector(ws, dmqn)
        outside = next(u for u in run.vocabulary.raw_user(np.arange(1, 50)) if u not in inspector.sampled_users())
        with pytest.raises(DmqnError, match=not_the_one):
            inspector.user(int(outside))
    finally:
        shutil.rmtree(original)
        os.replace(kept, original)


def test_a_run_trained_before_the_run_folder_kept_vocabularies_reads_the_prepared_set(served):
    ws, dmqn, _ = served
    folder, aside = ws.run_dir(dmqn) / "vocab", ws.root / "vocab-aside"
    data = Run.open(ws, dmqn).data
    user, items = int(data.raw_user(2)), data.raw_item(np.arange(1, 4)).tolist()
    with CachedScorer(ws, dmqn) as scorer:
        before = scorer.score(user, items)
    os.replace(folder, aside)
    try:
        assert isinstance(Run.open(ws, dmqn).vocabulary, PreparedSet)
        with CachedScorer(ws, dmqn) as scorer:
            assert np.array_equal(scorer.score(user, items), before)
        with set_moved_away(ws), pytest.raises(DmqnError, match="no prepared set"):
            CachedScorer(ws, dmqn)
    finally:
        os.replace(aside, folder)


def test_models_build_from_the_run_folder_alone(served):
    ws, dmqn, pop = served
    with set_moved_away(ws):
        for run_id in (dmqn, pop):
            model = Run.open(ws, run_id).model()
            assert not model.training
    run = Run.open(ws, pop)
    assert run.model() is run.model()  # built once
    with pytest.raises(DmqnError, match="only dmqn and dmqn-simple have a cacheable user state"):
        CachedScorer(ws, pop)


def test_a_damaged_vocabulary_is_one_error(served):
    ws, dmqn, _ = served
    path = ws.run_dir(dmqn) / "vocab" / "item.npy"
    original = path.read_bytes()
    try:
        path.write_bytes(b"not an array")
        with pytest.raises(DmqnError, match="item.npy is missing or damaged"):
            _ = Run.open(ws, dmqn).vocabulary
        np.save(path, np.arange(3, dtype=np.int64))  # readable, but not as long as item_category
        with pytest.raises(DmqnError, match="do not match one another"):
            CachedScorer(ws, dmqn)
    finally:
        path.write_bytes(original)
