"""CTAM (dmqn_core.attention): weights against a manual softmax, empty clusters, empty users."""

import math

import pytest
import torch

from dmqn_core.attention import ClusterTargetAttention


def setup(seed: int = 0, B: int = 3, N: int = 2, W: int = 5, D: int = 4):
    torch.manual_seed(seed)
    mask = torch.rand(B, N, W) < 0.6
    mask[0, 0] = torch.tensor([True, False, True, False, False])
    size = torch.randint(1, 50, (B, N, W)).float() * mask
    clusters = torch.randn(B, N, W, D) * mask[..., None]
    return torch.randn(B, D), clusters, mask, size


@pytest.mark.parametrize("size_bias", [True, False])
def test_weights_are_a_softmax_over_non_empty_clusters(size_bias: bool):
    cand, clusters, mask, size = setup()
    ctam = ClusterTargetAttention(2, 4, size_bias=size_bias)
    interest, w = ctam(cand, clusters, mask, size, return_weights=True)
    B, N, W, D = clusters.shape
    for b in range(B):
        for j in range(N):
            real = [k for k in range(W) if mask[b, j, k]]
            if not real:
                assert torch.equal(w[b, j], torch.zeros(W)) and torch.equal(interest[b, j], torch.zeros(D))
                continue
            q = cand[b] @ ctam.wq[j]
            logits = torch.stack([q @ (clusters[b, j, k] @ ctam.wk[j]) / math.sqrt(D) for k in real])
            if size_bias:
                logits = logits + torch.log(size[b, j, real])
            expected = torch.zeros(W)
            expected[real] = torch.softmax(logits, 0)
            torch.testing.assert_close(w[b, j], expected)
            v = torch.stack([clusters[b, j, k] @ ctam.wv[j] for k in real])
            torch.testing.assert_close(interest[b, j], expected[real] @ v)
    assert torch.equal(w * ~mask, torch.zeros_like(w))


def test_size_bias_equals_attention_over_all_behaviors():
    """A cluster of n behaviors weighs like n behaviors sharing that cluster's key."""
    cand, clusters, mask, size = setup(seed=1)
    ctam = ClusterTargetAttention(2, 4, size_bias=True)
    _, w = ctam(cand, clusters, mask, size, return_weights=True)
    plain = ClusterTargetAttention(2, 4, size_bias=False)
    plain.load_state_dict(ctam.state_dict())
    _, w_plain = plain(cand, clusters, mask, size, return_weights=True)
    expected = w_plain * size
    expected = expected / expected.sum(-1, keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(w, expected)


def test_user_without_clusters_gets_zero_interest_and_finite_gradients():
    cand, clusters, mask, size = setup(seed=2)
    mask[1] = False
    size[1] = 0
    clusters = (clusters * mask[..., None]).requires_grad_()
    ctam = ClusterTargetAttention(2, 4)
    interest, w = ctam(cand, clusters, mask, size, return_weights=True)
    assert torch.equal(interest[1], torch.zeros(2, 4))
    assert torch.equal(w[1], torch.zeros(2, 5))
    interest.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (clusters, ctam.wq, ctam.wk, ctam.wv))


def test_dropping_and_reordering_empty_clusters_changes_nothing():
    cand, clusters, mask, size = setup(seed=3)
    ctam = ClusterTargetAttention(2, 4)
    ref = ctam(cand, clusters, mask, size)
    perm = torch.randperm(5)
    torch.testing.assert_close(ctam(cand, clusters[:, :, perm], mask[:, :, perm], size[:, :, perm]), ref)
    pad = torch.zeros(3, 2, 3)
    more = ctam(
        cand,
        torch.cat([clusters, torch.zeros(3, 2, 3, 4)], 2),
        torch.cat([mask, pad.bool()], 2),
        torch.cat([size, pad], 2),
    )
    torch.testing.assert_close(more, ref, rtol=0, atol=1e-6)
