"""MCQM (dmqn_core.models.dmqn.mcqm): assignment, pooling (eq. 9-10), straight-through, usage statistics."""

import math

import numpy as np
import pytest
import torch

from dmqn_core.models.dmqn.fused_mcqm import draw_seed, fill_gumbel
from dmqn_core.models.dmqn.mcqm import (
    CodebookUsage,
    MultiCodebookQuantizer,
    codebook_counts,
    codebook_usage,
    usage_loss,
)


def known_quantizer() -> MultiCodebookQuantizer:
    """D=2, W=3, N=2 with identity projections; codebook 0 points along +x, +y, -(x+y), codebook 1 is scaled so
    everything goes to codeword 0 or 1 by the sign of x - y."""
    q = MultiCodebookQuantizer(n_codebooks=2, codebook_size=3, dim=2)
    with torch.no_grad():
        q.proj.copy_(torch.eye(2).expand(2, 2, 2))
        q.codebooks[0] = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
        q.codebooks[1] = torch.tensor([[10.0, -10.0], [-10.0, 10.0], [0.0, 0.0]])
    return q.eval()


def test_pooling_is_mean_of_assigned_embeddings():
    q = known_quantizer()
    e = torch.tensor([[[1.0, 0.1], [3.0, 0.2], [0.1, 2.0], [-1.0, -1.0], [0.0, 0.0]]])  # (1, 5, 2)
    mask = torch.tensor([[True, True, True, True, False]])
    out = q(e, mask)
    # codebook 0: behaviors 0, 1 -> +x; 2 -> +y; 3 -> -(x+y); behavior 4 is padding.
    torch.testing.assert_close(out.clusters[0, 0], torch.tensor([[2.0, 0.15], [0.1, 2.0], [-1.0, -1.0]]))
    torch.testing.assert_close(out.cluster_size[0, 0], torch.tensor([2.0, 1.0, 1.0]))
    # codebook 1: x > y for 0, 1 -> codeword 0; 2 -> codeword 1; 3 (x == y) ties at score 0 between all three
    # codewords, argmax takes the first: codeword 0.
    torch.testing.assert_close(out.clusters[0, 1, 0], (e[0, 0] + e[0, 1] + e[0, 3]) / 3)
    torch.testing.assert_close(out.clusters[0, 1, 1], e[0, 2])
    # empty codeword: masked, size 0, exactly zero
    assert out.cluster_mask[0, 1].tolist() == [True, True, False]
    assert out.cluster_size[0, 1, 2] == 0
    assert torch.equal(out.clusters[0, 1, 2], torch.zeros(2))
    assert q.assign(e, mask)[0].tolist() == [[0, 0, 1, 2, -1], [0, 0, 1, 0, -1]]


def test_pooling_matches_loop_on_random_data():
    torch.manual_seed(0)
    H, L, D, N, W = 3, 20, 8, 3, 5
    q = MultiCodebookQuantizer(N, W, D).eval()
    mask = torch.arange(L)[None] < torch.tensor([[20], [7], [0]])
    e = torch.randn(H, L, D) * mask[..., None]
    out = q(e, mask)
    h = torch.einsum("hld,nde->hnle", e, q.proj)  # eq. 4
    z = torch.einsum("hnle,nwe->hnlw", h, q.codebooks).argmax(-1)  # eq. 5, 7
    for u in range(H):
        for j in range(N):
            for k in range(W):
                members = [e[u, i] for i in range(L) if mask[u, i] and z[u, j, i] == k]
                assert out.cluster_size[u, j, k] == len(members)
                assert bool(out.cluster_mask[u, j, k]) == bool(members)
                expected = torch.stack(members).mean(0) if members else torch.zeros(D)
                torch.testing.assert_close(out.clusters[u, j, k], expected)
    assert not out.cluster_mask[2].any()  # empty history: no cluster at all


