"""Target-match features: what a candidate has in common with its user's history (``match_features``).

For every candidate, seven scalars the MLP head reads beside the model's interest vectors:

- of the history behaviors in the candidate's **category**: how many (the whole history the model
  sees, and the ``short_len`` most recent), and how long before the history's last behavior the
  most recent of them happened (a learned "none" when there is none);
- the same three for the candidate's **item**;
- the candidate's popularity: its behaviors in the whole set strictly before the sample's time
  (``PreparedSet.popularity_before``), so that no sample sees the future.

Why: an exact search by category (SIM) reads "the user has done this category 40 times" from the
history directly, while a model that learns category similarity through embeddings cannot, for the
thousands of categories seen a handful of times in training. Giving every model the same counts
makes the comparison one of the interest modules, not of which model happens to see which signal.

Counts enter as log(1 + n) and gaps as log(1 + seconds) / 10, which keeps all seven near [0, 2].
The gap is measured to the history's most recent behavior, as SIM's and TWIN's time embeddings are
(``sequence.time_gaps``): it needs no request time, so training, evaluation and serving agree.

The history part is a ``MatchTable`` (each distinct category and item of a history with its three
features), which depends on the history only: DMQN caches it in its user state, and scoring looks
the candidate up in it. Every model builds and reads it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.sequence import stable_sort, time_gaps

# Scalars per candidate: (count, recent count, gap) for the category and for the item, then popularity.
WIDTH = 7
# Gaps and popularity enter as log1p / LOG_SCALE: a gap of a year (3e7 s) maps to 1.7, 100,000 behaviors to 1.2.
LOG_SCALE = 10.0


def match_width(config: ModelConfig) -> int:
    """The scalars match features add to a model's MLP input: WIDTH with ``match_features``, else 0."""
    return WIDTH if config.match_features else 0


@dataclass
class MatchTable:
    """The distinct categories and items of H histories, each with its three features."""

    category: Tensor  # (H, U) long distinct categories, -1 after the row's last
    category_features: Tensor  # (H, U, 3) float32: log1p count, log1p recent count, log1p gap / LOG_SCALE
    item: Tensor  # (H, V) long distinct items, -1 after the row's last
    item_features: Tensor  # (H, V, 3) float32

    def index_select(self, idx: Tensor) -> MatchTable:
        return MatchTable(
            self.category.index_select(0, idx),
            self.category_features.index_select(0, idx),
            self.item.index_select(0, idx),
            self.item_features.index_select(0, idx),
        )


