import duckdb
import numpy as np
import pytest

from dmqn_core.errors import DmqnError
from dmqn_core.runs.store import INSPECTION_COLUMNS, SCHEMA, SCHEMA_VERSION, RunStore
from dmqn_core.workspace import exclusive_lock


def make_run(store: RunStore, model: str = "dmqn", dataset: str = "d") -> str:
    return store.create_run(
        model=model,
        dataset=dataset,
        dataset_path="/x/" + dataset,
        params={"model": {"embed_dim": 8}, "train": {"seed": 1}},
        seed=1,
        n_parameters=10,
    )


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
    assert (
        con.execute("SELECT sum(count) FROM codeword_counts WHERE run_id = ? AND codebook = 1", [run]).fetchone()[0]
        == 4
    )
    con.close()


def test_latest_run_and_unknown_run(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    with pytest.raises(DmqnError, match="no runs"):
        store.resolve_run_id(None)
    first = make_run(store)
    with pytest.raises(DmqnError, match="no finished run .* yet; name a run"):
        store.resolve_run_id(None)
    store.finish_run(first, "finished")
    second = make_run(store, model="pop")  # newer, but not finished
    assert store.resolve_run_id(None) == first
    assert store.resolve_run_id(None, finished_only=False) == second
    assert store.resolve_run_id(second) == second  # a named run of any status
    with pytest.raises(DmqnError, match="unknown run"):
        store.get_run("nope")
    assert [r.run_id for r in store.list_runs(model="pop")] == [second]


def test_a_running_run_reads_dead_while_no_process_holds_its_lock(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    run = make_run(store)
    assert store.get_run(run).status == "dead"  # no process ever took its lock
    with exclusive_lock(store.lock_path(run), f"run {run}"):  # as the training process does
        assert store.get_run(run).status == "running"
        assert [r.status for r in store.list_runs()] == ["running"]
    assert [r.status for r in store.list_runs()] == ["dead"]
    store.finish_run(run, "interrupted")  # only "running" is ever read otherwise
    assert store.get_run(run).status == "interrupted"


def test_delete_epochs_after_checkpoint(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    run = make_run(store)
    for epoch in (1, 2, 3):
        store.log_metrics(run, "valid", {"auc": epoch / 10}, epoch=epoch)
        store.log_quantizer_stats(run, epoch, [(0.5, 1.0)], [0.1])
    store.delete_epochs_after(run, 2)
    assert sorted(e for e, *_ in store.metric_history(run)) == [1, 2]
    assert [e for e, *_ in store.quantizer_stats(run)] == [1, 2] and [e for e, *_ in store.icim_stats(run)] == [1, 2]


def test_update_rejects_unknown_columns(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    run = make_run(store)
    with pytest.raises(ValueError):
        store.update_run(run, **{"status = 'x'; --": 1})


def test_reading_a_missing_store_is_empty(tmp_path):
    store = RunStore(tmp_path / "absent.duckdb")
    assert store.list_runs() == []
    assert not store.path.exists()


def test_a_version_2_store_is_read_and_upgraded_by_its_next_write(tmp_path):
    path = tmp_path / "runs.duckdb"
    con = duckdb.connect(str(path))
    for sql in SCHEMA:
        if not any(f"EXISTS {table} " in sql for table in INSPECTION_COLUMNS):
            con.execute(sql)
    con.execute("INSERT INTO schema_info VALUES (2)")
    con.close()
    store = RunStore(path)
    assert store.inspected_users("r") == [] and store.inspected_user("r", 1) is None
    assert store.codebook_vectors("r") == [] and store.item_vectors("r") == []
    make_run(store)
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT version FROM schema_info").fetchall() == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 4
    tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    con.close()
    assert set(INSPECTION_COLUMNS) <= tables


def test_a_version_3_store_is_read_and_gets_the_quantizer_tables_with_its_next_write(tmp_path):
    path = tmp_path / "runs.duckdb"
    con = duckdb.connect(str(path))
    for sql in SCHEMA:
        if "EXISTS quantizer_stats " not in sql and "EXISTS icim_stats " not in sql:
            con.execute(sql)
    con.execute("INSERT INTO schema_info VALUES (3)")
    con.close()
    store = RunStore(path)
    assert store.quantizer_stats("r") == [] and store.icim_stats("r") == []
    run = make_run(store)
    store.log_quantizer_stats(run, 1, [(0.25, 0.5), (1.0, 2.0)], [0.125, float("nan")])
    assert store.quantizer_stats(run) == [(1, 0, 0.25, 0.5), (1, 1, 1.0, 2.0)]
    assert store.icim_stats(run) == [(1, 0, 0.125), (1, 1, None)]  # NaN (no non-empty cluster) is NULL
    store.log_quantizer_stats(run, 2, [(0.5, 1.0), (0.75, 1.5)], [])  # dmqn-simple: no ICIM layer
    assert len(store.quantizer_stats(run)) == 4 and len(store.icim_stats(run)) == 2
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT version FROM schema_info").fetchall() == [(4,)]
    con.close()


def test_inspection_rows_round_trip_and_replace(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    run = make_run(store)
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    rows = {
        "inspect_users": {"user_id": [7], "history_length": [2], "candidates": [1]},
        "inspect_behaviors": {
            "user_id": [7] * 2,
            "position": [0, 1],
            "codebook": [0, 0],
            "codeword": [3, 1],
            "timestamp": [100, 200],
            "item": [11, 12],
            "category": [5, 5],
            "behavior": np.array(["pv", "buy"]),
        },
        "inspect_candidates": {
            "user_id": [7],
            "candidate": [0],
            "item": [13],
            "category": [5],
            "label": [1],
            "score": [0.25],
        },
        "inspect_attention": {
            "user_id": [7, 7],
            "candidate": [0, 0],
            "codebook": [0, 0],
            "codeword": [1, 3],
            "weight": [0.5, 0.5],
        },
        "codebook_vectors": {"codebook": [0, 0], "codeword": [0, 1], "vector": vectors},
    }
    store.log_inspection(run, rows)
    store.log_inspection(run, rows, replace=True)  # a resumed run writes its sample again
    assert store.inspected_users(run) == [(7, 2, 1)]
    behaviors, candidates, attention = store.inspected_user(run, 7)
    assert behaviors == [(0, 0, 3, 100, 11, 5, "pv"), (1, 0, 1, 200, 12, 5, "buy")]
    assert candidates == [(0, 13, 5, 1, 0.25)] and attention == [(0, 0, 1, 0.5), (0, 0, 3, 0.5)]
    assert [(b, w, list(v)) for b, w, v in store.codebook_vectors(run)] == [
        (0, 0, [0.0, 0.25, 0.5]),
        (0, 1, [0.75, 1.0, 1.25]),
    ]
    assert store.inspected_user(run, 8) is None
    with pytest.raises(ValueError):
        store.log_inspection(run, {"runs": {}})
    with pytest.raises(ValueError):
        store.log_inspection(run, {"inspect_users": {"user_id": [1]}})


def test_a_bench_started_by_two_processes_at_once_is_recorded_once(tmp_path, monkeypatch):
    first, second = RunStore(tmp_path / "runs.duckdb"), RunStore(tmp_path / "runs.duckdb")
    settings = {"train": {"epochs": 2}, "model": {}}
    # The second process read "no such bench" before the first one wrote it.
    reads = iter([[]])
    real_read = second._read

    def read(*args, **kwargs):
        return next(reads) if reads.__length_hint__() else real_read(*args, **kwargs)

    monkeypatch.setattr(second, "_read", read)
    first.register_bench("b", "set", settings)
    second.register_bench("b", "set", settings)
    assert first._read("SELECT count(*) FROM benches", None, "benches") == [(1,)]

    reads = iter([[]])
    with pytest.raises(DmqnError, match="already exists with other settings"):
        second.register_bench("b", "set", {"train": {"epochs": 3}, "model": {}})
