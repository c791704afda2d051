"""Exported user states and CachedScorer on the embedded store and a real Redis: exactness, resume, faults."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import free_port

from dmqn_core.data.batches import gather_histories
from dmqn_core.errors import DmqnError
from dmqn_core.progress import NullProgress
from dmqn_core.runs.run import Run
from dmqn_core.serving.cache import CachedScorer, cache_path, export_states, model_version
from dmqn_core.serving.state_store import EmbeddedStateStore, RedisStateStore
from dmqn_core.training.train import train


@pytest.fixture(scope="module")
def dmqn_run(tiny_workspace):
    result = train(
        tiny_workspace,
        "tiny",
        "dmqn",
        {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8},
        {"epochs": 1, "max_len": 60, "batch_size": 256, "seed": 4},
    )
    return result.run_id


def full_pass_probabilities(run: Run, user: int, items: np.ndarray) -> np.ndarray:
    """Click probabilities of ``items`` (indices) for ``user`` (index) from the run's full forward pass over
    the user's whole history, with the items' popularity in the whole set (what serving reads now): what a
    cached score must equal."""
    data = run.data
    item, category, behavior, timestamp, mask = gather_histories(
        data, np.array([user]), np.asarray(data.user_offsets[[user]]), run.max_len
    )
    with torch.no_grad():
        return torch.sigmoid(
            run.model()(
                torch.from_numpy(item),
                torch.from_numpy(category),
                torch.from_numpy(behavior),
                torch.from_numpy(mask),
                torch.zeros(len(items), dtype=torch.long),
                torch.from_numpy(items),
                torch.from_numpy(np.asarray(data.item_category[items], dtype=np.int64)),
                torch.from_numpy(timestamp),
                torch.from_numpy(np.asarray(data.item_popularity[items], dtype=np.int64)),
            )
        ).numpy()


def test_cached_scores_equal_the_full_forward_pass(tiny_workspace, dmqn_run):
    result = export_states(tiny_workspace, dmqn_run, batch_size=64)
    run = Run.open(tiny_workspace, dmqn_run)
    data = run.data
    assert result.total_users == data.n_users and result.bytes > 0
    scorer = CachedScorer(tiny_workspace, dmqn_run)
    rng = np.random.default_rng(0)
    users = rng.choice(np.arange(1, data.n_users + 1), size=8, replace=False)
    items = rng.choice(np.arange(1, data.n_items + 1), size=5, replace=False)
    raw_items = data.raw_item(items)
    for user in users:
        full = full_pass_probabilities(run, int(user), items)
        cached = scorer.score(int(data.raw_user(user)), raw_items.tolist())
        assert np.abs(cached - full).max() <= 1e-5
    scorer.close()


def test_resume_writes_only_missing_users(tiny_workspace, dmqn_run):
    store = EmbeddedStateStore(cache_path(tiny_workspace))
    data = Run.open(tiny_workspace, dmqn_run).data
    first = data.raw_user(np.arange(1, 11)).tolist()
    partial = export_states(tiny_workspace, dmqn_run, users=first, dtype="float16")
    assert partial.users == 10
    version = partial.version
    again = export_states(tiny_workspace, dmqn_run, dtype="float16", resume=True)
    assert again.version == version and again.total_users == data.n_users
    assert again.users == data.n_users - 10  # the first ten were not redone
    manifest = store.manifest(version)
    assert manifest["users"] == data.n_users and manifest["dtype"] == "float16"
    with pytest.raises(DmqnError, match="without --resume"):
        export_states(tiny_workspace, dmqn_run, dtype="float32", resume=True)


def test_the_states_do_not_depend_on_the_threads(tiny_workspace, dmqn_run, tmp_path):
    """Export splits each batch into one share per torch thread, each padded to the batch's width: every
    user's bytes are those of one thread. In batches of 7 users on 3 threads, a share of 3 short
    histories padded only to its own width rounded one user's recent mean differently."""
    threads = torch.get_num_threads()
    values = []
    try:
        for n_threads, batch_size in ((1, 7), (3, 7), (2, 256)):
            torch.set_num_threads(n_threads)
            path = tmp_path / f"states-{n_threads}-{batch_size}.sqlite"
            result = export_states(tiny_workspace, dmqn_run, to=str(path), batch_size=batch_size)
            store = EmbeddedStateStore(path)
            values.append(store.get(result.version, store.users(result.version)))
            store.close()
    finally:
        torch.set_num_threads(threads)
    assert len(values[0]) == Run.open(tiny_workspace, dmqn_run).data.n_users
    assert values[1] == values[0] and values[2] == values[0]


