"""TWIN (dmqn_core.twin): the consistency-preserved GSU and the assembled model."""

import math

import torch

from dmqn_core.config import ModelConfig
from dmqn_core.sequence import recent_mean, time_gaps
from dmqn_core.target_attention import MultiHeadTargetAttention
from dmqn_core.twin import TWIN, TimeGapBias, general_search

CONFIG = ModelConfig(
    n_items=60, n_categories=8, n_behavior_types=4, embed_dim=8, attention_heads=2, short_len=4,
    top_k=5, mlp_hidden=(16, 8),
)


def batch(seed: int = 0, H: int = 5, L: int = 30, B: int = 9) -> dict:
    """Random left-aligned histories with timestamps (history 1 empty, history 2 shorter than top_k)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(CONFIG.top_k + 1, L + 1, (H,), generator=g)
    lengths[1], lengths[2] = 0, 3
    mask = torch.arange(L)[None] < lengths[:, None]
    steps = torch.randint(1, 5000, (H, L), generator=g).cumsum(dim=1)
    hist_index = torch.randint(0, H, (B,), generator=g)
    hist_index[:3] = torch.tensor([0, 1, 2])
    return dict(
        hist_item=torch.randint(1, CONFIG.n_items, (H, L), generator=g) * mask,
        hist_category=torch.randint(1, CONFIG.n_categories, (H, L), generator=g) * mask,
        hist_behavior=torch.randint(1, CONFIG.n_behavior_types, (H, L), generator=g) * mask,
        hist_mask=mask,
        hist_index=hist_index,
        cand_item=torch.randint(1, CONFIG.n_items, (B,), generator=g),
        cand_category=torch.randint(1, CONFIG.n_categories, (B,), generator=g),
        hist_timestamp=(1_700_000_000 + steps) * mask,
    )


def brute_force_scores(esu: MultiHeadTargetAttention, c: torch.Tensor, e: torch.Tensor, bias: torch.Tensor,
                       mask: torch.Tensor, hist_index: torch.Tensor) -> torch.Tensor:
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
            per_head = [float(q[h * d:(h + 1) * d] @ k[h * d:(h + 1) * d]) / math.sqrt(d) for h in range(heads)]
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
    b = batch(1)
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
    b = batch(2, L=12)
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


def test_forward_finite_with_empty_history_and_without_timestamps():
    torch.manual_seed(3)
    m = TWIN(CONFIG)
    b = batch(3)
    for inputs in (b, {k: v for k, v in b.items() if k != "hist_timestamp"}):
        out = m(**inputs)
        assert out.shape == (9,) and torch.isfinite(out).all()


def test_padding_ids_and_width_do_not_matter():
    torch.manual_seed(4)
    m = TWIN(CONFIG).eval()
    b = batch(4)
    with torch.no_grad():
        m.time_bias.table.weight.normal_()
        ref = m(**b)
        noisy = dict(b)
        pad = ~b["hist_mask"]
        for key in ("hist_item", "hist_category", "hist_behavior"):
            noisy[key] = torch.where(pad, torch.randint_like(b[key], 1, 4), b[key])
        noisy["hist_timestamp"] = torch.where(pad, 12345, b["hist_timestamp"])
        torch.testing.assert_close(m(**noisy), ref, rtol=0, atol=1e-5)
        wide = dict(b)
        for key in ("hist_item", "hist_category", "hist_behavior", "hist_mask", "hist_timestamp"):
            wide[key] = torch.cat([b[key], torch.zeros(b[key].shape[0], 17, dtype=b[key].dtype)], dim=1)
        torch.testing.assert_close(m(**wide), ref, rtol=0, atol=1e-5)


def test_gradients_reach_embeddings_esu_and_time_bias():
    torch.manual_seed(5)
    m = TWIN(CONFIG)
    m(**batch(5)).sum().backward()
    for p in (m.embedding.item.weight, m.embedding.category.weight, m.esu.wk.weight, m.esu.wq.weight,
              m.time_bias.table.weight, m.short.attention.first.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(6)
    m = TWIN(CONFIG)
    b = batch(6, H=6, B=24)
    labels = (b["cand_item"] % 2).float()
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(**b), labels) + m.auxiliary_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
