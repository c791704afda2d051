"""MCQM, the Multi-Cluster Quantization Module (section 2.2, eq. 3-10).

Every behavior embedding is assigned, once per codebook, to one of W codewords; the behaviors
sharing a codeword are mean-pooled into one cluster token. N codebooks turn a history of L
behaviors into N sequences of W cluster tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ASSIGN_NOISES, STRAIGHT_THROUGH, TAU_PLACEMENTS
from dmqn_core.models.dmqn.fused_mcqm import (
    FusedQuantize,
    argmax_codewords,
    draw_seed,
    fill_gumbel,
    noisy_logits,
    pool_means,
    pool_slots,
)


@dataclass
class QuantizerOutput:
    clusters: Tensor  # (H, N, W, D) r_k of eq. 9-10, zero at empty codewords
    cluster_mask: Tensor  # (H, N, W) bool, True = at least one behavior assigned
    cluster_size: Tensor  # (H, N, W) float, number of behaviors assigned (no gradient)
    # (N, W) soft assignment probability averaged over the real behaviors of the batch;
    # only computed in training mode when asked for (it feeds usage_loss).
    mean_prob: Tensor | None
    # (H, N, L) long, -1 at padding: the inference path's codewords (eq. 7-8), kept by an eval forward
    # (None in training) so that reading them again (cluster_categories) costs no second argmax.
    codeword: Tensor | None = None


class MultiCodebookQuantizer(nn.Module):
    """MCQM. The options change the training path only; inference is always the noise-free argmax.

    assign_noise: "gumbel" samples the training codeword with Gumbel noise (eq. 6); "none" takes the
        argmax of the scores, as inference does (a plain straight-through estimator).
    tau_placement: "after_noise" divides the noisy logits by tau, (s + g) / tau, as eq. 6 is written:
        tau then leaves the sampled codeword unchanged and only sharpens the softmax whose gradient
        the straight-through estimator uses. "before_noise" samples from softmax(s / tau),
        s / tau + g: lowering tau (see set_tau) moves the training codeword toward the inference one.
    straight_through: "plain" back-propagates e_l / n_k into the assignment probability of behavior l
        and codeword k (the gradient of the mean pool with the counts held fixed); "centred" uses
        (e_l - r_k) / n_k, the change of the cluster mean r_k if behavior l joined it.

    Training runs through FusedQuantize (fused_mcqm.py); mcqm_reference.py is the plain PyTorch of the
    same equations that tests compare it with.
    """

    def __init__(
        self,
        n_codebooks: int,
        codebook_size: int,
        dim: int,
        tau: float = 1.0,
        assign_noise: str = "gumbel",
        tau_placement: str = "after_noise",
        straight_through: str = "plain",
    ) -> None:
        super().__init__()
        N, W, D = n_codebooks, codebook_size, dim
        for name, value, choices in (
            ("assign_noise", assign_noise, ASSIGN_NOISES),
            ("tau_placement", tau_placement, TAU_PLACEMENTS),
            ("straight_through", straight_through, STRAIGHT_THROUGH),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        self.tau = tau  # the temperature of the current epoch (set_tau)
        self.assign_noise = assign_noise
        self.tau_placement = tau_placement
        self.straight_through = straight_through
        # eq. 3: C = [c_1, ..., c_N], c_j in R^{W x D}
        self.codebooks = nn.Parameter(torch.empty(N, W, D))
        # eq. 4: one projection W_2^{c_j} in R^{D x D} per codebook, batched; no bias, as in eq. 4.
        self.proj = nn.Parameter(torch.empty(N, D, D))
        # Orthogonal projections keep |h| = |e|; unit-variance codewords then give initial scores
        # with standard deviation |e| (about 0.5 with the default embedding init), below the
        # Gumbel noise (std 1.28 at tau=1): training starts with the exploratory, near-uniform
        # assignment that eq. 6 is there for, and the scores sharpen as e and c grow.
        for j in range(N):
            nn.init.orthogonal_(self.proj.data[j])
        nn.init.normal_(self.codebooks, std=1.0)

    def set_tau(self, tau: float) -> None:
        """The temperature of the following training steps (DMQN.set_epoch anneals it)."""
        self.tau = tau

    def scores(self, e: Tensor) -> Tensor:
        """eq. 4-5: (H, L, D) embeddings -> (H, L, N, W) dot-product scores.

        Behavior-major layout (H, L, N, W): the scores come out of one (H L, D) x (D, N W) matmul
        without a permuting copy, and the pooling below is a batched matmul over H with no copy either.
        """
        N, W, D = self.codebooks.shape
        folded = self.folded_codebooks().reshape(N * W, D)  # (N W, D)
        return (e @ folded.T).unflatten(-1, (N, W))  # (H, L, N, W)

    def folded_codebooks(self) -> Tensor:
        """(N, W, D) codewords moved into the behavior-embedding space: score(e, w) = e · folded[n, w].

        (e W_2) c^T == e (c W_2^T)^T: folding the projection into the codebook costs O(N W D^2)
        once instead of O(H L N D^2) and never materialises h (H, L, N, D); it is also what lets
        codewords be plotted beside item embeddings (dmqn report).
        """
        return torch.einsum("nde,nwe->nwd", self.proj, self.codebooks)

    def assign(self, e: Tensor, mask: Tensor) -> Tensor:
        """Inference-path codeword of every behavior: (H, N, L) long, -1 at padding (eq. 7-8 without noise)."""
        z = argmax_codewords(e, self.folded_codebooks())  # (H, N, L)
        return z.masked_fill(~mask.unsqueeze(1), -1)

    def training_logits(self, scores: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """eq. 6 as the options sample it: (H, ..., W) scores -> (H, ..., W) logits, argmax = the training codeword.

        The noise is the training forward's own (fused_mcqm.fill_gumbel, row h of scores drawing history
        h's noise) under one seed from ``generator`` (None: torch's global generator): on (H, L, N, W)
        scores, the codewords a training step with that seed would draw. The diagnostics pass their own
        generator so that measuring leaves the training's random stream alone.
        """
        gumbel = None
        if self.assign_noise == "gumbel":
            gumbel = fill_gumbel(torch.empty_like(scores), draw_seed(generator), 0)
        return noisy_logits(scores, gumbel, self.tau, self.tau_placement)

    def forward(self, e: Tensor, mask: Tensor, with_usage: bool = False) -> QuantizerOutput:
        """e (H, L, D), zero at padding; mask (H, L) bool, True = real behavior.

        Always in fp32: under bf16 autocast (--precision bf16) a behavior's codeword, an argmax over scores
        rounded to 8 bits, would hinge on near-ties, and the fused path's backward recomputes the forward's
        scores, which must come out the same; ICIM, CTAM and the MLP after it compute in bf16.
        """
        if torch.is_autocast_enabled(e.device.type):
            with torch.autocast(e.device.type, enabled=False):
                return self.forward(e.float(), mask, with_usage)
        W = self.codebooks.shape[1]
        if not self.training:
            # Inference: the noise-free argmax (eq. 7-8) and a scatter-add mean of the assigned e (eq. 9-10).
            z = argmax_codewords(e, self.folded_codebooks())  # (H, N, L)
            clusters, size = pool_means(e, pool_slots(z, mask, W), W)
            codeword = z.masked_fill_(~mask.unsqueeze(1), -1)  # after pool_slots, which read z
            return QuantizerOutput(
                clusters=clusters, cluster_mask=size > 0, cluster_size=size, mean_prob=None, codeword=codeword
            )
        # One seed per forward from the global generator; forward and backward draw each history's noise from it.
        seed = draw_seed() if self.assign_noise == "gumbel" else 0
        clusters, size, mean_prob = FusedQuantize.apply(
            e,
            self.folded_codebooks(),
            mask,
            self.tau,
            self.assign_noise,
            self.tau_placement,
            self.straight_through == "centred",
            with_usage,
            seed,
        )
        return QuantizerOutput(
            clusters=clusters, cluster_mask=size > 0, cluster_size=size, mean_prob=mean_prob if with_usage else None
        )

    @torch.no_grad()
    def set_folded_codebooks(self, folded: Tensor, rows: Tensor | None = None) -> None:
        """Set codewords (N, W, D) given in the behavior-embedding space: the inverse of folded_codebooks.

        folded = c W_2^T per codebook, so c = folded W_2^{-T} (W_2 is orthogonal at init and stays
        invertible in practice). rows (N, W) bool: only these codewords change (default: all).
        """
        # (N, D, D) x (N, D, W) -> (N, D, W): solves W_2 c^T = folded^T for c^T.
        codebooks = torch.linalg.solve(self.proj, folded.transpose(1, 2)).transpose(1, 2)  # (N, W, D)
        if rows is None:
            self.codebooks.copy_(codebooks)
        else:
            self.codebooks[rows] = codebooks[rows]

    @torch.no_grad()
    def init_from_data(self, e: Tensor, generator: torch.Generator, iterations: int = 10) -> None:
        """codebook_init="kmeans": each codebook's codewords from k-means of the real behaviors e (M, D).

        The scores are dot products with no bias, e · f_w, so argmax_w picks the nearest centre only
        when every codeword has the same norm: |e - f|^2 = |e|^2 - 2 e·f + |f|^2. We therefore cluster
        the directions of e (spherical k-means, Lloyd on the unit sphere) and set every folded codeword
        to its unit centre times sqrt(D): argmax_w e · f_w is then exactly the nearest centre by cosine,
        and the codeword norm is that of the random init (std 1 per coordinate), so the scores start on
        the scale that init's comment describes. Each codebook starts from its own k-means++ seeds
        (plain random seeds often put two centres in one blob, which 10 Lloyd steps do not undo).
        """
        N, W, D = self.codebooks.shape
        x = nn.functional.normalize(e.float(), dim=-1)  # (M, D) directions
        M = x.shape[0]
        if M == 0:
            return
        folded = torch.empty(N, W, D, device=x.device)
        for n in range(N):
            centres = _kmeans_plus_plus(x, W, generator)  # (W, D)
            for _ in range(iterations):
                z = (x @ centres.T).argmax(dim=-1)  # (M,) nearest centre by cosine
                summed = torch.zeros(W, D, device=x.device).index_add_(0, z, x)  # (W, D)
                empty = torch.bincount(z, minlength=W) == 0  # (W,)
                # An empty cluster keeps no centre: it is re-seeded from a random behavior.
                summed[empty] = x[torch.randint(M, (int(empty.sum()),), generator=generator, device=x.device)]
                centres = nn.functional.normalize(summed, dim=-1)
            folded[n] = centres * math.sqrt(D)
        self.set_folded_codebooks(folded.to(self.codebooks.dtype))

    @torch.no_grad()
    def reset_dead(self, counts: Tensor, e: Tensor, generator: torch.Generator, noise: float = 0.01) -> Tensor:
        """dead_codeword_reset: move the codewords with zero counts (N, W) onto behaviors of e (M, D).

        A dead codeword w of codebook n is pointed at a behavior drawn, in proportion to its cluster's
        count, from the behaviors e that codebook n currently assigns to its busiest clusters, plus
        relative noise so that two codewords reset onto one behavior differ. Its folded norm becomes
        that of the busiest codeword, so it outscores the codeword that behavior had and takes over
        part of a crowded cluster. Returns the (N, W) bool mask of the codewords reset.
        """
        N, W, D = self.codebooks.shape
        dead = counts == 0  # (N, W)
        if e.shape[0] == 0:
            return torch.zeros_like(dead)
        folded = self.folded_codebooks()  # (N, W, D)
        z = self.scores(e.unsqueeze(0))[0].argmax(dim=-1)  # (M, N) current codeword of each behavior
        weight = counts.to(e.dtype).gather(1, z.T).T  # (M, N) the count of each behavior's cluster
        for n in range(N):
            k = int(dead[n].sum())
            if k == 0 or weight[:, n].sum() <= 0:
                dead[n] = False  # nothing alive to take behaviors from
                continue
            picked = e[torch.multinomial(weight[:, n], k, replacement=True, generator=generator)]  # (k, D)
            jitter = torch.randn(picked.shape, generator=generator, device=e.device, dtype=e.dtype)
            direction = nn.functional.normalize(picked + noise * picked.norm(dim=-1, keepdim=True) * jitter, dim=-1)
            busiest = int(counts[n].argmax())
            folded[n, dead[n]] = direction * folded[n, busiest].norm()
        self.set_folded_codebooks(folded, rows=dead)
        return dead

    @torch.no_grad()
    def agreement(self, e: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> AssignmentStats:
        """How often the training path picks the inference path's codeword, on e (H, L, D) with mask (H, L).

        The training codeword is drawn as training_logits draws it at the current tau; the margin is
        the gap between the best and the second-best score (eq. 5), the noise it would take to
        change the inference codeword. Sums over the real behaviors, per codebook.
        """
        scores = self.scores(e)  # (H, L, N, W)
        # Noise for the whole (H, L, N, W), padding included, so that history h draws what training would.
        training = self.training_logits(scores, generator)[mask].argmax(dim=-1)  # (M, N)
        scores = scores[mask]  # (M, N, W) real behaviors only
        inference = scores.argmax(dim=-1)  # (M, N)
        if scores.shape[-1] > 1:
            top2 = scores.topk(2, dim=-1).values  # (M, N, 2)
            margin = (top2[..., 0] - top2[..., 1]).sum(dim=0)  # (N,)
        else:  # one codeword: nothing to confuse it with
            margin = torch.zeros(scores.shape[1], dtype=scores.dtype, device=scores.device)
        return AssignmentStats(
            behaviors=int(scores.shape[0]),
            agreeing=(training == inference).sum(dim=0).cpu().numpy().astype(np.int64),
            margin_sum=margin.double().cpu().numpy(),
        )


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeds of unit vectors x (M, D) under cosine distance -> (k, D): each next seed is drawn
    with probability proportional to its squared distance 1 - cos to the nearest seed so far."""
    centres = x[torch.randint(x.shape[0], (1,), generator=generator, device=x.device)]  # (1, D)
    for _ in range(k - 1):
        distance = (1.0 - (x @ centres.T).amax(dim=-1)).clamp(min=0.0)  # (M,)
        # All points on the seeds (fewer directions than codewords): any point will do.
        weight = distance.square() if distance.sum() > 0 else torch.ones_like(distance)
        centres = torch.cat([centres, x[torch.multinomial(weight, 1, generator=generator)]])
    return centres


