"""cluster_categories: each cluster's top categories against a plain count, and CTAM reading the share."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.dmqn.cluster_categories import candidate_share, top_categories
from dmqn_core.models.dmqn.model import DMQN

CONFIG = ModelConfig(
    n_items=60,
    n_categories=5,
    n_behavior_types=4,
    embed_dim=8,
    n_codebooks=3,
    codebook_size=6,
    icim_heads=2,
    short_len=5,
    mlp_hidden=(16,),
    cluster_categories=2,
    # The mechanism alone; match features, the DIN short term and the time embedding have their own tests.
    match_features=False,
    short_term=None,
    behavior_time=False,
)
HISTORY = ("hist_item", "hist_category", "hist_behavior", "hist_mask")


@pytest.mark.parametrize("n_categories", [7, 30_000_000])  # 32-bit sort keys, and 64-bit ones past 2^31
@pytest.mark.parametrize("top", [1, 2, 4])
def test_every_cluster_keeps_its_most_frequent_categories_and_their_shares(top, n_categories):
    g = torch.Generator().manual_seed(top)
    H, N, L, W = 5, 3, 40, 6
    codeword = torch.randint(0, W, (H, N, L), generator=g)
    codeword[:, :, 30:] = -1  # padding
    codeword[1] = -1  # an empty history
    category = torch.randint(1, 5, (H, L), generator=g)
    categories, shares = top_categories(codeword, category, W, top, n_categories)  # ids below 5, and more
    assert categories.shape == shares.shape == (H, N, W, top)
    for h in range(H):
        for n in range(N):
            for w in range(W):
                members = [int(category[h, l]) for l in range(L) if codeword[h, n, l] == w]
                # Most frequent first, ties to the smaller id; 0 / 0.0 where the cluster has fewer.
                ranked = sorted(Counter(members).items(), key=lambda kv: (-kv[1], kv[0]))[:top]
                ranked += [(0, 0)] * (top - len(ranked))
                assert categories[h, n, w].tolist() == [c for c, _ in ranked]
                expected = [k / len(members) if members else 0.0 for _, k in ranked]
                assert torch.allclose(shares[h, n, w], torch.tensor(expected), atol=1e-6)


def test_the_candidate_reads_its_category_share_of_every_cluster():
    categories = torch.tensor([[[[3, 1], [2, 0]]]])  # (1, 1, 2, 2): cluster 0 holds 3 and 1, cluster 1 only 2
    shares = torch.tensor([[[[0.75, 0.25], [1.0, 0.0]]]])
    assert candidate_share(categories, shares, torch.tensor([1])).tolist() == [[[0.25, 0.0]]]
    assert candidate_share(categories, shares, torch.tensor([2])).tolist() == [[[0.0, 1.0]]]
    assert candidate_share(categories, shares, torch.tensor([4])).tolist() == [[[0.0, 0.0]]]


def test_dmqn_attends_to_the_clusters_holding_the_candidates_category():
    """With a larger share weight the CTAM weight of every cluster holding the candidate's category grows,
    the compact state scores as the full one, and the gradient reaches the share weight."""
    torch.manual_seed(0)
    model = DMQN(CONFIG).eval()
    b = random_batch(CONFIG, seed=5)
    with torch.no_grad():
        state = model.encode_user(*(b[k] for k in HISTORY))
        assert state.category is not None and state.category.shape[-1] == 2
        logits, weights = model.score_with_weights(state, b["cand_item"], b["cand_category"], b["hist_index"])
        compact = model.score(state.compact(), b["cand_item"], b["cand_category"], b["hist_index"])
        assert (compact - logits).abs().max() <= 1e-5
        model.ctam.share_weight.fill_(5.0)
        _, stronger = model.score_with_weights(state, b["cand_item"], b["cand_category"], b["hist_index"])
    share = candidate_share(
        state.category.index_select(0, b["hist_index"]),
        state.category_share.index_select(0, b["hist_index"]),
        b["cand_category"],
    )
    holds = share > 0
    assert holds.any()
    # Per codebook row the weights are a softmax: a cluster with the largest share gains weight.
    top = share == share.amax(dim=-1, keepdim=True)
    rows = holds.any(dim=-1) & (top & holds).any(dim=-1)
    gained = ((stronger - weights) * (top & holds)).sum(dim=-1)[rows]
    assert (gained >= -1e-6).all() and (gained > 0).any()
    model.train()
    model(**b).sum().backward()
    assert model.ctam.share_weight.grad is not None and model.ctam.share_weight.grad.abs().sum() > 0


def test_off_by_default_and_no_new_parameter():
    torch.manual_seed(0)
    plain = DMQN(replace(CONFIG, cluster_categories=0))
    assert plain.ctam.share_weight is None
    assert not any("share_weight" in name for name, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="cluster_categories"):
        replace(CONFIG, cluster_categories=-1)
