"""What a DMQN run records for inspection, and RunInspector reading it back (dmqn_core.runs.inspection)."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.data.batches import BatchLoader, gather_histories
from dmqn_core.errors import DmqnError
from dmqn_core.runs.inspection import (
    MAX_ITEM_VECTORS,
    RunInspector,
    candidate_histories,
    compute_inspections,
    dmqn_runs,
    user_worth_inspecting,
)
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RunStore
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace

N, W = 2, 8
MODEL = {"embed_dim": 8, "n_codebooks": N, "codebook_size": W, "mlp_hidden": [16]}
TRAIN = {"epochs": 1, "max_len": 60, "batch_size": 256, "seed": 4}
SAMPLE = 12
TABLES = (
    "inspect_users",
    "inspect_behaviors",
    "inspect_candidates",
    "inspect_attention",
    "codebook_vectors",
    "item_vectors",
)


@pytest.fixture(scope="module")
def run_id(tiny_workspace) -> str:
    return train(tiny_workspace, "tiny", "dmqn", MODEL, {**TRAIN, "inspect_users": SAMPLE}).run_id


def sql(ws: Workspace, query: str, params: list) -> list[tuple]:
    con = duckdb.connect(str(ws.store_path), read_only=True)
    try:
        return con.execute(query, params).fetchall()
    finally:
        con.close()


def row_counts(ws: Workspace, run: str) -> dict[str, int]:
    # Table names come from the constant above.
    return {table: sql(ws, f"SELECT count(*) FROM {table} WHERE run_id = ?", [run])[0][0] for table in TABLES}


def test_training_records_the_sample_with_the_predicted_row_counts(tiny_workspace, run_id):
    ws = tiny_workspace
    run = Run.open(ws, run_id)
    record, data = run.record, run.data
    users = sql(
        ws, "SELECT user_id, history_length, candidates FROM inspect_users WHERE run_id = ? ORDER BY user_id", [run_id]
    )
    assert len(users) == SAMPLE == len({u for u, _, _ in users})
    test = data.split("test")
    for user, length, candidates in users:
        index = int(data.user_index([user])[0])
        # The history of the user's test samples, cut to max_len.
        end = int(np.asarray(test.hist_end)[np.asarray(test.user) == index].max())
        assert length == min(TRAIN["max_len"], end - int(data.user_offsets[index - 1]))
        assert candidates == int((np.asarray(test.user) == index).sum())
        assert (
            sql(ws, "SELECT count(*) FROM inspect_behaviors WHERE run_id = ? AND user_id = ?", [run_id, user])[0][0]
            == length * N
        )
        assert (
            sql(ws, "SELECT count(*) FROM inspect_candidates WHERE run_id = ? AND user_id = ?", [run_id, user])[0][0]
            == candidates
        )
        # One attention row per candidate and non-empty cluster.
        clusters = sql(
            ws,
            "SELECT count(DISTINCT (codebook, codeword)) FROM inspect_behaviors WHERE run_id = ? AND user_id = ?",
            [run_id, user],
        )[0][0]
        assert (
            sql(ws, "SELECT count(*) FROM inspect_attention WHERE run_id = ? AND user_id = ?", [run_id, user])[0][0]
            == candidates * clusters
        )
    counts = row_counts(ws, run_id)
    assert counts["codebook_vectors"] == N * W
    assert counts["item_vectors"] == min(MAX_ITEM_VECTORS, data.n_items)
    assert record.params["train"]["inspect_users"] == SAMPLE


def test_attention_sums_to_one_over_the_clusters_and_is_zero_at_empty_ones(tiny_workspace, run_id):
    inspector = RunInspector(tiny_workspace, run_id)
    for user in inspector.sampled_users():
        u = inspector.user(user)
        assert u.recorded and u.codeword.shape == (N, len(u.item)) and u.attention.shape == (len(u.label), N, W)
        assert len(u.item) > 0 and len(u.label) > 0
        np.testing.assert_allclose(u.attention.sum(axis=-1), 1.0, atol=1e-5)
        for n in range(N):
            empty = np.bincount(u.codeword[n], minlength=W) == 0
            assert (u.attention[:, n, empty] == 0).all()
        assert ((u.score > 0) & (u.score < 1)).all() and set(u.label.tolist()) <= {0, 1}


def test_recorded_users_equal_the_on_demand_computation(tiny_workspace, run_id):
    inspector = RunInspector(tiny_workspace, run_id)
    run = Run.open(tiny_workspace, run_id)
    model, data = run.model(), run.data
    sampled = inspector.sampled_users()
    fresh = compute_inspections(model, data, run_id, data.user_index(sampled), run.max_len)
    for user, computed in zip(sampled, fresh):
        stored = inspector.user(user)
        assert stored.recorded and not computed.recorded and computed.user_id == user
        for name in (
            "timestamp",
            "item",
            "category",
            "behavior",
            "codeword",
            "candidate_item",
            "candidate_category",
            "label",
        ):
            assert np.array_equal(getattr(stored, name), getattr(computed, name)), name
        np.testing.assert_allclose(stored.score, computed.score, rtol=1e-6)
        np.testing.assert_allclose(stored.attention, computed.attention, rtol=1e-6, atol=1e-7)
        assert stored.clusters(1) == computed.clusters(1)


def test_codeword_categories_sum_the_sampled_users_clusters(tiny_workspace, run_id):
    """The one-query aggregate the report uses equals the per-user clusters' category counts, summed."""
    from collections import Counter

    inspector = RunInspector(tiny_workspace, run_id)
    expected = Counter()
    for user_id in inspector.sampled_users():
        user = inspector.user(user_id)
        for n in range(user.n_codebooks):
            expected.update(zip([n] * len(user.category), user.codeword[n].tolist(), user.category.tolist()))
    rows = inspector.store.codeword_categories(run_id)
    assert {(n, w, c): k for n, w, c, k in rows} == dict(expected)
    assert sum(k for *_, k in rows) == sum(len(inspector.user(u).category) for u in inspector.sampled_users()) * N


