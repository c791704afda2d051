"""MCQM's reference: the plain PyTorch of eq. 3-10 that the fused path (fused_mcqm.py) is tested against.

The production quantizer (mcqm.MultiCodebookQuantizer) trains through FusedQuantize, which folds
the projection into the codebooks, works over chunks of histories, pools by scatter-add, writes its
backward out by hand and regenerates its noise there. This module computes the same thing the
slowest obvious way: whole (H, L, N, W) tensors, the projection applied as eq. 4 writes it, a
one-hot pooling, and autograd for every gradient. It shares no function with fused_mcqm.py (it
imports torch and the option names only), so a test that compares the two compares two
implementations, as generative-recommenders keeps ops/pytorch/pt_hstu_attention.py apart from its
Triton kernel. Nothing in training or serving calls it.

It draws no noise: the Gumbel noise g of eq. 6 is an argument. Production has one sampler,
fused_mcqm.fill_gumbel, whose noise for history h depends only on a seed and h, so a test hands
this function fill_gumbel(seed) over the whole batch, which is what the fused path draws chunk by
chunk under that seed; the sampler itself is tested on its own (tests/models/dmqn/test_fused_mcqm.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dmqn_core.config import ASSIGN_NOISES, STRAIGHT_THROUGH, TAU_PLACEMENTS


class Quantized(NamedTuple):
    """What quantize returns: MultiCodebookQuantizer's training output, less the mask (cluster_size > 0)."""

    clusters: Tensor  # (H, N, W, D) r_k of eq. 9-10, exactly 0 at empty codewords
    cluster_size: Tensor  # (H, N, W) float, behaviors assigned to each codeword (no gradient)
    mean_prob: Tensor  # (N, W) eq. 6's probabilities averaged over the real behaviors of the batch


def quantize(
    e: Tensor,
    mask: Tensor,
    codebooks: Tensor,
    proj: Tensor,
    *,
    tau: float,
    assign_noise: str,
    tau_placement: str,
    straight_through: str,
    gumbel: Tensor | None = None,
) -> Quantized:
    """MCQM's training path: e (H, L, D), mask (H, L) bool (True = real behavior), codebooks c (N, W, D),
    projections W_2 (N, D, D) and, with assign_noise="gumbel", the noise g (H, L, N, W) -> Quantized.

    The options are MultiCodebookQuantizer's (see its docstring). The forward values are the hard
    assignment's; gradients reach e, codebooks and proj through the straight-through estimator.
    With assign_noise="none" the values are also those of the inference path (argmax, eq. 7-8).
    """
    for name, value, choices in (
        ("assign_noise", assign_noise, ASSIGN_NOISES),
        ("tau_placement", tau_placement, TAU_PLACEMENTS),
        ("straight_through", straight_through, STRAIGHT_THROUGH),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if (gumbel is None) != (assign_noise == "none"):
        raise ValueError("gumbel noise is given exactly when assign_noise is 'gumbel'")
    W = codebooks.shape[1]
    valid = mask.to(e.dtype)[:, :, None, None]  # (H, L, 1, 1) 1 = real behavior, 0 = padding

    # eq. 4: h = e W_2, one projection per codebook.
    h = torch.einsum("hld,nde->hlne", e, proj)  # (H, L, N, D)
    # eq. 5: score = h c^T, the dot product of each projected behavior with each codeword of its codebook.
    s = torch.einsum("hlnd,nwd->hlnw", h, codebooks)  # (H, L, N, W)

    # eq. 6 with the scores read as logits (dot products can be negative, log(score) would not exist).
    if gumbel is None:  # assign_noise "none" (checked above)
        logits = s / tau  # (H, L, N, W)
    elif tau_placement == "after_noise":
        logits = (s + gumbel) / tau  # (H, L, N, W) as eq. 6 writes it
    else:
        logits = s / tau + gumbel  # (H, L, N, W) a sample of softmax(s / tau)
    prob = torch.softmax(logits, dim=-1)  # (H, L, N, W)

    # eq. 7-8: z = argmax_k prob_k, which is the argmax of the logits (softmax is increasing); without
    # noise that is the argmax of the scores themselves (tau > 0), the codeword inference takes.
    z = (s if assign_noise == "none" else logits).argmax(dim=-1)  # (H, L, N)
    hard = torch.nn.functional.one_hot(z, W).to(e.dtype) * valid  # (H, L, N, W), all-zero rows at padding

    # Straight-through: soft is exactly 0 in value, so the assignment's value is `hard`, and its
    # gradient is that of prob; padding is multiplied out, so it gets no gradient.
    soft = (prob - prob.detach()) * valid  # (H, L, N, W)
    assignment = hard + soft  # (H, L, N, W)

    # eq. 9-10: r_k = mean of the ORIGINAL embeddings e_l with z_l = k, not of the projected h: the
    # projection only serves the assignment, e lives in the candidate's space. n_k is clamped to 1 so
    # that an empty codeword's r_k is exactly 0; its straight-through gradient is then one behavior's.
    size = hard.sum(dim=1)  # (H, N, W) n_k
    n = size.clamp(min=1.0)[..., None]  # (H, N, W, 1)
    clusters = torch.einsum("hlnw,hld->hnwd", assignment, e) / n  # (H, N, W, D)
    if straight_through == "centred":
        # Subtract r_k (detached) times the summed soft weights, exactly 0 in value: the gradient into
        # prob_lk becomes (e_l - r_k) / n_k instead of e_l / n_k.
        clusters = clusters - soft.sum(dim=1)[..., None] / n * clusters.detach()  # (H, N, W, D)

    # The usage regulariser's input: prob of eq. 6 averaged over the batch's real behaviors.
    n_real = mask.sum().clamp(min=1).to(e.dtype)
    mean_prob = (prob * valid).sum(dim=(0, 1)) / n_real  # (N, W)
    return Quantized(clusters=clusters, cluster_size=size.detach(), mean_prob=mean_prob)