def test_unknown_user_falls_back_and_unknown_item_fails(tiny_workspace, dmqn_run):
    export_states(tiny_workspace, dmqn_run, users=[])
    data = Run.open(tiny_workspace, dmqn_run).data
    item = int(data.raw_item(1))
    with CachedScorer(tiny_workspace, dmqn_run) as scorer:
        with pytest.warns(UserWarning, match="empty history"):
            scores = scorer.score(10**12, [item])
        assert scores.shape == (1,) and np.isfinite(scores).all()
        with pytest.raises(DmqnError, match="unknown item"):
            scorer.score(int(data.raw_user(1)), [10**12])


@pytest.mark.parametrize("target", ["embedded", "redis"])
def test_a_new_checkpoint_never_reads_old_states(tiny_workspace, dmqn_run, target, request):
    uri = request.getfixturevalue("redis_url") if target == "redis" else None
    export_states(tiny_workspace, dmqn_run, users=[], to=uri)
    best = tiny_workspace.run_dir(dmqn_run) / "best.pt"
    original = best.read_bytes()
    try:
        state = torch.load(best, weights_only=True)
        state["model_state"]["head.net.0.bias"] += 1.0
        torch.save(state, best)
        with pytest.raises(DmqnError, match="no exported states"):
            CachedScorer(tiny_workspace, dmqn_run, source=uri)
    finally:
        best.write_bytes(original)


def test_only_dmqn_runs_have_a_cacheable_state(tiny_workspace):
    din = train(tiny_workspace, "tiny", "din-short", {"embed_dim": 8}, {"epochs": 1, "max_len": 60})
    with pytest.raises(DmqnError, match="cacheable"):
        export_states(tiny_workspace, din.run_id)


def test_an_interrupted_export_resumes_where_it_stopped(tiny_workspace, dmqn_run):
    class StopAfterTwoBatches(NullProgress):
        calls = 0

        def advance(self, n: int = 1, **fields) -> None:
            StopAfterTwoBatches.calls += 1
            if StopAfterTwoBatches.calls == 2:  # the second batch is stored, the third never starts
                raise KeyboardInterrupt

    data = Run.open(tiny_workspace, dmqn_run).data
    store = EmbeddedStateStore(cache_path(tiny_workspace))
    version = model_version(dmqn_run, tiny_workspace.run_dir(dmqn_run) / "best.pt")
    store.clear(version)
    with pytest.raises(KeyboardInterrupt):
        export_states(tiny_workspace, dmqn_run, batch_size=16, progress=StopAfterTwoBatches())
    assert len(store.users(version)) == 32
    resumed = export_states(tiny_workspace, dmqn_run, batch_size=16, resume=True)
    assert resumed.users == data.n_users - 32 and resumed.total_users == data.n_users


def test_export_cache_and_score_commands(tiny_workspace, dmqn_run, tmp_path):
    from typer.testing import CliRunner

    from dmqn_cli.main import app

    data = Run.open(tiny_workspace, dmqn_run).data
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join(str(u) for u in data.raw_user(np.arange(1, 6)).tolist()) + "\n")
    ws = ["-w", str(tiny_workspace.root)]
    runner = CliRunner()
    exported = runner.invoke(app, ["export-cache", dmqn_run, "--users", str(users_file), *ws])
    assert exported.exit_code == 0, exported.output
    assert "5 users written" in exported.output and "bytes per user" in exported.output
    items = data.raw_item([1, 2]).tolist()
    user = int(data.raw_user(1))
    scored = runner.invoke(app, ["score", dmqn_run, "--user", str(user), "--items", ",".join(map(str, items)), *ws])
    assert scored.exit_code == 0, scored.output
    lines = [line.split("\t") for line in scored.output.strip().splitlines()]
    with CachedScorer(tiny_workspace, dmqn_run) as scorer:
        expected = scorer.score(user, items)
    assert [int(a) for a, _ in lines] == items
    assert np.allclose([float(b) for _, b in lines], expected, atol=1e-6)
    unknown_item = runner.invoke(app, ["score", dmqn_run, "--user", str(user), "--items", "999999999", *ws])
    assert unknown_item.exit_code == 1 and "unknown item" in unknown_item.output
    bad_users = runner.invoke(app, ["export-cache", dmqn_run, "--users", str(tmp_path / "missing.txt"), *ws])
    assert bad_users.exit_code == 2


