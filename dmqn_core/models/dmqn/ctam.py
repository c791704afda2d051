"""CTAM, the Cluster-aware Target Attention Module (section 2.4).

The candidate attends, separately in every codebook, over that codebook's cluster tokens and
gets one interest vector per codebook. The paper names the module but gives no equation; this
is standard scaled dot-product target attention with per-codebook projections, restricted to
non-empty clusters.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor


class ClusterTargetAttention(nn.Module):
    def __init__(
        self,
        n_codebooks: int,
        dim: int,
        size_bias: bool = True,
        identity_init: bool = True,
        share_bias: bool = False,
    ) -> None:
        super().__init__()
        N, D = n_codebooks, dim
        self.size_bias = size_bias
        # cluster_categories: a learned weight per codebook of the candidate category's share of a cluster
        # in its logit. It starts at 1: a cluster made only of the candidate's category counts e times more.
        self.share_weight = nn.Parameter(torch.ones(N)) if share_bias else None
        # Per-codebook projections: each codebook's clusters live in their own ICIM output space.
        self.wq = nn.Parameter(torch.empty(N, D, D))
        self.wk = nn.Parameter(torch.empty(N, D, D))
        self.wv = nn.Parameter(torch.empty(N, D, D))
        if not identity_init:
            # The paper gives no initialisation: nn.Linear's default, U(-1/sqrt(D), 1/sqrt(D)) per (D, D) matrix.
            for w in (self.wq, self.wk, self.wv):
                nn.init.uniform_(w, -(D**-0.5), D**-0.5)
            return
        # Start from the plain similarity: W_q = W_k = D^(1/4) I makes the logits q.k/sqrt(D)
        # equal c.y, and W_v = I passes the clusters through. With random projections the initial
        # logits are an arbitrary bilinear form of candidate and cluster, and the model took
        # several times longer to find the candidate's own interests in the history.
        eye = torch.eye(D).expand(N, D, D)
        with torch.no_grad():
            self.wq.copy_(eye * D**0.25)
            self.wk.copy_(eye * D**0.25)
            self.wv.copy_(eye)

    def forward(
        self,
        candidate: Tensor,
        clusters: Tensor,
        cluster_mask: Tensor,
        cluster_size: Tensor,
        category_share: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """candidate (B, D); clusters (B, N, W, D); cluster_mask (B, N, W) bool; cluster_size (B, N, W) (or all
        three with 1 for B: one user's, for every candidate); category_share (B, N, W): the candidate
        category's share of every cluster (with share_bias only).

        Returns the interest vectors (B, N, D), the match strength (B, N) and the attention weights
        (B, N, W), which sum to 1 over the non-empty clusters and are 0 at empty ones. W may be
        anything (e.g. only the non-empty clusters of a cache): nothing here is tied to a codeword id.

        The softmax makes each interest vector a convex combination, which says *what* in the
        history resembles the candidate but not *how much* of it there is. The match strength
        log(sum_k n_k exp(s_k) / sum_k n_k), the log-mean over all behaviors of exp(similarity of
        the behavior's cluster to the candidate), keeps that: it is what DIN's unnormalised
        attention sum carries, and without it the model learns the long-term signal far more slowly.
        It is 0 for a user without clusters.
        """
        D = candidate.shape[-1]
        # One user's clusters (1, N, W, ...) for all B candidates (a served user) are read in place, not
        # copied per candidate: the per-cluster tensors broadcast, and the two contractions drop b.
        keys, clusters = ("nwd", clusters[0]) if clusters.shape[0] == 1 else ("bnwd", clusters)
        q = torch.einsum("bd,nde->bne", candidate, self.wq)  # (B, N, D)
        # q . (y W_k) == (q W_k^T) . y: projecting the B queries instead of the B*W cluster keys
        # saves a factor W; likewise sum_w a_w (y_w W_v) == (sum_w a_w y_w) W_v below.
        q_k = torch.einsum("bne,nde->bnd", q, self.wk)  # (B, N, D)
        logits = torch.einsum(f"bnd,{keys}->bnw", q_k, clusters) / math.sqrt(D)  # (B, N, W)
        if self.size_bias:
            # exp(logit + log n_k) = n_k exp(logit): attending over the clusters is then the same as
            # attending over all behaviors with each behavior keyed by its cluster, so a cluster of
            # 300 clicks outweighs a stray one, as it would under full target attention (DIN Full).
            logits = logits + cluster_size.clamp(min=1.0).log()
        if self.share_weight is not None:
            if category_share is None:
                raise ValueError("this CTAM reads the clusters' category shares; none were given")
            logits = logits + self.share_weight.view(1, -1, 1) * category_share
        logits = logits.masked_fill(~cluster_mask, float("-inf"))
        # A user with no non-empty cluster in a codebook (empty history) would softmax over all -inf
        # and get NaN; give such rows finite logits and zero their weights afterwards instead.
        has_any = cluster_mask.any(dim=-1, keepdim=True)  # (B, N, 1)
        logits = logits.masked_fill(~has_any, 0.0)
        weights = logits.softmax(dim=-1) * has_any  # (B, N, W)
        pooled = torch.einsum(f"bnw,{keys}->bnd", weights, clusters)  # (B, N, D)
        interest = torch.einsum("bnd,nde->bne", pooled, self.wv)  # (B, N, D)
        # Normalised by what the logits sum over: behaviors with the size bias, clusters without.
        weight_of = cluster_size if self.size_bias else torch.ones_like(cluster_size)
        total = (weight_of * cluster_mask).sum(dim=-1).clamp(min=1.0)  # (B, N)
        match = (logits.logsumexp(dim=-1) - total.log()) * has_any.squeeze(-1)  # (B, N)
        return interest, match, weights
