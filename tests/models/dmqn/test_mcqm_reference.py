"""MCQM's reference (dmqn_core.models.dmqn.mcqm_reference) on a hand-computed example, and its argument checks.

test_fused_mcqm.py compares it with the fused path; this grounds it in arithmetic done by hand.
"""

import pytest
import torch

from dmqn_core.models.dmqn.mcqm_reference import quantize

# D = 2, one codebook of W = 4 codewords: +x, +y, -(x + y) and -y, which no behavior below is nearest to.
CODEBOOKS = torch.tensor([[[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0], [0.0, -10.0]]])  # (1, 4, 2)
PROJ = torch.eye(2)[None]  # (1, 2, 2)
# Scores (e W_2 c^T): behavior 0 (10, 1, -11, -1), 1 (30, 2, -32, -2), 2 (1, 20, -21, -20), 3 (-10, -10, 20, 10).
E = torch.tensor([[[1.0, 0.1], [3.0, 0.2], [0.1, 2.0], [-1.0, -1.0], [5.0, 5.0]]])  # (1, 5, 2)
MASK = torch.tensor([[True, True, True, True, False]])  # behavior 4 is padding, its values must not count
OPTIONS = dict(tau=0.5, tau_placement="after_noise", straight_through="plain")


def test_the_clusters_are_the_means_of_the_behaviors_nearest_each_codeword():
    out = quantize(E, MASK, CODEBOOKS, PROJ, assign_noise="none", **OPTIONS)
    assert out.cluster_size.tolist() == [[[2.0, 1.0, 1.0, 0.0]]]
    expected = torch.tensor([[2.0, 0.15], [0.1, 2.0], [-1.0, -1.0], [0.0, 0.0]])  # the empty codeword exactly 0
    torch.testing.assert_close(out.clusters[0, 0], expected, rtol=0.0, atol=0.0)
    # eq. 6's probabilities of the four real behaviors, averaged: softmax(s / tau) per behavior.
    scores = torch.tensor([[10.0, 1, -11, -1], [30, 2, -32, -2], [1, 20, -21, -20], [-10, -10, 20, 10]])
    torch.testing.assert_close(out.mean_prob[0], (scores / 0.5).softmax(-1).mean(0))


def test_gumbel_noise_picks_the_codeword_and_tau_placement_decides_how_much_it_weighs():
    gumbel = torch.zeros(1, 5, 1, 4)
    gumbel[0, 0, 0, 3] = 12.0  # behavior 0: 10 against -1 + 12 = 11 for codeword 3 (scores 10, 1, -11, -1)
    after = quantize(E, MASK, CODEBOOKS, PROJ, assign_noise="gumbel", gumbel=gumbel, **OPTIONS)
    assert after.cluster_size.tolist() == [[[1.0, 1.0, 1.0, 1.0]]]
    torch.testing.assert_close(after.clusters[0, 0, 3], E[0, 0])
    # s / tau + g: the scores count twice at tau = 0.5, 20 against -2 + 12 = 10, and behavior 0 stays at +x.
    before = quantize(
        E, MASK, CODEBOOKS, PROJ, assign_noise="gumbel", gumbel=gumbel, **OPTIONS | {"tau_placement": "before_noise"}
    )
    assert before.cluster_size.tolist() == [[[2.0, 1.0, 1.0, 0.0]]]


def test_the_options_and_the_noise_are_checked():
    with pytest.raises(ValueError, match="straight_through"):
        quantize(E, MASK, CODEBOOKS, PROJ, assign_noise="none", **OPTIONS | {"straight_through": "centered"})
    with pytest.raises(ValueError, match="gumbel noise"):
        quantize(E, MASK, CODEBOOKS, PROJ, assign_noise="gumbel", **OPTIONS)
    with pytest.raises(ValueError, match="gumbel noise"):
        quantize(E, MASK, CODEBOOKS, PROJ, assign_noise="none", gumbel=torch.zeros(1, 5, 1, 4), **OPTIONS)
