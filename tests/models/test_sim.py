"""SIM (dmqn_core.models.sim): the hard-search GSU against brute force, the shared ShortTermDIN, the model."""

import pytest
import torch
import torch.nn.functional as F
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.din import ShortTermDIN
from dmqn_core.models.sim import SIM, category_search
from dmqn_core.nn.target_attention import ActivationUnit

CONFIG = ModelConfig(
    n_items=400,
    n_categories=6,
    n_behavior_types=3,
    embed_dim=8,
    attention_heads=2,
    top_k=3,
    short_len=2,
    mlp_hidden=(16, 8),
    # The model's own mechanism alone; match features, the DIN short term, the time embedding and the clusters'
    # categories have their own tests.
    match_features=False,
    short_term=None,
    behavior_time=False,
    cluster_categories=0,
)


def model(seed: int = 0, config: ModelConfig = CONFIG) -> SIM:
    torch.manual_seed(seed)
    return SIM(config)


def brute_force_search(hist_category, hist_mask, hist_index, cand_category, k):
    """Python loops: the positions of the k most recent same-category behaviors, oldest first."""
    out = []
    for h, c in zip(hist_index.tolist(), cand_category.tolist()):
        same = [l for l in range(hist_category.shape[1]) if hist_mask[h, l] and hist_category[h, l] == c]
        out.append(same[-k:])
    return out


def test_category_search_keeps_the_most_recent_same_category_behaviors_in_order():
    cats = torch.tensor([[1, 2, 1, 3, 1, 1, 2, 0], [2, 2, 3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    mask = cats > 0
    cats[1, 5] = 3  # a padding position holding the candidate's category must not be found
    hist_index = torch.tensor([0, 0, 0, 1, 1, 2])
    cand = torch.tensor([1, 2, 4, 3, 2, 1])
    positions, valid = category_search(cats, mask, hist_index, cand, k=3)
    assert valid.tolist() == [
        [True] * 3,
        [True, True, False],
        [False] * 3,
        [True, False, False],
        [True, True, False],
        [False] * 3,
    ]
    assert positions[0].tolist() == [2, 4, 5]  # four matches (0, 2, 4, 5): the oldest is dropped
    assert positions[1, :2].tolist() == [1, 6]
    assert positions[3, :1].tolist() == [2]
    assert positions[4, :2].tolist() == [0, 1]
    assert (positions[~valid] == 0).all()


@pytest.mark.parametrize("k", [1, 4, 30])
def test_category_search_equals_brute_force(k: int):
    b = random_batch(CONFIG, seed=3, H=6, L=20, B=15)
    positions, valid = category_search(b["hist_category"], b["hist_mask"], b["hist_index"], b["cand_category"], k)
    assert positions.shape == (15, min(k, 20))
    expected = brute_force_search(b["hist_category"], b["hist_mask"], b["hist_index"], b["cand_category"], k)
    assert [p[v].tolist() for p, v in zip(positions, valid)] == expected
    assert all(v[: len(e)].all() and not v[len(e) :].any() for v, e in zip(valid, expected))  # left-aligned


def test_short_term_din_is_din_over_the_last_window():
    torch.manual_seed(0)
    short = ShortTermDIN(4, window=3)
    lengths = torch.tensor([5, 2, 0])
    mask = torch.arange(6)[None] < lengths[:, None]
    x = torch.randn(3, 6, 4) * mask[..., None]
    cand, hist_index = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    out = short(cand, x, mask, hist_index)
    unit: ActivationUnit = short.attention
    for b, h in enumerate(hist_index.tolist()):
        n = int(lengths[h])
        last = x[h, max(n - 3, 0) : n]  # (<= 3, 4)
        w = unit.rest(unit.first(torch.cat([last, cand[b].expand_as(last), last - cand[b], last * cand[b]], -1)))
        torch.testing.assert_close(out[b], (w * last).sum(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[2], torch.zeros(4))  # the empty history


def test_logits_depend_only_on_retrieved_and_recent_behaviors():
    """Behavior 0 (category 1) is older than the short window: it matters to a category-1 candidate
    while it is among the top_k most recent category-1 behaviors, and never to a category-2 one."""
    m = model().eval()
    cats = torch.tensor([[1, 2, 1, 2, 2, 2]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    b = dict(
        hist_item=torch.arange(1, 7)[None],
        hist_category=cats,
        hist_behavior=torch.ones(1, 6, dtype=torch.long),
        hist_mask=mask,
        hist_index=torch.zeros(3, dtype=torch.long),
        cand_item=torch.tensor([50, 51, 52]),
        cand_category=torch.tensor([1, 2, 1]),
    )
    changed = dict(b, hist_item=b["hist_item"].clone())
    changed["hist_item"][0, 0] = 99
    with torch.no_grad():
        before, after = m(**b), m(**changed)
        m_k1 = model(config=ModelConfig(**{**CONFIG.to_dict(), "top_k": 1})).eval()
        before_k1, after_k1 = m_k1(**b), m_k1(**changed)
    assert (before[0] - after[0]).abs() > 1e-6 and (before[2] - after[2]).abs() > 1e-6
    assert before[1] == after[1]
    assert torch.equal(before_k1, after_k1)  # with top_k = 1 only behavior 2 is retrieved for category 1


def test_time_embedding_uses_gaps_to_the_most_recent_behavior():
    m = model(1).eval()
    with torch.no_grad():
        m.time.weight.normal_()  # make the temporal embedding matter
    b = random_batch(CONFIG, seed=1)
    shifted = dict(b, hist_timestamp=(b["hist_timestamp"] + 86_400 * 365) * b["hist_mask"])
    stretched = dict(b, hist_timestamp=b["hist_timestamp"] * 2)  # every gap doubled
    with torch.no_grad():
        logits = m(**b)
        torch.testing.assert_close(m(**shifted), logits, rtol=0, atol=1e-6)
        assert (m(**stretched) - logits).abs().max() > 1e-4
        assert torch.isfinite(m(**dict(b, hist_timestamp=None))).all()


def test_gradients_reach_the_retrieved_behaviors():
    m = model(3)
    cats = torch.tensor([[1, 2, 3, 2, 3, 2, 3, 2], [0] * 8])
    b = dict(
        hist_item=torch.tensor([list(range(1, 9)), [0] * 8]),
        hist_category=cats,
        hist_behavior=(cats > 0).long(),
        hist_mask=cats > 0,
        hist_index=torch.tensor([0, 1]),
        cand_item=torch.tensor([20, 21]),
        cand_category=torch.tensor([1, 1]),
        hist_timestamp=torch.tensor([list(range(100, 900, 100)), [0] * 8]),
    )
    F.binary_cross_entropy_with_logits(m(**b), torch.tensor([1.0, 0.0])).backward()
    grad = m.embedding.item.weight.grad
    assert grad[1].abs().sum() > 0  # behavior 0: old, reached through the category search only
    assert grad[4].abs().sum() == 0  # behavior 3: another category, not recent
    for p in (m.embedding.category.weight, m.embedding.behavior.weight, m.time.weight):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