def test_float16_states_keep_the_test_auc_within_0_001(tiny_workspace, dmqn_run):
    """Every test sample scored from its history's cached state, stored as float32 and as float16."""
    from dmqn_core.data.batches import BatchLoader
    from dmqn_core.serving.state_codec import decode_state, encode_states, stack_states
    from dmqn_core.training.metrics import auc

    run = Run.open(tiny_workspace, dmqn_run)
    model, data = run.model(), run.data
    loader = BatchLoader(data, "test", 512, run.max_len, popularity=model.config.match_features)
    scores = {"float32": [], "float16": []}
    labels, forward = [], []
    with torch.no_grad():
        for batch in loader:
            state = model.encode_user(
                batch.hist_item, batch.hist_category, batch.hist_behavior, batch.hist_mask, batch.hist_timestamp
            )
            candidates = (batch.cand_item, batch.cand_category, batch.hist_index, batch.cand_popularity)
            forward.append(model.score(state, *candidates))
            for dtype in scores:
                cached = stack_states([decode_state(v) for v in encode_states(state, dtype)])
                scores[dtype].append(model.score(cached, *candidates))
            labels.append(batch.label)
    y = torch.cat(labels).numpy()
    full, exact, half = (torch.cat(s).numpy() for s in (forward, scores["float32"], scores["float16"]))
    assert np.abs(exact - full).max() <= 1e-5
    assert abs(auc(y, half) - auc(y, exact)) <= 0.001
    assert len(y) > 100 and 0.0 < auc(y, exact) < 1.0


# ---- Redis (a real server, see conftest.redis_url) ----


def test_redis_keys_manifest_and_exact_scores(tiny_workspace, dmqn_run, redis_url):
    store = RedisStateStore(redis_url)
    run = Run.open(tiny_workspace, dmqn_run)
    data = run.data
    result = export_states(tiny_workspace, dmqn_run, batch_size=50, to=redis_url)
    assert result.store == redis_url and result.total_users == result.users == data.n_users
    keys = {k.decode() for k in store.client.scan_iter(match=f"dmqn:{result.version}:*")}
    assert keys == {f"dmqn:{result.version}:{u}" for u in data.raw_user(np.arange(1, data.n_users + 1)).tolist()}
    assert store.client.ttl(next(iter(keys))) == -1  # no --ttl: never expires
    manifest = store.manifest(result.version)
    assert manifest["run_id"] == dmqn_run and manifest["users"] == data.n_users and manifest["dtype"] == "float32"
    assert manifest["bytes"] == result.bytes == sum(store.client.strlen(k) for k in keys)
    assert (manifest["n_codebooks"], manifest["codebook_size"], manifest["dim"]) == (2, 8, 8)

    # The same bytes as the embedded store, and the same scores as the full model.
    export_states(tiny_workspace, dmqn_run, users=data.raw_user(np.arange(1, 4)).tolist())
    embedded = EmbeddedStateStore(cache_path(tiny_workspace)).get(result.version, data.raw_user(np.arange(1, 4)))
    assert embedded == store.get(result.version, embedded)
    items = np.arange(1, 7)
    with CachedScorer(tiny_workspace, dmqn_run, source=redis_url) as scorer:
        for user in (1, 2, data.n_users):
            cached = scorer.score(int(data.raw_user(user)), data.raw_item(items).tolist())
            full = full_pass_probabilities(run, user, items)
            assert np.abs(cached - full).max() <= 1e-5
    store.clear(result.version)
    assert store.users(result.version) == set() and store.manifest(result.version) is None


def test_redis_ttl_and_resume_after_an_interrupted_export(tiny_workspace, dmqn_run, redis_url):
    class StopAfterThreeBatches(NullProgress):
        calls = 0

        def advance(self, n: int = 1, **fields) -> None:
            StopAfterThreeBatches.calls += 1
            if StopAfterThreeBatches.calls == 3:
                raise KeyboardInterrupt

    data = Run.open(tiny_workspace, dmqn_run).data
    store = RedisStateStore(redis_url)
    version = model_version(dmqn_run, tiny_workspace.run_dir(dmqn_run) / "best.pt")
    store.clear(version)
    with pytest.raises(KeyboardInterrupt):
        export_states(tiny_workspace, dmqn_run, batch_size=20, progress=StopAfterThreeBatches(), to=redis_url, ttl=3600)
    assert len(store.users(version)) == 60
    resumed = export_states(tiny_workspace, dmqn_run, batch_size=20, resume=True, to=redis_url, ttl=3600)
    assert resumed.users == data.n_users - 60 and resumed.total_users == data.n_users
    assert 0 < store.client.ttl(RedisStateStore.key(version, int(data.raw_user(1)))) <= 3600
    assert 0 < store.client.ttl(RedisStateStore.manifest_key(version)) <= 3600
    store.clear(version)


