"""Each cluster's most frequent categories and their shares: DMQN's own answer to exact matching.

A cluster of MCQM is a learned neighbourhood of behavior embeddings; whether it holds the candidate's
category exactly is something CTAM can only guess through the embeddings, which for a category seen a
handful of times in training it cannot. SIM's hard search reads it exactly. With
``cluster_categories = T`` every cluster keeps the T categories most frequent among its behaviors and
their shares (count / cluster size); CTAM then reads the candidate category's share of every cluster
(ctam.py): as a bias of its attention logits, so that it attends to the clusters that hold the
category, and, pooled with the attention weights, as one MLP input per codebook.

The table depends on the history only, so it is part of the cached user state (state layout flag 4).
Clusters are the inference-path ones (the noise-free argmax, MultiCodebookQuantizer.assign), which
are the training clusters too under the default assign_noise = "none"; no gradient passes the counts.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def top_categories(codeword: Tensor, category: Tensor, n_codewords: int, top: int) -> tuple[Tensor, Tensor]:
    """codeword (H, N, L) long in [0, W) or -1 at padding; category (H, L) long -> the ``top`` most frequent
    categories of every cluster (H, N, W, top) long (0 where the cluster has fewer) and their shares
    (H, N, W, top) float32, count / cluster size. Ties go to the smaller category id."""
    H, N, L = codeword.shape
    W = n_codewords
    valid = codeword >= 0  # (H, N, L)
    cluster = (torch.arange(H * N, device=codeword.device).view(H, N, 1) * W + codeword.clamp(min=0))[valid]  # (M,)
    cats = category.unsqueeze(1).expand(H, N, L)[valid]  # (M,)
    n_categories = int(category.max()) + 1 if category.numel() else 1
    pair, count = torch.unique(cluster * n_categories + cats, return_counts=True)  # sorted by cluster, then category
    pair_cluster, pair_category = pair // n_categories, pair % n_categories
    # Order the pairs by cluster, then count descending, category ascending (stable sorts, last key first).
    order = torch.argsort(-count, stable=True)
    order = order[torch.argsort(pair_cluster[order], stable=True)]
    pair_cluster, pair_category, count = pair_cluster[order], pair_category[order], count[order]
    first = torch.ones_like(pair_cluster, dtype=torch.bool)
    first[1:] = pair_cluster[1:] != pair_cluster[:-1]
    start = torch.cummax(torch.where(first, torch.arange(len(first), device=first.device), 0), dim=0).values
    rank = torch.arange(len(first), device=first.device) - start  # position among its cluster's pairs
    size = torch.zeros(H * N * W, device=codeword.device).index_add_(0, pair_cluster, count.float())
    keep = rank < top
    slot = pair_cluster[keep] * top + rank[keep]
    categories = torch.zeros(H * N * W * top, dtype=torch.long, device=codeword.device)
    shares = torch.zeros(H * N * W * top, device=codeword.device)
    categories[slot] = pair_category[keep]
    shares[slot] = count[keep].float() / size[pair_cluster[keep]]
    return categories.view(H, N, W, top), shares.view(H, N, W, top)


def candidate_share(categories: Tensor, shares: Tensor, cand_category: Tensor) -> Tensor:
    """categories, shares (B, N, W, T); cand_category (B,) -> the candidate category's share of every
    cluster (B, N, W), 0 where it is not among the cluster's T."""
    hit = categories == cand_category.view(-1, 1, 1, 1)  # (B, N, W, T)
    return (shares * hit.to(shares.dtype)).sum(dim=-1)