@dataclass
class AssignmentStats:
    """Per-codebook sums over real behaviors (MultiCodebookQuantizer.agreement); add batches with +."""

    behaviors: int  # M real behaviors measured (each codebook assigns every one)
    agreeing: np.ndarray  # (N,) int64, behaviors whose training-path codeword is the inference-path one
    margin_sum: np.ndarray  # (N,) float64, sum of best minus second-best score

    def __add__(self, other: AssignmentStats) -> AssignmentStats:
        return AssignmentStats(
            self.behaviors + other.behaviors, self.agreeing + other.agreeing, self.margin_sum + other.margin_sum
        )

    @property
    def agreement(self) -> np.ndarray:
        """(N,) share of the behaviors whose training-path codeword equals the inference-path one."""
        return self.agreeing / max(self.behaviors, 1)

    @property
    def margin(self) -> np.ndarray:
        """(N,) mean best minus second-best score."""
        return self.margin_sum / max(self.behaviors, 1)


def usage_loss(mean_prob: Tensor) -> Tensor:
    """log W - H(mean assignment probability), averaged over codebooks; 0 iff every codeword is used equally.

    The optional anti-collapse regulariser (ModelConfig.usage_loss_weight): without it nothing stops
    all behaviors from drifting to a few codewords, which would make the clusters uninformative.
    mean_prob (N, W) -> scalar.
    """
    W = mean_prob.shape[-1]
    entropy = -(mean_prob * mean_prob.clamp(min=1e-12).log()).sum(dim=-1)  # (N,)
    return (math.log(W) - entropy).mean()


