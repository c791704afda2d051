import duckdb
import pytest

from dmqn_core.errors import DmqnError
from dmqn_core.runstore import RunStore


def make_run(store: RunStore, model: str = "dmqn", dataset: str = "d") -> str:
    return store.create_run(model=model, dataset=dataset, dataset_path="/x/" + dataset,
                            params={"model": {"embed_dim": 8}, "train": {"seed": 1}}, seed=1, n_parameters=10)


def test_create_update_finish_and_read_back(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    run = make_run(store)
    store.log_metrics(run, "valid", {"auc": 0.7, "logloss": 0.6}, epoch=1)
    store.log_codebook_usage(run, 1, [[3, 0, 1], [2, 2, 0]], [(2, 1, 1.8), (2, 1, 2.0)])
    store.finish_run(run, "finished", test_auc=0.71, best_epoch=1, best_valid_auc=0.7)
    record = store.get_run(run)
    assert record.status == "finished" and record.test_auc == 0.71 and record.params["model"]["embed_dim"] == 8
    assert record.finished_at is not None
    assert set(store.metric_history(run)) == {(1, "valid", "auc", 0.7), (1, "valid", "logloss", 0.6)}
    assert store.codebook_usage(run) == [(1, 0, 2, 1, 1.8), (1, 1, 2, 1, 2.0)]
    # Plain SQL on the file answers questions about codewords.
    con = duckdb.connect(str(store.path), read_only=True)
    assert con.execute("SELECT sum(count) FROM codeword_counts WHERE run_id = ? AND codebook = 1", [run]).fetchone()[0] == 4
    con.close()


def test_latest_run_and_unknown_run(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    with pytest.raises(DmqnError, match="no runs"):
        store.resolve_run_id(None)
    first = make_run(store)
    second = make_run(store, model="pop")
    assert store.resolve_run_id(None) == second
    assert store.resolve_run_id(first) == first
    with pytest.raises(DmqnError, match="unknown run"):
        store.get_run("nope")
    assert [r.run_id for r in store.list_runs(model="pop")] == [second]


def test_delete_epochs_after_checkpoint(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    run = make_run(store)
    for epoch in (1, 2, 3):
        store.log_metrics(run, "valid", {"auc": epoch / 10}, epoch=epoch)
    store.delete_epochs_after(run, 2)
    assert sorted(e for e, *_ in store.metric_history(run)) == [1, 2]


def test_update_rejects_unknown_columns(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    run = make_run(store)
    with pytest.raises(ValueError):
        store.update_run(run, **{"status = 'x'; --": 1})


def test_reading_a_missing_store_is_empty(tmp_path):
    store = RunStore(tmp_path / "absent.duckdb")
    assert store.list_runs() == []
    assert not store.path.exists()
