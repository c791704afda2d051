"""TWIN (dmqn_core.models.twin): the consistency-preserved GSU and the assembled model."""

import math

import torch
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.twin import TWIN, TimeGapBias, general_search
from dmqn_core.nn.sequence import recent_mean, time_gaps
from dmqn_core.nn.target_attention import MultiHeadTargetAttention

CONFIG = ModelConfig(
    n_items=60,
    n_categories=8,
    n_behavior_types=4,
    embed_dim=8,
    attention_heads=2,
    short_len=4,
    top_k=5,
    mlp_hidden=(16, 8),
    # The model's own mechanism alone; match features, the DIN short term, the time embedding and the clusters'
    # categories have their own tests.
    match_features=False,
    short_term=None,
    behavior_time=False,
    cluster_categories=0,
)


def brute_force_scores(
    esu: MultiHeadTargetAttention,
    c: torch.Tensor,
    e: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor,
    hist_index: torch.Tensor,
) -> torch.Tensor:
    """Per candidate and behavior, loop by loop: mean over heads of q_h.k_h/sqrt(d) + bias; None at padding."""
    heads, D = esu.heads, c.shape[1]
    d = D // heads
    Wq, Wk = esu.wq.weight, esu.wk.weight
    out = torch.full((c.shape[0], e.shape[1]), float("-inf"))
    Wq, Wk = Wq.detach(), Wk.detach()
    for b in range(c.shape[0]):
        u = int(hist_index[b])
        for l in range(e.shape[1]):
            if not mask[u, l]:
                continue
            q, k = Wq @ c[b], Wk @ e[u, l]
            per_head = [float(q[h * d : (h + 1) * d] @ k[h * d : (h + 1) * d]) / math.sqrt(d) for h in range(heads)]
            out[b, l] = sum(per_head) / heads + float(bias[u, l])
    return out


def test_gsu_top_k_are_the_highest_brute_force_scores_and_never_padding():
    torch.manual_seed(0)
    esu = MultiHeadTargetAttention(8, 2)
    H, L, B, k = 4, 12, 7, 5
    mask = torch.arange(L)[None] < torch.tensor([12, 3, 0, 9])[:, None]
    e = torch.randn(H, L, 8) * 3  # padding rows deliberately not zero: they must still be skipped
    bias = torch.randn(H, L)
    c = torch.randn(B, 8)
    hist_index = torch.tensor([0, 1, 2, 3, 0, 3, 1])
    index, valid = general_search(esu, c, e, mask, hist_index, k, bias)
    expected = brute_force_scores(esu, c, e, bias, mask, hist_index)
    for b in range(B):
        u = int(hist_index[b])
        n_real = int(mask[u].sum())
        assert int(valid[b].sum()) == min(k, n_real)
        got = set(index[b][valid[b]].tolist())
        assert all(bool(mask[u, l]) for l in got)  # padding is never retrieved
        want = set(expected[b].topk(min(k, n_real)).indices.tolist()) if n_real else set()
        assert got == want


def test_gsu_uses_the_esu_parameters():
    torch.manual_seed(1)
    m = TWIN(CONFIG)
    b = random_batch(CONFIG, seed=1)
    e = m.embedding.behaviors(b["hist_item"], b["hist_category"], b["hist_behavior"], b["hist_mask"])
    c = m.embedding.candidate(b["cand_item"], b["cand_category"])
    before, _ = general_search(m.esu, c, e, b["hist_mask"], b["hist_index"], CONFIG.top_k)
    with torch.no_grad():
        m.esu.wk.weight.copy_(torch.randn_like(m.esu.wk.weight))
    after, _ = general_search(m.esu, c, e, b["hist_mask"], b["hist_index"], CONFIG.top_k)
    assert not torch.equal(before.sort(dim=1).values, after.sort(dim=1).values)


def test_forward_is_esu_over_the_gsu_top_k_plus_short_din():
    """With top_k >= L the GSU keeps everything: the long interest is the ESU over the whole history."""
    torch.manual_seed(2)
    b = random_batch(CONFIG, seed=2, L=12)
    cfg = ModelConfig(**{**CONFIG.to_dict(), "top_k": 12})
    m = TWIN(cfg).eval()
    with torch.no_grad():
        m.time_bias.table.weight.normal_()
        mask, idx = b["hist_mask"], b["hist_index"]
        e = m.embedding.behaviors(b["hist_item"], b["hist_category"], b["hist_behavior"], mask)
        c = m.embedding.candidate(b["cand_item"], b["cand_category"])
        bias = m.time_bias(time_gaps(b["hist_timestamp"], mask))
        long, _ = m.esu(c, e.index_select(0, idx), mask.index_select(0, idx), bias.index_select(0, idx))
        short = m.short(c, e, mask, idx)
        expected = m.head(c, torch.stack([long, short], 1), recent_mean(e, mask, cfg.short_len).index_select(0, idx))
        torch.testing.assert_close(m(**b), expected, rtol=0, atol=1e-5)


def test_time_gaps_and_bias_buckets():
    ts = torch.tensor([[100, 160, 1124, 1124, 0], [0, 0, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, True, False], [False] * 5])
    gaps = time_gaps(ts, mask)
    torch.testing.assert_close(gaps, torch.tensor([[1024.0, 964.0, 0.0, 0.0, 0.0], [0.0] * 5]))
    tb = TimeGapBias()
    with torch.no_grad():
        tb.table.weight.copy_(torch.arange(32.0).unsqueeze(1))
    # bucket = floor(log2(1 + gap)): 1025 -> 10, 965 -> 9, 1 -> 0
    torch.testing.assert_close(tb(gaps[0, :3]), torch.tensor([10.0, 9.0, 0.0]))
