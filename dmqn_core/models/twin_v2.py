"""TWIN V2 (Si et al., "TWIN V2: Scaling Ultra-Long User Behavior Sequence Modeling for Enhanced CTR
Prediction at Kuaishou", CIKM 2024).

Implemented:
- Hierarchical clustering of every user's history: behaviors are first grouped by an attribute
  (TWIN V2: play-completion rate; here: the behavior type), then every group larger than
  `cluster_max_size` is split by k-means into floor(n^0.3) (at least 2) clusters, recursively,
  until no cluster exceeds `cluster_max_size`. TWIN V2 clusters offline, so no gradient passes the
  clustering: it runs on the detached embeddings, afresh at every forward (an offline job run on
  the current embeddings).
- Cluster representation: TWIN V2 averages the numeric features of the members and takes the
  categorical features (item id, ...) of the member nearest to the cluster centroid. Every feature
  of our behavior embedding (item, category, behavior type) is categorical, so a cluster's token is
  the embedding of its member nearest to the centroid (not the mean of the members, which would
  describe an item that does not exist); the one numeric feature, the time gap, is averaged.
- Cluster-aware target attention in both stages, with the ESU's parameters in the GSU as in TWIN:
  softmax over clusters of alpha_k + ln n_k, i.e. weights n_k exp(alpha_k) / sum_j n_j exp(alpha_j),
  so that a cluster weighs as much as its n_k members would. The GSU keeps the `top_k` clusters.
- The short-term DIN over the `short_len` most recent behaviors; the MLP sees [long, short].

Vectorisation: the k-means splits of all clusters of all users of one tree level run together on
integer cluster ids (H, L): deterministic farthest-point seeding (no RNG), KMEANS_ITERS Lloyd
iterations, children renumbered densely. TWIN V2's recursion has no depth bound; here it is
ceil(log2 L) + EXTRA_LEVELS levels, and a cluster that k-means cannot split (identical embeddings)
is cut chronologically, so that the size bound holds whatever the data.
The cross-feature time bias and the multi-head GSU score are TWIN's (see twin.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dmqn_core.models.twin import TWIN, general_search_scores, top_k_search
from dmqn_core.nn.history_model import Candidates, Histories
from dmqn_core.nn.sequence import gather_rows, time_gaps
from dmqn_core.nn.short_term import with_short_term
from dmqn_core.nn.target_attention import MultiHeadTargetAttention

SPLIT_EXPONENT = 0.3  # TWIN V2: a cluster of n behaviors is split into floor(n^0.3) k-means clusters
KMEANS_ITERS = 4
EXTRA_LEVELS = 3  # tree levels beyond ceil(log2 L), for unbalanced splits


def _counts(ids: Tensor, weight: Tensor, n: int) -> Tensor:
    """Sum of weight (H, L) per id: ids (H, L) in [0, n) -> (H, n)."""
    return weight.new_zeros(ids.shape[0], n).scatter_add_(1, ids, weight)


def _means(x: Tensor, ids: Tensor, weight: Tensor, n: int) -> Tensor:
    """Weighted mean of x (H, L, D) per id -> (H, n, D); 0 for an id without members."""
    H, L, D = x.shape
    sums = x.new_zeros(H, n, D).scatter_add_(1, ids.unsqueeze(-1).expand(H, L, D), x * weight.unsqueeze(-1))
    return sums / _counts(ids, weight, n).clamp(min=1.0).unsqueeze(-1)


def _argmax_per_cluster(values: Tensor, ids: Tensor, n: int) -> Tensor:
    """Position of the largest value (H, L) among the members of every id -> (H, n); ties: earliest.

    Non-members must hold -inf; an id without members gets position 0.
    """
    H, L = values.shape
    best = values.new_full((H, n), float("-inf")).scatter_reduce(1, ids, values, "amax")  # (H, n)
    pos = torch.arange(L, device=ids.device).expand(H, L)
    hit = (values == best.gather(1, ids)) & torch.isfinite(values)
    first = torch.full((H, n), L, dtype=torch.long, device=ids.device).scatter_reduce(
        1, ids, torch.where(hit, pos, L), "amin"
    )
    return first.masked_fill(first == L, 0)


def _rank_in_cluster(ids: Tensor, mask: Tensor, n: int) -> Tensor:
    """Chronological rank of every behavior among the members of its cluster: (H, L) -> (H, L)."""
    H, L = ids.shape
    pos = torch.arange(L, device=ids.device).expand(H, L)
    order = torch.where(mask, ids * L + pos, n * L + pos).argsort(dim=1)  # cluster by cluster, padding last
    size = _counts(ids, mask.long(), n)  # (H, n)
    start = size.cumsum(dim=1) - size  # (H, n) first sorted slot of every cluster
    rank_sorted = pos - start.gather(1, ids.gather(1, order))
    return torch.empty_like(ids).scatter_(1, order, rank_sorted)


def _renumber(ids: Tensor, child: Tensor, mask: Tensor, n_children: int) -> Tensor:
    """Child `child` of cluster `ids` -> dense new ids (H, L), parent order kept, -1 at padding."""
    slot = ids * n_children + child  # (H, L)
    occupied = _counts(slot, mask.long(), int(slot.max()) + 1) > 0
    new_id = occupied.long().cumsum(dim=1) - 1
    return torch.where(mask, new_id.gather(1, slot), -1)


def _own_sq_dist(x: Tensor, x_sq: Tensor | None, centers: Tensor, cid: Tensor) -> Tensor:
    """Squared distance of every member to the k centers of its own cluster.

    x (H, A, D), x_sq (H, A) = |x|^2 (None: left out, when only the argmin over the k centers matters),
    centers (H, S, k, D), cid (H, A) in [0, S) -> (H, A, k). |x|^2 - 2 x.c + |c|^2 with one
    batched matmul against all S*k centers of the user: on CPU a dense product is much cheaper than
    materialising every member's own centers (H, A, k, D).
    """
    H, S, k, D = centers.shape
    flat = centers.flatten(1, 2)  # (H, S*k, D)
    slot = cid.unsqueeze(-1) * k + torch.arange(k, device=cid.device)  # (H, A, k)
    dots = torch.bmm(x, flat.transpose(1, 2)).gather(2, slot)  # (H, A, k)
    c_sq = flat.square().sum(-1).gather(1, slot.flatten(1)).view_as(slot)  # (H, A, k)
    dist = c_sq - 2.0 * dots
    return dist if x_sq is None else dist + x_sq.unsqueeze(-1)


def _kmeans(x: Tensor, cid: Tensor, valid: Tensor, k: Tensor) -> Tensor:
    """k-means inside every cluster of every user at once.

    x (H, A, D) members, cid (H, A) their cluster in [0, S), valid (H, A), k (H, S) clusters wanted
    (0 = leave whole) -> child (H, A) in [0, k of own cluster). Deterministic farthest-point seeding:
    the member farthest from the centroid, then each next the member farthest from the seeds so far.
    """
    H, A, D = x.shape
    S, K = k.shape[1], int(k.max())
    w = valid.to(x.dtype)
    x_sq = x.square().sum(-1)  # (H, A)
    centroid = _means(x, cid, w, S)  # (H, S, D)
    far = _own_sq_dist(x, x_sq, centroid.unsqueeze(2), cid).squeeze(-1)  # (H, A)
    seeds = []
    for _ in range(K):
        pos = _argmax_per_cluster(far.masked_fill(~valid, float("-inf")), cid, S)  # (H, S)
        seeds.append(x.gather(1, pos.unsqueeze(-1).expand(H, S, D)))  # (H, S, D)
        to_seed = _own_sq_dist(x, x_sq, seeds[-1].unsqueeze(2), cid).squeeze(-1)  # (H, A)
        far = to_seed if len(seeds) == 1 else torch.minimum(far, to_seed)
    centers = torch.stack(seeds, dim=2)  # (H, S, K, D)
    # Children beyond the own cluster's k are out of reach; |x|^2 does not change the argmin.
    penalty = torch.where(torch.arange(K, device=x.device) < k.gather(1, cid).unsqueeze(-1), 0.0, float("inf"))
    xw = x * w.unsqueeze(-1)
    index = (cid * K).unsqueeze(-1).expand(H, A, D)

    def assign(centers: Tensor) -> Tensor:  # (H, S, K, D) -> child (H, A)
        return (_own_sq_dist(x, None, centers, cid) + penalty).argmin(-1)

    for _ in range(KMEANS_ITERS):  # Lloyd
        child = assign(centers)
        sums = x.new_zeros(H, S * K, D).scatter_add_(1, index + child.unsqueeze(-1), xw)
        count = _counts(cid * K + child, w, S * K).unsqueeze(-1)  # (H, S*K, 1)
        centers = torch.where(count > 0, sums / count.clamp(min=1.0), centers.flatten(1, 2)).view(H, S, K, D)
    return assign(centers)


def _split_level(x: Tensor, ids: Tensor, mask: Tensor, max_size: int) -> Tensor | None:
    """One tree level: k-means split of every cluster larger than max_size; None if there is none.

    Only members of the clusters that split take part, packed to the left (H, A): deep in the tree
    most behaviors already sit in small enough clusters.
    """
    H, L, D = x.shape
    n = int(ids.max()) + 1
    size = _counts(ids, mask.to(x.dtype), n)  # (H, n)
    k = torch.where(size > max_size, size.pow(SPLIT_EXPONENT).floor().clamp(min=2), 0).long()  # (H, n)
    split = k > 0
    if not bool(split.any()):
        return None
    active = mask & split.gather(1, ids)  # (H, L)
    A = int(active.sum(dim=1).max())
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :A]  # (H, A) chronological
    valid = active.gather(1, order)
    local = split.long().cumsum(dim=1) - 1  # (H, n) rank among the clusters that split
    S = int(split.sum(dim=1).max())
    cid = local.gather(1, ids.gather(1, order)).clamp(min=0) * valid  # (H, A)
    k_local = k.new_zeros(H, S + 1).scatter_(1, torch.where(split, local, S), k)[:, :S]  # (H, S)

    x_active = x.gather(1, order.unsqueeze(-1).expand(H, A, D))  # (H, A, D)
    child = _kmeans(x_active, cid, valid, k_local)  # (H, A)
    K = int(k_local.max())
    w = valid.to(x.dtype)
    cluster_size = _counts(cid, w, S)  # (H, S)
    largest_child = _counts(cid * K + child, w, S * K).view(H, S, K).amax(-1)  # (H, S)
    stuck = (k_local > 0) & (largest_child >= cluster_size)  # k-means kept the cluster whole
    if bool(stuck.any()):  # identical embeddings: cut into k pieces by time instead
        rank = _rank_in_cluster(cid, valid, S)  # (H, A)
        by_time = rank * k_local.gather(1, cid) // cluster_size.gather(1, cid).clamp(min=1.0).long()
        child = torch.where(stuck.gather(1, cid), by_time, child)
    full_child = torch.zeros_like(ids).scatter_(1, order, child * valid)  # (H, L), 0 for members that stay
    return _renumber(ids, full_child, mask, K)


@torch.no_grad()
def hierarchical_clusters(x: Tensor, group: Tensor, mask: Tensor, max_size: int) -> Tensor:
    """TWIN V2's hierarchical clustering: x (H, L, D) behavior embeddings, group (H, L) attribute ids,
    mask (H, L) -> cluster ids (H, L), dense per user (0 .. n_clusters - 1), -1 at padding.

    Members of a cluster share their group id; no cluster has more than max_size members.
    """
    H, L = mask.shape
    x = x.detach() * mask.unsqueeze(-1).to(x.dtype)
    group = group * mask  # padding ids must not matter
    ids = _renumber(torch.zeros_like(group), group, mask, int(group.max()) + 1)  # first split: by attribute
    for _ in range(math.ceil(math.log2(max(L, 2))) + EXTRA_LEVELS):
        split = _split_level(x, ids.clamp(min=0), mask, max_size)
        if split is None:
            return ids
        ids = split
    # Depth bound reached (very unbalanced k-means splits): cut what is still too large by time.
    own = ids.clamp(min=0)
    n = int(own.max()) + 1
    size = _counts(own, mask.long(), n)
    if int(size.max()) <= max_size:
        return ids
    child = _rank_in_cluster(own, mask, n) // max_size
    return _renumber(own, child, mask, -(-int(size.max()) // max_size))


def cluster_summary(
    e: Tensor, ids: Tensor, mask: Tensor, gap: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Cluster tokens as in TWIN V2: e (H, L, D), ids (H, L) from hierarchical_clusters, gap (H, L) or None.

    Returns tokens (H, C, D) = the embedding of the member nearest to the (detached) centroid,
    with gradient; sizes (H, C) float; cluster mask (H, C); mean time gap (H, C) or None.
    C = the most clusters of any user (at least 1); tokens are 0 at non-existent clusters.
    """
    H, L, D = e.shape
    own = ids.clamp(min=0)
    n = int(own.max()) + 1
    w = mask.to(e.dtype)
    size = _counts(own, w, n)  # (H, C)
    exists = size > 0
    x = e.detach()
    centroid = _means(x, own, w, n)  # (H, C, D)
    closeness = -(x - centroid.gather(1, own.unsqueeze(-1).expand(H, L, D))).square().sum(-1)  # (H, L)
    nearest = _argmax_per_cluster(closeness.masked_fill(~mask, float("-inf")), own, n)  # (H, C)
    tokens = e.gather(1, nearest.unsqueeze(-1).expand(H, n, D)) * exists.unsqueeze(-1).to(e.dtype)
    mean_gap = None if gap is None else _counts(own, gap * w, n) / size.clamp(min=1.0)
    return tokens, size, exists, mean_gap