def test_scores_are_the_test_predictions(tiny_workspace, run_id):
    """The inspected history is the one the test samples were scored with."""
    inspector = RunInspector(tiny_workspace, run_id)
    run = Run.open(tiny_workspace, run_id)
    model, data = run.model(), run.data
    loader = BatchLoader(data, "test", 1024, run.max_len, popularity=model.config.match_features)
    probability = np.zeros(len(data.split("test")))
    with torch.no_grad():
        for batch in loader:
            probability[batch.sample] = torch.sigmoid(model(**batch.model_inputs())).numpy()
    sampled = inspector.sampled_users()
    histories = candidate_histories(data, data.user_index(sampled))
    for user, index in zip(sampled, data.user_index(sampled).tolist()):
        _, samples = histories[index]
        np.testing.assert_allclose(inspector.user(user).score, probability[samples], atol=1e-5)


def test_on_demand_user_outside_the_sample(tiny_workspace, run_id):
    inspector = RunInspector(tiny_workspace, run_id)
    data = Run.open(tiny_workspace, run_id).data
    outside = sorted(set(data.raw_user(np.arange(1, data.n_users + 1)).tolist()) - set(inspector.sampled_users()))[0]
    u = inspector.user(outside)
    assert not u.recorded and u.user_id == outside and u.codeword.shape[0] == N
    clusters = u.clusters(0)
    assert sum(c.size for c in clusters) == len(u.item)
    assert [c.size for c in clusters] == sorted((c.size for c in clusters), reverse=True)
    assert all(len(c.top_categories) <= 3 and c.first_timestamp <= c.last_timestamp for c in clusters)
    with pytest.raises(DmqnError, match="unknown user"):
        inspector.user(-12345)


def test_codebooks_are_folded_into_the_behavior_space(tiny_workspace, run_id):
    """A behavior's codeword is the argmax of its embedding against the recorded codebook vectors."""
    inspector = RunInspector(tiny_workspace, run_id)
    codebooks = inspector.codebooks()
    assert codebooks.shape == (N, W, inspector.embed_dim) and codebooks.dtype == np.float32
    run = Run.open(tiny_workspace, run_id)
    model, data = run.model(), run.data
    user = inspector.sampled_users()[0]
    index = data.user_index([user])
    end, _ = candidate_histories(data, index)[int(index[0])]
    histories = gather_histories(data, index, np.array([end]), run.max_len)
    item, category, behavior, timestamp, mask = (torch.from_numpy(a) for a in histories)
    with torch.no_grad():  # what MCQM quantizes: the time-gap embedding included (behavior_time)
        e = model.behaviors(item, category, behavior, mask, timestamp)[0].numpy()
    mask = mask.numpy()
    assigned = np.einsum("ld,nwd->nlw", e[mask[0]], codebooks).argmax(axis=-1)
    assert np.array_equal(assigned, inspector.user(user).codeword)
    items, categories, vectors = inspector.item_embeddings()
    assert vectors.shape == (len(items), inspector.embed_dim) and len(categories) == len(items)
    assert np.array_equal(categories, data.raw_category(data.item_category[data.item_index(items)]))