@dataclass
class CodebookUsage:
    counts: np.ndarray  # (N, W) int64, behaviors assigned to each codeword
    perplexity: np.ndarray  # (N,) float, exp(entropy of the usage distribution); W = uniform use
    dead: np.ndarray  # (N,) int64, codewords with no behavior assigned

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> CodebookUsage:
        """Counts summed over any number of batches -> usage statistics."""
        counts = np.asarray(counts, dtype=np.int64)
        total = counts.sum(axis=-1, keepdims=True)
        p = counts / np.maximum(total, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
        return cls(counts=counts, perplexity=np.exp(entropy), dead=(counts == 0).sum(axis=-1))


def codebook_counts(assignments: Tensor | np.ndarray, codebook_size: int) -> np.ndarray:
    """(..., N, L) codeword ids, -1 = padding (as DMQN.codeword_assignments returns) -> (N, W) counts."""
    a = torch.as_tensor(assignments)
    N = a.shape[-2]
    a = a.transpose(-2, -1).reshape(-1, N)  # (everything else, N)
    counts = torch.zeros(N, codebook_size, dtype=torch.int64)
    for j in range(N):
        ids = a[:, j]
        counts[j] = torch.bincount(ids[ids >= 0], minlength=codebook_size)
    return counts.numpy()


def codebook_usage(assignments: Tensor | np.ndarray, codebook_size: int) -> CodebookUsage:
    """Per-codebook counts, perplexity and dead codewords of (..., N, L) assignments (-1 = padding)."""
    return CodebookUsage.from_counts(codebook_counts(assignments, codebook_size))
