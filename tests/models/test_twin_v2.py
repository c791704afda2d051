"""TWIN V2 (dmqn_core.models.twin_v2): hierarchical clustering, cluster tokens, cluster-aware attention, model."""

import torch
from model_batches import random_batch

import dmqn_core.models.twin_v2 as twin_v2
from dmqn_core.config import ModelConfig
from dmqn_core.models.twin_v2 import TWINV2, cluster_aware_attention, cluster_summary, hierarchical_clusters
from dmqn_core.nn.sequence import recent_mean, time_gaps
from dmqn_core.nn.target_attention import MultiHeadTargetAttention

CONFIG = ModelConfig(
    n_items=60,
    n_categories=8,
    n_behavior_types=4,
    embed_dim=8,
    attention_heads=2,
    short_len=4,
    top_k=4,
    cluster_max_size=3,
    mlp_hidden=(16, 8),
    # The model's own mechanism alone; match features, the DIN short term, the time embedding and the clusters'
    # categories have their own tests.
    match_features=False,
    short_term=None,
    behavior_time=False,
    cluster_categories=0,
)


def assert_valid_clustering(ids: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, max_size: int) -> None:
    """-1 exactly at padding, dense ids per user, every cluster within the bound and of one group."""
    assert torch.equal(ids >= 0, mask)
    for u in range(ids.shape[0]):
        real = ids[u][mask[u]]
        if real.numel() == 0:
            continue
        n = int(real.max()) + 1
        assert set(real.tolist()) == set(range(n))
        for j in range(n):
            members = ids[u] == j
            assert 1 <= int(members.sum()) <= max_size
            assert len(set(group[u][members].tolist())) == 1


def test_clusters_respect_the_size_bound_and_the_behavior_type():
    g = torch.Generator().manual_seed(0)
    H, L = 6, 120
    mask = torch.arange(L)[None] < torch.tensor([120, 0, 1, 57, 99, 120])[:, None]
    x = torch.randn(H, L, 5, generator=g)
    group = torch.randint(1, 4, (H, L), generator=g) * mask
    for max_size in (1, 4, 16):
        ids = hierarchical_clusters(x, group, mask, max_size)
        assert_valid_clustering(ids, group, mask, max_size)
    # clustering is not a mere chronological cut: at least one cluster is not a contiguous run of its group
    ids = hierarchical_clusters(x, group, mask, 16)
    u = 0
    runs = [ids[u][mask[u] & (group[u] == t)] for t in (1, 2, 3)]
    assert any(bool((r[1:] < r[:-1]).any()) for r in runs)


def test_two_well_separated_groups_are_separated():
    g = torch.Generator().manual_seed(1)
    L = 20
    side = torch.arange(L) % 3 == 0  # interleaved in time, so a chronological cut would mix them
    x = torch.where(side[:, None], 10.0, -10.0) * torch.ones(L, 4) + 0.1 * torch.randn(L, 4, generator=g)
    mask = torch.ones(1, L, dtype=torch.bool)
    ids = hierarchical_clusters(x[None], torch.ones(1, L, dtype=torch.long), mask, 14)
    assert ids.max() == 1
    assert len(set(ids[0][side].tolist())) == 1 and len(set(ids[0][~side].tolist())) == 1
    assert ids[0][side][0] != ids[0][~side][0]


def test_identical_embeddings_still_split_chronologically():
    L = 50
    x = torch.ones(2, L, 6)
    mask = torch.arange(L)[None] < torch.tensor([[50], [37]])
    group = mask.long()
    ids = hierarchical_clusters(x, group, mask, 4)
    assert_valid_clustering(ids, group, mask, 4)
    for u in range(2):  # cut by time: every cluster is a contiguous run of positions
        real = ids[u][mask[u]]
        for j in range(int(real.max()) + 1):
            pos = (real == j).nonzero().flatten()
            assert int(pos[-1] - pos[0]) + 1 == pos.numel()


def test_size_bound_holds_when_the_depth_bound_cuts_kmeans_short(monkeypatch):
    # A geometric sequence: every 2-means split peels off only the largest few values.
    L = 64
    x = (1.5 ** torch.arange(L, dtype=torch.float32)).view(1, L, 1)
    mask = torch.ones(1, L, dtype=torch.bool)
    group = torch.ones(1, L, dtype=torch.long)
    monkeypatch.setattr(twin_v2, "EXTRA_LEVELS", -4)
    ids = hierarchical_clusters(x, group, mask, 3)
    assert_valid_clustering(ids, group, mask, 3)


