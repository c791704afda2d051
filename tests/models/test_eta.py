"""ETA (dmqn_core.models.eta): SimHash signatures, the Hamming top-k against brute force, the model."""

import pytest
import torch
import torch.nn.functional as F
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.eta import ETA, hamming_top_k, simhash

CONFIG = ModelConfig(
    n_items=400,
    n_categories=6,
    n_behavior_types=3,
    embed_dim=8,
    attention_heads=2,
    top_k=3,
    short_len=2,
    simhash_bits=6,
    mlp_hidden=(16, 8),
    # The model's own mechanism alone; match features, the DIN short term, the time embedding and the clusters'
    # categories have their own tests.
    match_features=False,
    short_term=None,
    behavior_time=False,
    cluster_categories=0,
)


def model(seed: int = 0, config: ModelConfig = CONFIG) -> ETA:
    torch.manual_seed(seed)
    return ETA(config)


def brute_force_top_k(hist_sig, hist_mask, hist_index, cand_sig, k):
    """Python loops: Hamming distance bit by bit, the k smallest (ties: more recent first), oldest first."""
    out = []
    for b, h in enumerate(hist_index.tolist()):
        scored = []
        for l in range(hist_sig.shape[1]):
            if hist_mask[h, l]:
                d = sum(int(hist_sig[h, l, j]) != int(cand_sig[b, j]) for j in range(hist_sig.shape[2]))
                scored.append((d, -l))
        out.append(sorted(-negl for _, negl in sorted(scored)[:k]))
    return out


def test_signature_is_the_sign_of_the_projection():
    torch.manual_seed(0)
    x, planes = torch.randn(4, 7, 8), torch.randn(8, 5)
    sig = simhash(x, planes)
    assert sig.shape == (4, 7, 5) and sig.dtype == torch.bool
    assert torch.equal(sig, torch.sign(x @ planes) == 1)
    assert torch.equal(simhash(-x, planes), ~sig)  # antipodal vectors differ in every bit


def test_projection_is_fixed_seeded_and_not_trained():
    a, b = model(0), model(1)
    assert torch.equal(a.planes, b.planes) and a.planes.shape == (8, 6)
    assert all(p is not a.planes for p in a.parameters())
    assert "planes" in a.state_dict()


@pytest.mark.parametrize("k", [1, 3, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_hamming_top_k_equals_brute_force(k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    H, L, bits, B = 4, 9, 3, 10  # 3 bits for 9 behaviors: many ties
    lengths = torch.tensor([9, 0, 4, 6])
    mask = torch.arange(L)[None] < lengths[:, None]
    hist_sig = torch.rand(H, L, bits, generator=g) < 0.5
    cand_sig = torch.rand(B, bits, generator=g) < 0.5
    hist_index = torch.randint(0, H, (B,), generator=g)
    positions, valid = hamming_top_k(hist_sig, mask, hist_index, cand_sig, k)
    assert positions.shape == valid.shape == (B, min(k, L))
    expected = brute_force_top_k(hist_sig, mask, hist_index, cand_sig, k)
    assert [p[v].tolist() for p, v in zip(positions, valid)] == expected
    assert all(v[: len(e)].all() and not v[len(e) :].any() for v, e in zip(valid, expected))  # left-aligned
    assert (positions[~valid] == 0).all()


def test_ties_go_to_the_more_recent_behavior():
    hist_sig = torch.tensor([[[1, 0], [0, 0], [1, 0], [1, 1], [1, 0]]], dtype=torch.bool)
    mask = torch.tensor([[True, True, True, True, False]])  # the padding behavior matches perfectly
    positions, valid = hamming_top_k(hist_sig, mask, torch.tensor([0]), torch.tensor([[1, 0]], dtype=torch.bool), 1)
    assert positions.tolist() == [[2]] and valid.all()
    positions, _ = hamming_top_k(hist_sig, mask, torch.tensor([0]), torch.tensor([[1, 0]], dtype=torch.bool), 3)
    assert positions.tolist() == [[0, 2, 3]]  # distance 0, 0, then 1 (the more recent of 1 and 3)


def test_model_attends_to_the_hamming_nearest_behaviors():
    """With top_k = 1, only the nearest behavior outside the short window reaches the long-term path:
    changing any other old behavior leaves the logit unchanged."""
    m = model(2, ModelConfig(**{**CONFIG.to_dict(), "top_k": 1})).eval()
    b = random_batch(CONFIG, seed=2, lengths=[10], B=1)
    b["cand_item"], b["cand_category"] = b["hist_item"][:, 3], b["hist_category"][:, 3]  # distance 0 to behavior 3
    with torch.no_grad():
        sig = simhash(m.embedding.candidate(b["hist_item"], b["hist_category"]), m.planes)
        cand = simhash(m.embedding.candidate(b["cand_item"], b["cand_category"]), m.planes)
        (nearest,), _ = hamming_top_k(sig, b["hist_mask"], b["hist_index"], cand, 1)
        assert nearest < 8  # outside the short window, else the test would prove nothing
        logits = m(**b)
        for l in range(8):  # the last 2 are the short window
            # A new behavior type changes the embedding but not the signature (only item + category are hashed).
            changed = dict(b, hist_behavior=b["hist_behavior"].clone())
            changed["hist_behavior"][0, l] = 3 - changed["hist_behavior"][0, l]
            moved = (m(**changed) - logits).abs().item()
            assert (moved > 1e-7) == (l == int(nearest)), (l, int(nearest), moved)


def test_gradients_reach_the_retrieved_behaviors():
    m = model(4)
    b = random_batch(CONFIG, seed=4, lengths=[10, 0], B=2, distinct_items=True)
    b["hist_index"], b["cand_item"] = torch.tensor([0, 1]), torch.tensor([300, 301])  # not in the history
    F.binary_cross_entropy_with_logits(m(**b), torch.tensor([1.0, 0.0])).backward()
    with torch.no_grad():
        sig = simhash(m.embedding.candidate(b["hist_item"], b["hist_category"]), m.planes)
        cand = simhash(m.embedding.candidate(b["cand_item"], b["cand_category"]), m.planes)
        positions, valid = hamming_top_k(sig, b["hist_mask"], b["hist_index"], cand, CONFIG.top_k)
    grad = m.embedding.item.weight.grad
    retrieved = set(positions[0][valid[0]].tolist())
    for l in range(8):  # outside the short window: a gradient exactly where retrieved
        assert (grad[int(b["hist_item"][0, l])].abs().sum() > 0) == (l in retrieved)
    for p in (m.embedding.category.weight, m.embedding.behavior.weight):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