def distinct_features(
    keys: Tensor, mask: Tensor, gaps: Tensor, recent_len: int, vocabulary: int
) -> tuple[Tensor, Tensor]:
    """The distinct keys of every history and their features.

    keys (H, L) long in [0, vocabulary), mask (H, L) bool (left-aligned, most recent last), gaps (H, L)
    float seconds to the history's last behavior -> keys (H, U) long (ascending, -1 after the row's
    last) and features (H, U, 3) float32; U = the most distinct keys of a row (at least 1).
    """
    H, L = keys.shape
    sorted_keys, order = _sort_rows(torch.where(mask, keys, torch.full_like(keys, -1)), vocabulary)  # padding first
    valid = sorted_keys >= 0
    length = mask.sum(dim=1, keepdim=True)  # (H, 1)
    recent = valid & (order >= length - recent_len)  # left-aligned: the last recent_len positions are recent
    first = torch.ones_like(valid)
    first[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    first &= valid
    U = max(int(first.sum(dim=1).max()) if H else 0, 1)
    # Group g of a row is its g-th distinct key; padding goes to the spare column U, cut off below.
    group = torch.where(valid, first.cumsum(dim=1) - 1, torch.full_like(sorted_keys, U))  # (H, L)
    count = torch.zeros(H, U + 1, dtype=torch.float32, device=keys.device).scatter_add_(1, group, valid.float())
    recent_count = torch.zeros_like(count).scatter_add_(1, group, recent.float())
    # The most recent behavior of a group has the smallest gap.
    gap = torch.full_like(count, float("inf")).scatter_reduce_(
        1, group, gaps.gather(1, order), reduce="amin", include_self=True
    )
    distinct = torch.full((H, U + 1), -1, dtype=keys.dtype, device=keys.device).scatter_(1, group, sorted_keys)
    gap = torch.where(count > 0, gap, torch.zeros_like(gap))  # rows with fewer keys: no inf in the table
    features = torch.stack([count.log1p(), recent_count.log1p(), gap.log1p() / LOG_SCALE], dim=-1)  # (H, U+1, 3)
    return distinct[:, :U], features[:, :U]


def _sort_rows(keys: Tensor, vocabulary: int) -> tuple[Tensor, Tensor]:
    """Each row of keys (H, L) in [-1, vocabulary) sorted, stably: (sorted keys, positions) (H, L) each.

    One 1-D stable sort of row * (vocabulary + 1) + key + 1 (stable_sort): about a third less time than
    sorting along dim 1, the same order.
    """
    H, L = keys.shape
    stride = vocabulary + 1
    offset = torch.arange(H, device=keys.device).unsqueeze(1) * stride + 1  # (H, 1)
    flat, position = stable_sort((keys + offset).view(-1), H * stride)  # (H L,) each
    return (flat.long().view(H, L) - offset), position.view(H, L) % max(L, 1)


def match_table(
    hist_item: Tensor,
    hist_category: Tensor,
    hist_mask: Tensor,
    hist_timestamp: Tensor | None,
    recent_len: int,
    n_items: int,
    n_categories: int,
) -> MatchTable:
    """(H, L) histories (item ids in [0, n_items), categories in [0, n_categories), the embedding tables'
    sizes) -> their MatchTable; the gaps need the timestamps."""
    if hist_timestamp is None:
        raise ValueError("match features need the histories' timestamps")
    gaps = time_gaps(hist_timestamp, hist_mask)  # (H, L)
    category, category_features = distinct_features(hist_category, hist_mask, gaps, recent_len, n_categories)
    item, item_features = distinct_features(hist_item, hist_mask, gaps, recent_len, n_items)
    return MatchTable(category, category_features, item, item_features)


def _look_up(keys: Tensor, features: Tensor, rows: Tensor, candidate: Tensor, none: Tensor, vocabulary: int) -> Tensor:
    """keys (H, U) ascending then -1, features (H, U, 3); candidates (B,) against table rows (B,) -> (B, 3);
    the gap is ``none`` where nothing matches. Keys and candidates are ids in [0, vocabulary).

    One binary search per candidate in the table flattened as row * stride + key (sorted, since each row
    is), so that no candidate copies its row's U entries: at U = 5,000 distinct items and 1,000
    candidates a copy per candidate was 20 M floats per call. The stride comes from the vocabulary,
    not from the tensors, so that the lookup never waits for a GPU to report a maximum.
    """
    H, U = keys.shape
    stride = vocabulary + 1
    padded = torch.where(keys >= 0, keys, torch.full_like(keys, stride - 1))  # padding sorts last, matches nothing
    flat = (torch.arange(H, device=keys.device).unsqueeze(1) * stride + padded).flatten()  # (H*U,) ascending
    query = rows * stride + candidate  # (B,)
    position = torch.searchsorted(flat, query).clamp(max=max(H * U - 1, 0))  # (B,)
    hit = flat[position] == query if flat.numel() else torch.zeros_like(query, dtype=torch.bool)  # (B,)
    found = features.flatten(0, 1)[position] if flat.numel() else features.new_zeros(len(query), 3)  # (B, 3)
    found = found * hit.unsqueeze(1).to(found.dtype)
    gap = torch.where(hit, found[:, 2], none.expand(found.shape[0]))
    return torch.stack([found[:, 0], found[:, 1], gap], dim=-1)


class MatchFeatures(nn.Module):
    """The WIDTH match scalars of B candidates against their users' MatchTables; item and category ids are
    below n_items and n_categories (the embedding tables' sizes, padding 0 included)."""

    def __init__(self, n_items: int, n_categories: int) -> None:
        super().__init__()
        self.n_items, self.n_categories = n_items, n_categories
        # The gap feature of a candidate whose category (item) the history lacks: learned, since no
        # number of seconds means "never".
        self.none = nn.Parameter(torch.zeros(2))

    def forward(
        self,
        table: MatchTable,
        cand_item: Tensor,
        cand_category: Tensor,
        cand_popularity: Tensor | None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """cand_* (B,) against table rows ``rows`` (B,) (None = row b) -> (B, WIDTH) float32.

        cand_popularity: the candidates' behavior counts before the sample's time (long or float).
        """
        if cand_popularity is None:
            raise ValueError("match features need the candidates' popularity (cand_popularity)")
        if rows is None:
            rows = torch.arange(cand_item.shape[0], device=cand_item.device)
        category = _look_up(
            table.category, table.category_features, rows, cand_category, self.none[0], self.n_categories
        )  # (B, 3)
        item = _look_up(table.item, table.item_features, rows, cand_item, self.none[1], self.n_items)  # (B, 3)
        popularity = cand_popularity.to(torch.float32).log1p().unsqueeze(1) / LOG_SCALE  # (B, 1)
        return torch.cat([category, item, popularity], dim=1)
