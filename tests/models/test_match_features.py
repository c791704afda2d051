"""Target-match features (dmqn_core/nn/match_features.py): the table against a plain count, the lookup,
every model with them, and DMQN's time-gap embedding (behavior_time)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from model_batches import random_batch
from test_model_contract import CONFIG, MODELS, assert_same

from dmqn_core.data.prepared import PreparedSet
from dmqn_core.models.registry import build_model
from dmqn_core.nn.match_features import LOG_SCALE, WIDTH, MatchFeatures, match_table

MATCH = replace(CONFIG, match_features=True)


def naive_features(keys: list[int], times: list[int], key: int, recent_len: int) -> tuple[float, float, float] | None:
    """(log1p count, log1p recent count, log1p gap / LOG_SCALE) of ``key`` in one history, None if absent."""
    positions = [i for i, k in enumerate(keys) if k == key]
    if not positions:
        return None
    recent = [i for i in positions if i >= len(keys) - recent_len]
    gap = times[-1] - times[positions[-1]]
    return math.log1p(len(positions)), math.log1p(len(recent)), math.log1p(gap) / LOG_SCALE


def test_the_table_holds_each_distinct_key_with_its_counts_and_latest_gap():
    batch = random_batch(replace(CONFIG, n_items=6, n_categories=4), seed=3, H=8, L=30)
    recent_len = 7
    table = match_table(
        batch["hist_item"], batch["hist_category"], batch["hist_mask"], batch["hist_timestamp"], recent_len, 6, 4
    )
    for h in range(8):
        n = int(batch["hist_mask"][h].sum())
        times = batch["hist_timestamp"][h, :n].tolist()
        for keys, features, ids in (
            (table.category[h], table.category_features[h], batch["hist_category"][h, :n].tolist()),
            (table.item[h], table.item_features[h], batch["hist_item"][h, :n].tolist()),
        ):
            stored = [int(k) for k in keys if k >= 0]
            assert stored == sorted(set(ids))  # distinct, ascending, then padding
            assert (keys[len(stored) :] == -1).all()
            for j, key in enumerate(stored):
                expected = naive_features(ids, times, key, recent_len)
                assert np.allclose(features[j].tolist(), expected, rtol=1e-6, atol=1e-6), (h, key)


def test_a_candidate_reads_its_own_category_and_item_and_a_learned_none_otherwise():
    hist_item = torch.tensor([[5, 6, 5, 0], [0, 0, 0, 0]])
    hist_category = torch.tensor([[2, 3, 2, 0], [0, 0, 0, 0]])
    hist_mask = hist_item > 0
    hist_timestamp = torch.tensor([[100, 200, 400, 0], [0, 0, 0, 0]])
    table = match_table(hist_item, hist_category, hist_mask, hist_timestamp, 2, n_items=10, n_categories=5)
    features = MatchFeatures(n_items=10, n_categories=5)
    with torch.no_grad():
        features.none.copy_(torch.tensor([-3.0, -4.0]))
    rows = torch.tensor([0, 0, 1])
    out = features(table.index_select(rows), torch.tensor([5, 7, 5]), torch.tensor([2, 3, 2]), torch.tensor([0, 9, 99]))
    assert out.shape == (3, WIDTH)
    log = math.log1p  # the features are log(1 + n)
    # Item 5, category 2, seen at t = 100 and 400 (the last behavior): gap 0; one of them in the last two.
    assert np.allclose(out[0].tolist(), [log(2), log(1), 0.0, log(2), log(1), 0.0, 0.0], atol=1e-6)
    # Item 7 never seen; category 3 once, at t = 200, 200 s before the last behavior.
    assert np.allclose(out[1].tolist(), [log(1), log(1), log(200) / 10, 0, 0, -4.0, log(9) / 10], atol=1e-6)
    # An empty history: nothing matches, both gaps are the learned none.
    assert np.allclose(out[2].tolist(), [0, 0, -3.0, 0, 0, -4.0, log(99) / 10], atol=1e-6)


def test_match_features_need_timestamps_and_popularity():
    batch = random_batch(MATCH)
    model = build_model("sim", MATCH)
    with pytest.raises(ValueError, match="timestamps"):
        model(**{**batch, "hist_timestamp": None}, cand_popularity=torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="popularity"):
        model(**batch)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_reads_the_features_and_keeps_its_contract(name):
    """forward == score(encode_user), the features change the logits, and every parameter (the learned none
    included) gets a gradient; the history's padding width changes nothing."""
    torch.manual_seed(0)
    model = build_model(name, MATCH)
    assert model.match is not None and model.head.n_scalars >= WIDTH
    batch = random_batch(MATCH, seed=1)
    popularity = torch.randint(0, 50, (12,))
    model.eval()
    with torch.no_grad():
        logits = model(**batch, cand_popularity=popularity)
        state = model.encode_user(
            *(batch[k] for k in ("hist_item", "hist_category", "hist_behavior", "hist_mask")), batch["hist_timestamp"]
        )
        assert_same(
            model.score(state, batch["cand_item"], batch["cand_category"], batch["hist_index"], popularity), logits
        )
        assert (model(**batch, cand_popularity=popularity + 1000) - logits).abs().max() > 0
        wide = {
            k: torch.cat([v, torch.zeros_like(v[:, :5])], dim=1) if k.startswith("hist_") and v.dim() == 2 else v
            for k, v in batch.items()
        }
        assert_same(model(**wide, cand_popularity=popularity), logits)
    model.train()
    loss = model(**batch, cand_popularity=popularity).sum() + model.auxiliary_loss()
    loss.backward()
    assert model.match.none.grad is not None and model.match.none.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", ["dmqn", "sim", "din-short"])
