"""SDIM (dmqn_core.models.sdim): hash buckets, bucket sums and the sampled interest against loops, the model."""

import pytest
import torch
import torch.nn.functional as F
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.sdim import SDIM, bucket_sums, hash_buckets, sampled_interest

CONFIG = ModelConfig(
    n_items=400,
    n_categories=6,
    n_behavior_types=3,
    embed_dim=8,
    short_len=2,
    sdim_rounds=5,
    sdim_bits=2,
    mlp_hidden=(16, 8),
    # The model's own mechanism alone; match features, the DIN short term, the time embedding and the clusters'
    # categories have their own tests.
    match_features=False,
    short_term=None,
    behavior_time=False,
    cluster_categories=0,
)


def model(seed: int = 0, config: ModelConfig = CONFIG) -> SDIM:
    torch.manual_seed(seed)
    return SDIM(config)


def manual_interest(e, hist_buckets, hist_mask, hist_index, cand_buckets):
    """Python loops: per candidate and round, the l2-normalised sum of same-bucket behaviors; mean of rounds."""
    out = []
    for b, h in enumerate(hist_index.tolist()):
        rounds = []
        for r in range(cand_buckets.shape[1]):
            pooled = torch.zeros(e.shape[-1])
            for l in range(e.shape[1]):
                if hist_mask[h, l] and hist_buckets[h, l, r] == cand_buckets[b, r]:
                    pooled = pooled + e[h, l]
            norm = pooled.norm()
            rounds.append(pooled / norm if norm > 0 else pooled)
        out.append(torch.stack(rounds).mean(0))
    return torch.stack(out)


def test_hash_buckets_read_the_sign_bits_of_each_round_as_a_number():
    torch.manual_seed(0)
    x, planes = torch.randn(3, 4, 6), torch.randn(6, 4 * 3)  # 4 rounds of 3 bits
    buckets = hash_buckets(x, planes, rounds=4)
    assert buckets.shape == (3, 4, 4) and buckets.dtype == torch.long
    proj = x @ planes
    for i in range(3):
        for j in range(4):
            for r in range(4):
                bits = [int(proj[i, j, 3 * r + t] > 0) for t in range(3)]
                assert buckets[i, j, r] == bits[0] + 2 * bits[1] + 4 * bits[2]


def test_bucket_sums_equal_a_loop():
    g = torch.Generator().manual_seed(1)
    H, L, m, n, D = 3, 7, 4, 4, 5
    mask = torch.arange(L)[None] < torch.tensor([7, 0, 3])[:, None]
    e = torch.randn(H, L, D, generator=g) * mask[..., None]
    buckets = torch.randint(0, n, (H, L, m), generator=g)
    sums = bucket_sums(e, buckets, n)
    assert sums.shape == (H, m, n, D)
    for h in range(H):
        for r in range(m):
            for k in range(n):
                expected = sum((e[h, l] for l in range(L) if mask[h, l] and buckets[h, l, r] == k), torch.zeros(D))
                torch.testing.assert_close(sums[h, r, k], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(sums[1], torch.zeros(m, n, D))  # the empty history


def test_sampled_interest_equals_a_loop_and_other_buckets_do_not_contribute():
    g = torch.Generator().manual_seed(2)
    H, L, m, n, D, B = 3, 8, 5, 4, 6, 7
    mask = torch.arange(L)[None] < torch.tensor([8, 5, 0])[:, None]
    e = torch.randn(H, L, D, generator=g) * mask[..., None]
    hist_buckets = torch.randint(0, n, (H, L, m), generator=g)
    hist_index = torch.tensor([0, 0, 1, 2, 1, 0, 2])
    cand_buckets = torch.randint(0, n, (B, m), generator=g)
    # Candidate 1 (history 0) collides with nothing: no behavior of history 0 is in bucket n - 1.
    cand_buckets[1] = n - 1
    hist_buckets[0] = torch.where(hist_buckets[0] == n - 1, 0, hist_buckets[0])
    interest = sampled_interest(bucket_sums(e, hist_buckets, n), hist_index, cand_buckets)
    torch.testing.assert_close(
        interest, manual_interest(e, hist_buckets, mask, hist_index, cand_buckets), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(interest[1], torch.zeros(D))
    assert torch.equal(interest[3], torch.zeros(D)) and torch.equal(interest[6], torch.zeros(D))  # empty history
    # Moving behavior 4 of history 0 changes the interest of exactly the candidates it collides with.
    moved = e.clone()
    moved[0, 4] += torch.randn(D, generator=g)
    after = sampled_interest(bucket_sums(moved, hist_buckets, n), hist_index, cand_buckets)
    changed = (after - interest).abs().sum(-1) > 0
    collides = (hist_index == 0) & (hist_buckets[0, 4].unsqueeze(0) == cand_buckets).any(dim=1)
    assert torch.equal(changed, collides) and collides.any()


def test_projection_is_fixed_seeded_and_not_trained():
    a, b = model(0), model(1)
    assert torch.equal(a.planes, b.planes) and a.planes.shape == (8, 5 * 2)
    assert all(p is not a.planes for p in a.parameters())
    assert "planes" in a.state_dict()


def test_empty_history_gives_a_zero_long_term_interest():
    m = model(3).eval()
    b = random_batch(CONFIG, seed=3)
    with torch.no_grad():
        e = m.embedding.behaviors(b["hist_item"], b["hist_category"], b["hist_behavior"], b["hist_mask"])
        buckets = hash_buckets(m.embedding.candidate(b["hist_item"], b["hist_category"]), m.planes, CONFIG.sdim_rounds)
        cand = hash_buckets(m.embedding.candidate(b["cand_item"], b["cand_category"]), m.planes, CONFIG.sdim_rounds)
        interest = sampled_interest(bucket_sums(e, buckets, 4), b["hist_index"], cand)
    empty = b["hist_index"] == 1
    assert empty.any() and torch.equal(interest[empty], torch.zeros(int(empty.sum()), 8))
    assert (interest[~empty].abs().sum(-1) > 0).any()


def test_gradients_reach_the_colliding_behaviors_and_stay_finite():
    m = model(5)
    b = random_batch(CONFIG, seed=6, lengths=[10, 0], B=2, distinct_items=True)
    b["hist_index"], b["cand_item"] = torch.tensor([0, 1]), torch.tensor([300, 301])  # not in the history
    F.binary_cross_entropy_with_logits(m(**b), torch.tensor([1.0, 0.0])).backward()
    with torch.no_grad():
        buckets = hash_buckets(m.embedding.candidate(b["hist_item"], b["hist_category"]), m.planes, CONFIG.sdim_rounds)
        cand = hash_buckets(m.embedding.candidate(b["cand_item"], b["cand_category"]), m.planes, CONFIG.sdim_rounds)
    collides = (buckets[0] == cand[0]).any(dim=1)  # (L,)
    grad = m.embedding.item.weight.grad
    for l in range(8):  # outside the short window: a gradient exactly where some round collides
        assert (grad[int(b["hist_item"][0, l])].abs().sum() > 0) == bool(collides[l])
    assert collides[:8].any() and not collides[:8].all()
    for p in m.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("bits", [1, 3])
def test_other_bit_widths_give_finite_logits_and_gradients(bits: int):
    m = model(6, ModelConfig(**{**CONFIG.to_dict(), "sdim_bits": bits})).train()
    logits = m(**random_batch(CONFIG, seed=6))
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
