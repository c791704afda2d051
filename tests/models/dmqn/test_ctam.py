"""CTAM (dmqn_core.models.dmqn.ctam): weights and match against manual computations, empty clusters, empty users."""

import math

import pytest
import torch

from dmqn_core.models.dmqn.ctam import ClusterTargetAttention


def setup(seed: int = 0, B: int = 3, N: int = 2, W: int = 5, D: int = 4):
    torch.manual_seed(seed)
    mask = torch.rand(B, N, W) < 0.6
    mask[0, 0] = torch.tensor([True, False, True, False, False])
    size = torch.randint(1, 50, (B, N, W)).float() * mask
    clusters = torch.randn(B, N, W, D) * mask[..., None]
    return torch.randn(B, D), clusters, mask, size


def randomise(ctam: ClusterTargetAttention, seed: int = 100) -> ClusterTargetAttention:
    """Replace the identity-based initial projections by random ones, so that a test does not pass
    only because W_q, W_k and W_v are multiples of the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (ctam.wq, ctam.wk, ctam.wv):
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.shape[-1]))
    return ctam


@pytest.mark.parametrize("size_bias", [True, False])
def test_weights_are_a_softmax_over_non_empty_clusters(size_bias: bool):
    cand, clusters, mask, size = setup()
    ctam = randomise(ClusterTargetAttention(2, 4, size_bias=size_bias))
    interest, _, w = ctam(cand, clusters, mask, size)
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
    ctam = randomise(ClusterTargetAttention(2, 4, size_bias=True))
    _, _, w = ctam(cand, clusters, mask, size)
    plain = ClusterTargetAttention(2, 4, size_bias=False)
    plain.load_state_dict(ctam.state_dict())
    _, _, w_plain = plain(cand, clusters, mask, size)
    expected = w_plain * size
    expected = expected / expected.sum(-1, keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(w, expected)


def test_user_without_clusters_gets_zero_interest_and_finite_gradients():
    cand, clusters, mask, size = setup(seed=2)
    mask[1] = False
    size[1] = 0
    clusters = (clusters * mask[..., None]).requires_grad_()
    ctam = randomise(ClusterTargetAttention(2, 4))
    interest, match, w = ctam(cand, clusters, mask, size)
    assert torch.equal(interest[1], torch.zeros(2, 4))
    assert torch.equal(w[1], torch.zeros(2, 5))
    assert torch.equal(match[1], torch.zeros(2))
    (interest.sum() + match.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in (clusters, ctam.wq, ctam.wk, ctam.wv))


def test_dropping_and_reordering_empty_clusters_changes_nothing():
    cand, clusters, mask, size = setup(seed=3)
    ctam = randomise(ClusterTargetAttention(2, 4))
    ref, ref_match, ref_w = ctam(cand, clusters, mask, size)
    perm = torch.randperm(5)
    interest, match, w = ctam(cand, clusters[:, :, perm], mask[:, :, perm], size[:, :, perm])
    torch.testing.assert_close(interest, ref)
    torch.testing.assert_close(match, ref_match)
    torch.testing.assert_close(w, ref_w[:, :, perm])
    pad = torch.zeros(3, 2, 3)
    more, more_match, more_w = ctam(
        cand,
        torch.cat([clusters, torch.zeros(3, 2, 3, 4)], 2),
        torch.cat([mask, pad.bool()], 2),
        torch.cat([size, pad], 2),
    )
    torch.testing.assert_close(more, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(more_match, ref_match, rtol=0, atol=1e-6)
    torch.testing.assert_close(more_w, torch.cat([ref_w, pad], 2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size_bias", [True, False])
def test_match_equals_a_manual_log_mean_exp(size_bias: bool):
    """match = logsumexp over non-empty clusters of the logits (+ log n_k with the size bias) minus
    log(total), total = sum of n_k (size bias) or the number of non-empty clusters; 0 without any."""
    cand, clusters, mask, size = setup(seed=4)
    mask[2, 1] = False  # one (user, codebook) row with no non-empty cluster
    size = size * mask
    clusters = (clusters * mask[..., None]).requires_grad_()
    ctam = randomise(ClusterTargetAttention(2, 4, size_bias=size_bias), seed=101)
    _, match, _ = ctam(cand, clusters, mask, size)
    B, N, W, D = clusters.shape
    assert match.shape == (B, N)
    for b in range(B):
        for j in range(N):
            real = [k for k in range(W) if mask[b, j, k]]
            if not real:
                assert match[b, j].item() == 0.0
                continue
            q = cand[b] @ ctam.wq[j]
            terms, total = [], 0.0
            for k in real:
                s = q @ (clusters[b, j, k] @ ctam.wk[j]) / math.sqrt(D)
                if size_bias:
                    s = s + math.log(size[b, j, k].item())
                    total += size[b, j, k].item()
                else:
                    total += 1.0
                terms.append(torch.exp(s))
            expected = torch.log(torch.stack(terms).sum()) - math.log(total)
            torch.testing.assert_close(match[b, j], expected.detach())
    assert torch.isfinite(match).all()
    match.sum().backward()  # match does not depend on W_v
    for p in (clusters, ctam.wq, ctam.wk):
        assert not torch.isnan(p.grad).any() and torch.isfinite(p.grad).all()
    assert torch.equal(clusters.grad[2, 1], torch.zeros(W, D))


@pytest.mark.parametrize("size_bias", [True, False])
def test_initial_logits_are_the_plain_dot_product(size_bias: bool):
    """At initialisation W_q = W_k = D^(1/4) I and W_v = I: the logits q.k/sqrt(D) equal c.y."""
    cand, clusters, mask, size = setup(seed=5, D=6)
    torch.manual_seed(0)
    ctam = ClusterTargetAttention(2, 6, size_bias=size_bias)
    interest, match, w = ctam(cand, clusters, mask, size)
    B, N, W, D = clusters.shape
    for b in range(B):
        for j in range(N):
            real = [k for k in range(W) if mask[b, j, k]]
            if not real:
                assert torch.equal(w[b, j], torch.zeros(W)) and match[b, j].item() == 0.0
                continue
            logits = torch.stack([torch.dot(cand[b], clusters[b, j, k]) for k in real])
            if size_bias:
                logits = logits + torch.log(size[b, j, real])
                total = size[b, j, real].sum()
            else:
                total = torch.tensor(float(len(real)))
            expected = torch.zeros(W)
            expected[real] = torch.softmax(logits, 0)
            torch.testing.assert_close(w[b, j], expected)
            torch.testing.assert_close(interest[b, j], expected[real] @ clusters[b, j, real])  # W_v = I
            torch.testing.assert_close(match[b, j], torch.logsumexp(logits, 0) - total.log())


def test_without_identity_init_the_projections_start_random_like_nn_linear():
    """identity_init=False: every W_q, W_k, W_v is U(-1/sqrt(D), 1/sqrt(D)), no multiple of the identity,
    and the first logits are no longer the plain dot product c.y."""
    N, D = 3, 16
    torch.manual_seed(0)
    ctam = ClusterTargetAttention(N, D, size_bias=False, identity_init=False)
    bound = D**-0.5
    for w in (ctam.wq, ctam.wk, ctam.wv):
        off_diagonal = w[:, ~torch.eye(D, dtype=torch.bool)]  # (N, D*D - D)
        assert off_diagonal.abs().min() > 0 and w.abs().max() <= bound
        # the std of U(-a, a) is a / sqrt(3): 768 draws per matrix pin it within a few percent
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
        assert not torch.equal(ctam.wq[0], ctam.wq[1])  # each codebook its own matrix
    cand, clusters, mask, size = setup(seed=5, N=N, D=D)
    _, _, w = ctam(cand, clusters, mask, size)
    real = mask[0, 0]
    dot_product = torch.softmax(clusters[0, 0, real] @ cand[0], 0)
    assert (w[0, 0, real] - dot_product).abs().max() > 1e-3