def test_straight_through_forward_is_the_hard_gumbel_assignment():
    torch.manual_seed(1)
    H, L, D, N, W = 2, 12, 4, 2, 3
    q = MultiCodebookQuantizer(N, W, D, tau=0.7).train()
    mask = torch.arange(L)[None] < torch.tensor([[12], [5]])
    e = torch.randn(H, L, D) * mask[..., None]
    torch.manual_seed(123)
    out = q(e, mask)
    # Replay the same noise: one seed from the global generator, then each history's noise from its own
    # generators (fill_gumbel); argmax of softmax((s + g) / tau) is argmax(s + g) (eq. 6-7).
    torch.manual_seed(123)
    with torch.no_grad():
        s = q.scores(e)  # (H, L, N, W)
        gumbel = fill_gumbel(torch.empty_like(s), draw_seed(), 0)
        z = (s + gumbel).argmax(-1).transpose(1, 2)  # (H, N, L)
    for u in range(H):
        for j in range(N):
            for k in range(W):
                sel = mask[u] & (z[u, j] == k)
                assert out.cluster_size[u, j, k] == sel.sum()
                expected = e[u][sel].mean(0) if sel.any() else torch.zeros(D)
                torch.testing.assert_close(out.clusters[u, j, k], expected)


def test_gradients_reach_codebooks_and_projections_in_training():
    torch.manual_seed(2)
    q = MultiCodebookQuantizer(2, 4, 6).train()
    e = torch.randn(3, 10, 6, requires_grad=True)
    mask = torch.ones(3, 10, dtype=torch.bool)
    out = q(e, mask, with_usage=True)
    (out.clusters * torch.randn_like(out.clusters)).sum().backward()
    for name, p in [("codebooks", q.codebooks), ("proj", q.proj), ("e", e)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert out.mean_prob.shape == (2, 4)
    torch.testing.assert_close(out.mean_prob.sum(-1), torch.ones(2))


def test_eval_is_deterministic_and_training_is_seeded():
    q = MultiCodebookQuantizer(2, 8, 4)
    e = torch.randn(4, 30, 4)
    mask = torch.ones(4, 30, dtype=torch.bool)
    q.eval()
    assert torch.equal(q(e, mask).clusters, q(e, mask).clusters)
    q.train()
    torch.manual_seed(5)
    a = q(e, mask).clusters
    torch.manual_seed(5)
    b = q(e, mask).clusters
    assert torch.equal(a, b)


def test_usage_loss_is_zero_when_uniform_and_log_w_when_collapsed():
    assert usage_loss(torch.full((3, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.zeros(3, 4)
    collapsed[:, 1] = 1.0
    assert usage_loss(collapsed).item() == pytest.approx(math.log(4), rel=1e-6)


def test_codebook_usage_against_hand_computation():
    # codebook 0 uses codewords [0, 0, 1, 1] -> counts [2, 2, 0, 0]; codebook 1 uses [0, 0, 0, 3] -> [3, 0, 0, 1]
    a = np.array([[[0, 0, 1, 1, -1], [0, 0, 0, 3, -1]]])  # (H=1, N=2, L=5), -1 = padding
    usage = codebook_usage(a, 4)
    assert usage.counts.tolist() == [[2, 2, 0, 0], [3, 0, 0, 1]]
    assert usage.dead.tolist() == [2, 2]
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    np.testing.assert_allclose(usage.perplexity, [2.0, math.exp(h1)], rtol=1e-12)
    # accumulated counts over batches give the same statistics
    summed = CodebookUsage.from_counts(codebook_counts(a, 4) + codebook_counts(torch.as_tensor(a), 4))
    np.testing.assert_allclose(summed.perplexity, usage.perplexity)
    assert codebook_usage(np.array([[[0, 1, 2, 3]]]), 4).perplexity[0] == pytest.approx(4.0)


KNOWN_E = torch.tensor([[[1.0, 0.1], [3.0, 0.2], [0.1, 2.0], [-1.0, -1.0], [0.0, 0.0]]])  # (1, 5, 2)
KNOWN_MASK = torch.tensor([[True, True, True, True, False]])


def test_agreement_without_noise_is_one_and_margins_are_the_top_two_gap():
    q = known_quantizer()
    q.assign_noise = "none"
    stats = q.agreement(KNOWN_E, KNOWN_MASK)
    assert stats.behaviors == 4  # the padding behavior is not measured
    assert stats.agreeing.tolist() == [4, 4]
    # codebook 0 scores 10·(x, y, -x-y): gaps 10-1, 30-2, 20-1, 20-(-10); codebook 1 10·(x-y, y-x, 0): 9, 28, 19, 0
    np.testing.assert_allclose(stats.margin, [(9 + 28 + 19 + 30) / 4, (9 + 28 + 19 + 0) / 4], rtol=1e-6)
    both = stats + stats
    assert both.behaviors == 8 and both.agreement.tolist() == [1.0, 1.0]
    np.testing.assert_allclose(both.margin, stats.margin)


def test_agreement_replays_the_gumbel_draw_and_leaves_the_global_generator_alone():
    torch.manual_seed(3)
    q = MultiCodebookQuantizer(2, 4, 3)
    e = torch.randn(2, 6, 3) * 0.3
    mask = torch.arange(6)[None] < torch.tensor([[6], [4]])
    before = torch.get_rng_state()
    stats = q.agreement(e, mask, torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), before)
    with torch.no_grad():
        s = q.scores(e)  # (2, 6, 2, 4)
        # Training's sampler: one seed from the generator, then history h's noise from fill_gumbel.
        gumbel = fill_gumbel(torch.empty_like(s), draw_seed(torch.Generator().manual_seed(9)), 0)
        noisy = (s + gumbel).argmax(-1)[mask]  # (10, 2)
    assert stats.behaviors == 10
    assert stats.agreeing.tolist() == (noisy == s[mask].argmax(-1)).sum(0).tolist()
    assert 0 < stats.agreeing.sum() < 20  # small scores against the noise: some disagree, some agree


@pytest.mark.parametrize("tau_placement", ["after_noise", "before_noise"])
def test_the_diagnostics_draw_the_codewords_a_training_step_with_the_same_seed_draws(tau_placement: str):
    torch.manual_seed(6)
    q = MultiCodebookQuantizer(2, 5, 3, tau=0.5, tau_placement=tau_placement)
    e = torch.randn(3, 8, 3) * 0.3
    mask = torch.arange(8)[None] < torch.tensor([[8], [5], [1]])
    with torch.no_grad():
        z = q.training_logits(q.scores(e), torch.Generator().manual_seed(4)).argmax(-1)  # (H, L, N)
        torch.manual_seed(4)  # the global generator in the state of that generator: the same seed
        size = q.train()(e * mask[..., None], mask).cluster_size  # (H, N, W)
    assert torch.equal(size, (torch.nn.functional.one_hot(z, 5) * mask[..., None, None]).sum(1).float())


def test_tau_after_the_noise_leaves_the_sampled_codeword_unchanged_before_the_noise_anneals_it():
    q = known_quantizer()
    s = q.scores(KNOWN_E)[KNOWN_MASK] / 40  # (4, 2, 3) small scores (gaps <= 0.75): the noise decides often
    for placement in ("after_noise", "before_noise"):
        q.tau_placement = placement
        picks = {}
        for tau in (1.0, 1e-3):
            q.set_tau(tau)
            picks[tau] = [q.training_logits(s, torch.Generator().manual_seed(k)).argmax(-1) for k in range(200)]
        same = all(torch.equal(a, b) for a, b in zip(picks[1.0], picks[1e-3]))
        if placement == "after_noise":
            assert same  # (s + g) / tau: the same argmax whatever tau
        else:
            assert not same
            # s / tau + g with tau = 1e-3: gaps of 0.2 or more become 200, beyond any Gumbel draw in float32
            # (at most about 16.6 apart), so every draw is the argmax except codebook 1's tie at behavior 3.
            argmax = s.argmax(-1)
            for z in picks[1e-3]:
                assert torch.equal(z[:3], argmax[:3]) and z[3, 0] == argmax[3, 0]


def test_no_noise_trains_on_the_inference_assignment():
    q = known_quantizer()
    q.assign_noise = "none"
    eval_out = q(KNOWN_E, KNOWN_MASK)
    train_out = q.train()(KNOWN_E, KNOWN_MASK)
    assert torch.equal(train_out.clusters, eval_out.clusters)
    assert torch.equal(train_out.cluster_size, eval_out.cluster_size)


@pytest.mark.parametrize("straight_through", ["plain", "centred"])
def test_straight_through_gradient_into_the_assignment_probabilities(straight_through: str):
    """d clusters_k / d prob_lk is e_l / n_k ("plain") or (e_l - r_k) / n_k ("centred"); the forward is the same."""
    torch.manual_seed(4)
    H, L, D, N, W = 2, 7, 3, 2, 3
    q = MultiCodebookQuantizer(N, W, D, tau=0.5, assign_noise="none", straight_through=straight_through).train()
    e = torch.randn(H, L, D)
    mask = torch.arange(L)[None] < torch.tensor([[7], [4]])
    e = e * mask[..., None]
    g = torch.randn(H, N, W, D)  # dLoss/dclusters
    out = q(e, mask)
    (out.clusters * g).sum().backward()
    torch.testing.assert_close(out.clusters, q.eval()(e, mask).clusters, rtol=0, atol=0)

    # The same gradient from a surrogate: sum_lk prob_lk · <pull_lk, g_k> / n_k with prob = softmax(s / tau).
    surrogate = MultiCodebookQuantizer(N, W, D, tau=0.5)
    surrogate.load_state_dict(q.state_dict())
    prob = (surrogate.scores(e) / 0.5).softmax(-1)  # (H, L, N, W)
    n = out.cluster_size.clamp(min=1)  # (H, N, W)
    pull = e[:, :, None, None, :].expand(H, L, N, W, D)
    if straight_through == "centred":
        pull = pull - out.clusters.detach()[:, None]
    weight = (pull * g[:, None]).sum(-1) / n[:, None] * mask[:, :, None, None]  # (H, L, N, W)
    (prob * weight).sum().backward()
    torch.testing.assert_close(q.codebooks.grad, surrogate.codebooks.grad)
    torch.testing.assert_close(q.proj.grad, surrogate.proj.grad)


def test_options_are_checked():
    with pytest.raises(ValueError, match="assign_noise"):
        MultiCodebookQuantizer(1, 2, 2, assign_noise="uniform")
    with pytest.raises(ValueError, match="straight_through"):
        MultiCodebookQuantizer(1, 2, 2, straight_through="centered")


def test_a_single_codeword_always_agrees_with_zero_margin():
    q = MultiCodebookQuantizer(n_codebooks=2, codebook_size=1, dim=2)
    stats = q.agreement(KNOWN_E, KNOWN_MASK, torch.Generator().manual_seed(0))
    assert stats.agreement.tolist() == [1.0, 1.0] and stats.margin.tolist() == [0.0, 0.0]


def blobs(centres: torch.Tensor, per_blob: int, seed: int = 0) -> torch.Tensor:
    """(C, D) centres -> (C per_blob, D) points scattered tightly around them, blob-major."""
    g = torch.Generator().manual_seed(seed)
    noise = 0.05 * torch.randn(centres.shape[0], per_blob, centres.shape[1], generator=g)
    return (centres[:, None, :] + noise).reshape(-1, centres.shape[1])


def test_kmeans_init_gives_each_well_separated_blob_its_own_codeword():
    N, W, D = 3, 4, 3
    # Four directions far apart, at different norms: the init clusters directions, which the dot-product
    # scores can separate whatever the norms.
    centres = torch.tensor([[5.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0], [-2.0, -2.0, -2.0]])
    e = blobs(centres, 50)
    q = MultiCodebookQuantizer(N, W, D)
    with torch.no_grad():
        q.proj.copy_(
            torch.linalg.qr(torch.randn(N, D, D, generator=torch.Generator().manual_seed(1))).Q
        )  # non-identity projections: init solves through them
    q.init_from_data(e, torch.Generator().manual_seed(0))
    z = q.assign(e.unsqueeze(0), torch.ones(1, e.shape[0], dtype=torch.bool))[0]  # (N, M)
    for n in range(N):
        per_blob = z[n].reshape(4, 50)
        assert (per_blob == per_blob[:, :1]).all()  # one codeword per blob
        assert per_blob[:, 0].unique().numel() == 4  # and a different one for every blob
    # Folded codewords are unit directions times sqrt(D), the norm the random init has on average.
    norms = q.folded_codebooks().norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(D)), atol=1e-4)


def test_kmeans_init_reseeds_empty_clusters_and_is_reproducible():
    # Two blobs, four codewords: Lloyd leaves clusters empty, which are re-seeded rather than left at zero.
    e = blobs(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 20)
    first, second = MultiCodebookQuantizer(2, 4, 2), MultiCodebookQuantizer(2, 4, 2)
    second.load_state_dict(first.state_dict())
    first.init_from_data(e, torch.Generator().manual_seed(5))
    second.init_from_data(e, torch.Generator().manual_seed(5))
    assert torch.equal(first.codebooks, second.codebooks)
    assert torch.isfinite(first.codebooks).all() and (first.folded_codebooks().norm(dim=-1) > 1.0).all()


def test_reset_dead_moves_unused_codewords_into_the_busiest_cluster():
    q = known_quantizer()  # codebook 0: +x, +y, -(x+y); codebook 1: sign of x - y, codeword 2 never wins
    # Behaviors along +x and +y only: codeword 2 of codebook 0 and of codebook 1 are dead.
    e = torch.cat([blobs(torch.tensor([[1.0, 0.0]]), 30), blobs(torch.tensor([[0.0, 1.0]]), 10, seed=1)])
    mask = torch.ones(1, e.shape[0], dtype=torch.bool)
    counts = torch.as_tensor(codebook_counts(q.assign(e.unsqueeze(0), mask), 3))
    assert counts[:, 2].tolist() == [0, 0] and counts[:, :2].sum(dim=1).tolist() == [40, 40]
    before = q.codebooks.detach().clone()

    reset = q.reset_dead(counts, e, torch.Generator().manual_seed(0))

    assert reset.tolist() == [[False, False, True], [False, False, True]]
    assert torch.equal(q.codebooks[:, :2], before[:, :2])  # live codewords untouched
    folded = q.folded_codebooks()
    # Codebook 0's +x cluster holds 30 of 40 behaviors: draws in proportion to counts land on +x or +y,
    # the new codeword points along a behavior with the busiest codeword's norm, and now wins behaviors.
    assert torch.allclose(folded[0, 2].norm(), folded[0, 0].norm())
    assert torch.nn.functional.cosine_similarity(folded[0, 2], e, dim=-1).max() > 0.99
    after = torch.as_tensor(codebook_counts(q.assign(e.unsqueeze(0), mask), 3))
    assert (after[:, 2] > 0).all()


def test_reset_dead_leaves_a_fully_used_codebook_alone():
    q = known_quantizer()
    before = q.codebooks.detach().clone()
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    reset = q.reset_dead(torch.ones(2, 3, dtype=torch.int64), e, torch.Generator().manual_seed(0))
    assert not reset.any() and torch.equal(q.codebooks, before)


def test_an_eval_forward_keeps_the_inference_codewords_and_training_keeps_none():
    """DMQN reads them for cluster_categories instead of a second argmax: they must be assign()'s exactly."""
    q = MultiCodebookQuantizer(3, 8, 4)
    e = torch.randn(5, 30, 4)
    mask = torch.arange(30) < torch.tensor([30, 12, 0, 1, 29]).unsqueeze(1)  # (5, 30), one empty history
    e = e * mask.unsqueeze(-1)
    q.eval()
    out = q(e, mask)
    assert out.codeword is not None and torch.equal(out.codeword, q.assign(e, mask))
    assert (out.codeword[2] == -1).all() and (out.codeword[1, :, 12:] == -1).all()
    assert q.train()(e, mask).codeword is None
