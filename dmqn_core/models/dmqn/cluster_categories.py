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

from dmqn_core.nn.sequence import stable_sort


@torch.no_grad()
def top_categories(
    codeword: Tensor, category: Tensor, n_codewords: int, top: int, n_categories: int
) -> tuple[Tensor, Tensor]:
    """codeword (H, N, L) long in [0, W) or -1 at padding; category (H, L) long in [0, n_categories) -> the
    ``top`` most frequent categories of every cluster (H, N, W, top) long (0 where the cluster has fewer)
    and their shares (H, N, W, top) float32, count / cluster size. Ties go to the smaller category id.

    The (cluster, category) pairs are counted by one radix sort of their keys and counting the runs,
    ordered by one more; n_categories comes from the vocabulary, so nothing waits for a device to
    report the largest id.
    """
    H, N, L = codeword.shape
    W, C = n_codewords, n_categories
    device = codeword.device
    padding = H * N * W * C  # the key of every padding position: it sorts last and is cut off below
    cluster = torch.arange(H * N, device=device).view(H, N, 1) * W + codeword  # (H, N, L) h N W + n W + w
    key = (cluster * C + category.unsqueeze(1)).masked_fill_(codeword < 0, padding).view(-1)  # (H N L,)
    # 32-bit keys where they fit (fewer than about 65,000 categories at H N W = 32,768); sorting the
    # padding along is faster than masking it out first.
    pair, count = torch.unique_consecutive(stable_sort(key, padding + 1)[0], return_counts=True)  # (P,)
    if len(pair) and bool(pair[-1] == padding):  # one host sync, for the padding's run
        pair, count = pair[:-1], count[:-1]
    pair_cluster, pair_category = (pair // C).long(), (pair % C).long()  # by cluster, then category
    # Order the pairs by cluster, then count descending; a stable sort keeps category ascending in a tie.
    order = stable_sort(pair_cluster * (L + 1) + (L - count), H * N * W * (L + 1))[1]
    pair_cluster, pair_category, count = pair_cluster[order], pair_category[order], count[order]
    first = torch.ones_like(pair_cluster, dtype=torch.bool)
    first[1:] = pair_cluster[1:] != pair_cluster[:-1]
    start = torch.cummax(torch.where(first, torch.arange(len(first), device=device), 0), dim=0).values
    rank = torch.arange(len(first), device=device) - start  # position among its cluster's pairs
    size = torch.zeros(H * N * W, device=device).index_add_(0, pair_cluster, count.float())
    keep = rank < top
    slot = pair_cluster[keep] * top + rank[keep]
    categories = torch.zeros(H * N * W * top, dtype=torch.long, device=device)
    shares = torch.zeros(H * N * W * top, device=device)
    categories[slot] = pair_category[keep]
    shares[slot] = count[keep].float() / size[pair_cluster[keep]]
    return categories.view(H, N, W, top), shares.view(H, N, W, top)


def candidate_share(categories: Tensor, shares: Tensor, cand_category: Tensor) -> Tensor:
    """categories, shares (B, N, W, T); cand_category (B,) -> the candidate category's share of every
    cluster (B, N, W), 0 where it is not among the cluster's T."""
    hit = categories == cand_category.view(-1, 1, 1, 1)  # (B, N, W, T)
    return (shares * hit.to(shares.dtype)).sum(dim=-1)