def test_without_the_switches_a_model_is_built_as_before(name):
    """match_features and behavior_time off: no new parameter, the same initial weights as a model whose
    config never named them (what lets earlier runs load and train unchanged)."""
    torch.manual_seed(0)
    plain = build_model(name, CONFIG)
    torch.manual_seed(0)
    switched_off = build_model(name, replace(CONFIG, match_features=False, behavior_time=False))
    assert plain.match is None
    a, b = plain.state_dict(), switched_off.state_dict()
    assert a.keys() == b.keys() and not any(k.startswith(("match.", "time.")) for k in a if name == "dmqn")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_behavior_time_moves_dmqn_behaviors_by_their_time_gap():
    config = replace(CONFIG, behavior_time=True)
    torch.manual_seed(0)
    model = build_model("dmqn", config)
    assert isinstance(model.time, nn.Embedding)
    batch = random_batch(config, seed=2)
    hist = [batch[k] for k in ("hist_item", "hist_category", "hist_behavior", "hist_mask")]
    with torch.no_grad():
        model.time.weight.normal_()
        moved = model.behaviors(*hist, batch["hist_timestamp"])
        plain = model.embedding.behaviors(*hist)
        later = model.behaviors(*hist, batch["hist_timestamp"] + 7)  # a shift of every time keeps every gap
    mask = batch["hist_mask"]
    assert (moved - plain)[mask].abs().sum(dim=-1).min() > 0  # every real behavior moved
    assert (moved[~mask] == 0).all()  # padding stays zero
    assert torch.equal(moved, later)
    with pytest.raises(ValueError, match="timestamps"):
        model.behaviors(*hist, None)


def test_popularity_before_counts_earlier_behaviors_only(tiny_workspace):
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    rng = np.random.default_rng(0)
    items = rng.integers(1, data.n_items + 1, 200)
    times = rng.choice(np.asarray(data.beh_timestamp), 200) + rng.integers(-1, 2, 200)
    counted = data.popularity_before(items, times)
    beh_item, beh_time = np.asarray(data.beh_item), np.asarray(data.beh_timestamp)
    expected = [int(((beh_item == i) & (beh_time < t)).sum()) for i, t in zip(items, times)]
    assert counted.tolist() == expected
    # Without a time limit: the set's item popularity, which serving reads.
    never = np.full(data.n_items, np.iinfo(np.int64).max)
    all_items = np.arange(1, data.n_items + 1)
    assert data.popularity_before(all_items, never).tolist() == np.asarray(data.item_popularity[1:]).tolist()


def test_the_lookup_by_row_finds_each_candidates_own_entry():
    """Candidates looked up in their rows of a shared table (what scoring does, no per-candidate copy) read
    what a plain search of that row finds, for keys present, absent, padding and ids past every key."""
    batch = random_batch(replace(CONFIG, n_items=30, n_categories=6), seed=7, H=5, L=20)
    table = match_table(
        batch["hist_item"], batch["hist_category"], batch["hist_mask"], batch["hist_timestamp"], 4, 30, 6
    )
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 5, (200,), generator=g)
    items = torch.randint(0, 40, (200,), generator=g)  # 0 (unknown) and ids no history holds included
    categories = torch.randint(0, 8, (200,), generator=g)
    features = MatchFeatures(n_items=40, n_categories=8)  # every candidate id below, as embeddings require
    with torch.no_grad():
        features.none.copy_(torch.tensor([-3.0, -4.0]))
        out = features(table, items, categories, torch.zeros(200, dtype=torch.long), rows)
    for b in range(200):
        r = int(rows[b])
        for keys, feats, key, column, none in (
            (table.category[r], table.category_features[r], int(categories[b]), 0, -3.0),
            (table.item[r], table.item_features[r], int(items[b]), 3, -4.0),
        ):
            where = [j for j in range(len(keys)) if int(keys[j]) == key and key >= 0]
            expected = feats[where[0]].tolist() if where else [0.0, 0.0, none]
            assert out[b, column : column + 3].tolist() == expected, (b, key)