def test_an_unreachable_redis_is_a_one_line_error(tiny_workspace, dmqn_run):
    from typer.testing import CliRunner

    from dmqn_cli.main import app

    dead = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(DmqnError, match="cannot reach Redis"):
        RedisStateStore(dead, timeout=1.0)
    ws = ["-w", str(tiny_workspace.root)]
    runner = CliRunner()
    for args in (
        ["export-cache", dmqn_run, "--to", dead],
        ["score", dmqn_run, "--user", "1", "--items", "1", "--from", dead],
    ):
        result = runner.invoke(app, [*args, *ws])
        assert result.exit_code == 1, result.output
        assert "cannot reach Redis" in result.output and len(result.output.strip().splitlines()) == 1
    ttl_without_redis = runner.invoke(app, ["export-cache", dmqn_run, "--ttl", "60", *ws])
    assert ttl_without_redis.exit_code == 1 and "needs a Redis target" in ttl_without_redis.output


def test_a_scorer_keeps_serving_while_an_export_writes(tiny_workspace, dmqn_run):
    """WAL mode: the scorer's open read-only connection neither blocks the export nor misses its commits."""
    data = Run.open(tiny_workspace, dmqn_run).data
    version = model_version(dmqn_run, tiny_workspace.run_dir(dmqn_run) / "best.pt")
    EmbeddedStateStore(cache_path(tiny_workspace)).clear(version)
    export_states(tiny_workspace, dmqn_run, users=data.raw_user(np.arange(1, 3)).tolist())
    late_user, item = int(data.raw_user(5)), int(data.raw_item(1))
    with CachedScorer(tiny_workspace, dmqn_run) as scorer:
        with pytest.warns(UserWarning, match="no cached state"):
            scorer.score(late_user, [item])
        written = export_states(tiny_workspace, dmqn_run, users=[late_user])  # while the scorer holds the file
        assert written.users == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scorer.score(late_user, [item])


def test_a_din_short_term_dmqn_scores_from_its_cache_as_its_full_pass(tiny_workspace):
    """short_term = "din": the cached state carries the recent behaviors (layout version 2), and `dmqn score`
    reads them as the full forward pass does."""
    run_id = train(
        tiny_workspace,
        "tiny",
        "dmqn",
        {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8, "short_term": "din"},
        {"epochs": 1, "max_len": 60, "batch_size": 256, "seed": 4, "inspect_users": 0},
    ).run_id
    export_states(tiny_workspace, run_id, batch_size=64)
    run = Run.open(tiny_workspace, run_id)
    model, data = run.model(), run.data
    assert model.config.short_term == "din"
    scorer = CachedScorer(tiny_workspace, run_id)
    items = np.arange(1, 6)
    for user in (1, 2, 3):
        full = full_pass_probabilities(run, user, items)
        cached = scorer.score(int(data.raw_user(user)), data.raw_item(items).tolist())
        assert np.abs(cached - full).max() <= 1e-5


def test_a_match_feature_dmqn_scores_from_its_cache_as_its_full_pass(tiny_workspace):
    """match_features, behavior_time and cluster_categories: the cached state carries the match table and the
    clusters' categories (layout version 3), the scorer adds the items' popularity, and `dmqn score` equals
    the full forward pass."""
    run_id = train(
        tiny_workspace,
        "tiny",
        "dmqn",
        {
            "embed_dim": 8,
            "n_codebooks": 2,
            "codebook_size": 8,
            "match_features": True,
            "behavior_time": True,
            "cluster_categories": 3,
        },
        {"epochs": 1, "max_len": 60, "batch_size": 256, "seed": 4, "inspect_users": 2},
    ).run_id
    export_states(tiny_workspace, run_id, batch_size=64)
    run = Run.open(tiny_workspace, run_id)
    data = run.data
    assert run.model().config.match_features and run.model().match is not None
    items = np.arange(1, 9)
    with CachedScorer(tiny_workspace, run_id) as scorer:
        for user in (1, 2, data.n_users):
            full = full_pass_probabilities(run, user, items)
            cached = scorer.score(int(data.raw_user(user)), data.raw_item(items).tolist())
            assert np.abs(cached - full).max() <= 1e-5