def cluster_aware_attention(
    esu: MultiHeadTargetAttention,
    candidate: Tensor,
    clusters: Tensor,
    size: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """TWIN V2's cluster-aware target attention: weights n_k exp(alpha_k) / sum_j n_j exp(alpha_j).

    candidate (B, D); clusters (B, K, D); size (B, K); mask (B, K); bias (B, K) or None, part of
    alpha -> interest (B, D), weights (B, heads, K). exp(alpha + ln n) = n exp(alpha).
    """
    log_size = size.clamp(min=1.0).log()
    return esu(candidate, clusters, mask, log_size if bias is None else log_size + bias)


class TWINV2(TWIN):
    """TWIN's modules (ESU, time bias, short DIN, head) over clusters instead of behaviors."""

    def interests(self, histories: Histories, candidates: Candidates, hist_index: Tensor) -> Tensor:
        h, c, cfg = histories, candidates.embedded, self.config
        ids = hierarchical_clusters(h.embedded, h.behavior, h.mask, cfg.cluster_max_size)  # (H, L)
        gap = None if h.timestamp is None else time_gaps(h.timestamp, h.mask)
        tokens, size, exists, mean_gap = cluster_summary(h.embedded, ids, h.mask, gap)  # (H, C, D), (H, C) x3
        time_bias = None if mean_gap is None else self.time_bias(mean_gap)  # (H, C)
        # ln n_k (+ the cross-feature bias): the cluster-aware logit offset, the same in GSU and ESU.
        offset = size.clamp(min=1.0).log() + (0.0 if time_bias is None else time_bias)  # (H, C)

        with torch.no_grad():  # GSU: hard retrieval of clusters with the ESU's attention
            scores = general_search_scores(self.esu, c, self.esu.project_keys(tokens), exists, hist_index, offset)
            index, valid = top_k_search(scores, cfg.top_k)  # (B, k)
        picked = gather_rows(tokens, hist_index, index)  # (B, k, D)
        picked_bias = None if time_bias is None else gather_rows(time_bias, hist_index, index)  # (B, k)
        long, _ = cluster_aware_attention(
            self.esu, c, picked, gather_rows(size, hist_index, index), valid, picked_bias
        )  # (B, D)
        return with_short_term(self.short, long.unsqueeze(1), c, h.embedded, h.mask, hist_index)  # (B, 1 or 2, D)
