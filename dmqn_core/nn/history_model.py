"""HistoryModel: the skeleton of the baselines of Table 2, so that they differ only in their interests.

Target attention makes a baseline's interests candidate-dependent, so its user state is the
embedded histories themselves (Histories) and the interests are computed in score:

- encode_user: the histories -> their embeddings and the mean of their recent behaviors;
- score: the model's ``interests`` of each candidate and, with the recent mean, the MLP head.

A baseline builds what every SequenceModel builds (sequence_model.py) and implements ``interests``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dmqn_core.nn.match_features import MatchTable, match_width
from dmqn_core.nn.mlp import MLPHead
from dmqn_core.nn.sequence_model import SequenceModel
from dmqn_core.nn.short_term import ShortTermDIN


@dataclass
class Histories:
    """A batch's de-duplicated histories (left-aligned, most recent last) and their embeddings: a baseline's state."""

    item: Tensor  # (H, L) long, 0 at padding
    category: Tensor  # (H, L) long
    behavior: Tensor  # (H, L) long
    mask: Tensor  # (H, L) bool
    timestamp: Tensor | None  # (H, L) long unix seconds, or None when the caller has none
    embedded: Tensor  # (H, L, D), zero at padding
    recent: Tensor  # (H, D) mean embedding of the last short_len behaviors
    match: MatchTable | None = None  # with match_features: the histories' distinct categories and items


@dataclass
class Candidates:
    item: Tensor  # (B,) long
    category: Tensor  # (B,) long
    embedded: Tensor  # (B, D)


class HistoryModel(SequenceModel[Histories]):
    # The DIN short-term interest of a long-sequence baseline (SIM, ETA, SDIM, TWIN, TWIN V2), None without
    # one; those models set it, the DIN variants, DIEN and DSIN have none.
    short: ShortTermDIN | None

    def long_sequence_head(self) -> MLPHead:
        """The MLP head of a long-sequence baseline: its long-term interest, the DIN short-term one when
        ``self.short`` exists, the recent mean unless short_term = "none", and the match features."""
        c = self.config
        return MLPHead(
            c.embed_dim,
            1 + (self.short is not None),
            c.mlp_hidden,
            c.dropout,
            n_scalars=match_width(c),
            recent=c.short_term != "none",
        )

    def encode_user(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        hist_timestamp: Tensor | None = None,
    ) -> Histories:
        e = self.embedding.behaviors(hist_item, hist_category, hist_behavior, hist_mask)  # (H, L, D)
        recent = self.recent(e, hist_mask)  # (H, D)
        match = self.match_table(hist_item, hist_category, hist_mask, hist_timestamp)
        return Histories(hist_item, hist_category, hist_behavior, hist_mask, hist_timestamp, e, recent, match)

    def score(
        self,
        state: Histories,
        cand_item: Tensor,
        cand_category: Tensor,
        state_index: Tensor | None = None,
        cand_popularity: Tensor | None = None,
    ) -> Tensor:
        if state_index is None:
            state_index = torch.arange(cand_item.shape[0], device=cand_item.device)
        c = self.embedding.candidate(cand_item, cand_category)  # (B, D)
        interests = self.interests(state, Candidates(cand_item, cand_category, c), state_index)  # (B, K, D)
        scalars = self.match_scalars(state.match, cand_item, cand_category, cand_popularity, state_index)
        return self.head(c, interests, state.recent.index_select(0, state_index), scalars)

    def interests(self, histories: Histories, candidates: Candidates, hist_index: Tensor) -> Tensor:
        """B candidates, each against histories row hist_index (B,) -> interest vectors (B, K, D)."""
        raise NotImplementedError