def test_utilisation_answers_the_documented_sql(tiny_workspace, run_id):
    """docs/run-store.md: how many validation behaviors went to codeword w of codebook n at epoch e."""
    inspector = RunInspector(tiny_workspace, run_id)
    counts = inspector.utilisation()  # the best epoch, 1
    assert counts.shape == (N, W) and (counts.sum(axis=1) == counts.sum(axis=1)[0]).all() and counts.sum() > 0
    n, w = np.unravel_index(counts.argmax(), counts.shape)
    answer = sql(
        tiny_workspace,
        "SELECT count FROM codeword_counts WHERE run_id = ? AND epoch = ? AND codebook = ? AND codeword = ?",
        [run_id, 1, int(n), int(w)],
    )
    assert answer == [(counts[n, w],)]
    assert np.array_equal(inspector.utilisation(1), counts)
    with pytest.raises(DmqnError, match="no codeword counts"):
        inspector.utilisation(99)
    assert [row[:2] for row in inspector.store.codebook_usage(run_id)] == [(1, 0), (1, 1)]
    # Cluster sizes of a sampled user, by plain SQL.
    user = inspector.sampled_users()[0]
    sizes = sql(
        tiny_workspace,
        "SELECT codeword, count(*) FROM inspect_behaviors WHERE run_id = ? AND user_id = ? "
        "AND codebook = 0 GROUP BY codeword ORDER BY count(*) DESC, codeword",
        [run_id, user],
    )
    assert sizes == [(c.codeword, c.size) for c in inspector.user(user).clusters(0)]


def test_resumed_run_records_its_sample_again_without_duplicates(tiny_workspace, run_id):
    before = row_counts(tiny_workspace, run_id)
    store = RunStore(tiny_workspace.store_path)
    store.update_run(run_id, status="interrupted")  # as if killed while recording
    train(tiny_workspace, resume=run_id)
    assert store.get_run(run_id).status == "finished"
    assert row_counts(tiny_workspace, run_id) == before


def test_zero_inspect_users_records_nothing(tiny_workspace):
    run = train(tiny_workspace, "tiny", "dmqn-simple", MODEL, {**TRAIN, "inspect_users": 0}).run_id
    assert set(row_counts(tiny_workspace, run).values()) == {0}
    inspector = RunInspector(tiny_workspace, run)
    assert inspector.sampled_users() == [] and inspector.model == "dmqn-simple"
    # What was not recorded comes from the checkpoint.
    assert inspector.codebooks().shape == (N, W, 8)
    items, _, vectors = inspector.item_embeddings()
    assert vectors.shape == (len(items), 8) and len(items) > 0
    assert user_worth_inspecting(tiny_workspace, run) is None
    data = Run.open(tiny_workspace, run).data
    assert not inspector.user(int(data.raw_user(1))).recorded


def test_runs_that_cannot_be_inspected(tiny_workspace, tmp_path, run_id):
    pop = train(tiny_workspace, "tiny", "pop", train_settings={"seed": 0}).run_id
    with pytest.raises(DmqnError, match="only dmqn and dmqn-simple"):
        RunInspector(tiny_workspace, pop)
    with pytest.raises(DmqnError, match="unknown run"):
        RunInspector(tiny_workspace, "no-such-run")
    with pytest.raises(DmqnError, match="no run store"):
        RunInspector(Workspace(tmp_path / "empty"))
    assert row_counts(tiny_workspace, pop) == dict.fromkeys(TABLES, 0)
    runs = dmqn_runs(tiny_workspace)
    assert run_id in [r.run_id for r in runs] and pop not in [r.run_id for r in runs]
    assert [r.created_at for r in runs] == sorted((r.created_at for r in runs), reverse=True)
    # The default is the latest finished one: a run still training or killed has no recorded sample.
    assert RunInspector(tiny_workspace).run_id == next(r.run_id for r in runs if r.status == "finished")


def test_user_worth_inspecting_is_a_sampled_user_with_the_longest_history(tiny_workspace, run_id):
    users = RunStore(tiny_workspace.store_path).inspected_users(run_id)
    chosen = user_worth_inspecting(tiny_workspace, run_id)
    assert chosen in [u for u, _, _ in users]
    assert dict((u, length) for u, length, _ in users)[chosen] == max(length for _, length, _ in users)


def test_negative_inspect_users_is_a_bad_flag(tiny_workspace):
    result = CliRunner().invoke(app, ["train", "tiny", "--inspect-users", "-1", "-w", str(tiny_workspace.root)])
    assert result.exit_code == 2 and "--inspect-users" in result.output