def test_padding_never_forms_a_cluster_and_does_not_change_the_clustering():
    g = torch.Generator().manual_seed(2)
    H, L = 4, 40
    mask = torch.arange(L)[None] < torch.tensor([40, 0, 23, 5])[:, None]
    x = torch.randn(H, L, 6, generator=g)
    group = torch.randint(1, 3, (H, L), generator=g)
    ids = hierarchical_clusters(x, group * mask, mask, 3)
    assert torch.equal(ids >= 0, mask) and (ids[1] == -1).all()
    # other padding embeddings / ids and extra padding width: same clusters
    noisy = hierarchical_clusters(torch.where(mask[..., None], x, 100.0), group, mask, 3)
    wide_mask = torch.cat([mask, torch.zeros(H, 9, dtype=torch.bool)], 1)
    wide = hierarchical_clusters(
        torch.cat([x, torch.randn(H, 9, 6, generator=g)], 1),
        torch.cat([group, torch.ones(H, 9, dtype=torch.long)], 1),
        wide_mask,
        3,
    )
    assert torch.equal(noisy, ids) and torch.equal(wide[:, :L], ids) and (wide[:, L:] == -1).all()
    tokens, size, exists, _ = cluster_summary(x * mask[..., None], ids, mask)
    assert torch.equal(exists.sum(1), ids.max(1).values + 1)
    assert (size[exists] >= 1).all() and (size[~exists] == 0).all() and (tokens[~exists] == 0).all()


def test_cluster_token_is_the_member_nearest_to_the_centroid():
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [4.0, 0.0], [10.0, 10.0], [0.0, 0.0]]], requires_grad=True)
    ids = torch.tensor([[0, 0, 0, 1, -1]])
    mask = ids >= 0
    gap = torch.tensor([[30.0, 20.0, 10.0, 0.0, 0.0]])
    tokens, size, exists, mean_gap = cluster_summary(x, ids, mask, gap)
    # cluster 0: centroid (5/3, 0), nearest member (1, 0); cluster 1 is one behavior
    torch.testing.assert_close(tokens[0], torch.tensor([[1.0, 0.0], [10.0, 10.0]]))
    torch.testing.assert_close(size[0], torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(mean_gap[0], torch.tensor([20.0, 0.0]))  # numeric features: averaged
    assert exists.all()
    tokens.sum().backward()  # the representative member's embedding gets the gradient
    torch.testing.assert_close(x.grad[0], torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))


def test_cluster_aware_attention_weights_are_size_weighted_softmax():
    torch.manual_seed(3)
    esu = MultiHeadTargetAttention(8, 2)
    B, K = 3, 5
    c, clusters = torch.randn(B, 8), torch.randn(B, K, 8)
    size = torch.tensor([[1.0, 3.0, 10.0, 2.0, 1.0]]).expand(B, K)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False], [False] * 5])
    bias = torch.randn(B, K)
    with torch.no_grad():
        _, weights = cluster_aware_attention(esu, c, clusters, size, mask, bias)  # (B, heads, K)
        s = esu.logits(c, esu.project_keys(clusters)) + bias.unsqueeze(1)  # (B, heads, K)
    for b in range(B):
        for h in range(2):
            num = [float(size[b, k] * torch.exp(s[b, h, k])) if mask[b, k] else 0.0 for k in range(K)]
            total = sum(num)
            want = torch.tensor([v / total if total else 0.0 for v in num])
            torch.testing.assert_close(weights[b, h], want, rtol=1e-5, atol=1e-6)


def test_gsu_keeps_the_top_k_clusters_by_cluster_aware_score():
    """The ESU sees exactly the GSU's clusters: replay the forward with a brute-force top k."""
    torch.manual_seed(4)
    m = TWINV2(CONFIG).eval()
    b = random_batch(CONFIG, seed=4)
    with torch.no_grad():
        m.time_bias.table.weight.normal_()
        mask, idx = b["hist_mask"], b["hist_index"]
        e = m.embedding.behaviors(b["hist_item"], b["hist_category"], b["hist_behavior"], mask)
        c = m.embedding.candidate(b["cand_item"], b["cand_category"])
        ids = hierarchical_clusters(e, b["hist_behavior"], mask, CONFIG.cluster_max_size)
        tokens, size, exists, mean_gap = cluster_summary(e, ids, mask, time_gaps(b["hist_timestamp"], mask))
        tb = m.time_bias(mean_gap)
        longs = []
        for i in range(len(idx)):
            u = int(idx[i])
            real = exists[u].nonzero().flatten()
            s = m.esu.logits(c[i : i + 1], m.esu.project_keys(tokens[u, real]).unsqueeze(0)).mean(1)[0]
            keep = real[(s + size[u, real].log() + tb[u, real]).topk(min(CONFIG.top_k, len(real))).indices]
            long, _ = m.esu(
                c[i : i + 1],
                tokens[u, keep][None],
                torch.ones(1, len(keep), dtype=torch.bool),
                (size[u, keep].log() + tb[u, keep])[None],
            )
            longs.append(long[0])
        short = m.short(c, e, mask, idx)
        expected = m.head(
            c, torch.stack([torch.stack(longs), short], 1), recent_mean(e, mask, CONFIG.short_len).index_select(0, idx)
        )
        assert int(exists[0].sum()) > CONFIG.top_k  # the retrieval really drops clusters
        torch.testing.assert_close(m(**b), expected, rtol=0, atol=1e-5)
        # and uses the ESU's parameters: other keys, other clusters, other logits
        m.esu.wk.weight.copy_(torch.randn_like(m.esu.wk.weight))
        assert not torch.allclose(m(**b), expected, atol=1e-4)
