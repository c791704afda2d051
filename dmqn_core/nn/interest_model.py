"""InterestModel: the skeleton every sequence model of Table 2 shares, so that they differ only in their interests.

A model splits at the candidate, as DMQN does for its cache (section 2.5):

- encode_user: the histories alone -> a user state, here the embedded histories and the mean of
  their recent behaviors (Histories);
- score: a state and candidates -> logits, here the model's interest vectors and, with the recent
  mean, the MLP head;
- forward = score(encode_user(...)), what training and evaluation call.

A baseline creates ``self.config``, ``self.embedding`` (BehaviorEmbedding), ``self.head``
(MLPHead, with ``match_width(config)`` scalars) and ``self.match`` (``self.match_module()``) in its
``__init__`` and implements ``interests``; target attention makes its interests
candidate-dependent, so its state is the embedded histories themselves. A model with another
state (DMQN's UserState: codebook clusters) overrides encode_user and score together.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BehaviorEmbedding
from dmqn_core.nn.match_features import MatchFeatures, MatchTable, match_table
from dmqn_core.nn.mlp import MLPHead
from dmqn_core.nn.sequence import recent_mean


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


class InterestModel(nn.Module):
    config: ModelConfig
    embedding: BehaviorEmbedding
    head: MLPHead
    match: MatchFeatures | None
    # Whether the user state is a set of codebook clusters (MCQM), which evaluation counts per codeword;
    # registry.CODEBOOK_MODELS names the same models.
    has_codebooks: ClassVar[bool] = False
    # The model's short-term interest when ModelConfig.short_term is None (nn/short_term.py): what it had
    # before the setting existed, so that earlier runs load and score unchanged.
    default_short_term: ClassVar[str] = "mean"

    def __init__(self) -> None:
        super().__init__()
        self.match = None  # the subclass sets self.match_module() last in its __init__
        # The weighted auxiliary loss of the last training-mode forward; a model that has one sets it
        # in every forward, None when it does not apply (eval mode, zero weight).
        self._auxiliary: Tensor | None = None

    def with_resolved_short_term(self, config: ModelConfig) -> ModelConfig:
        """``config`` with short_term set to what this model uses (its default when None): the config
        a run stores, so that it names the short-term interest the run trained with."""
        return replace(config, short_term=config.short_term or self.default_short_term)

    def match_module(self) -> MatchFeatures | None:
        """The match-feature reader (``match_features``), or None. A model creates it after all its other
        modules, so that a model without match features initialises as it did before they existed."""
        return MatchFeatures() if self.config.match_features else None

    def match_table(
        self, hist_item: Tensor, hist_category: Tensor, hist_mask: Tensor, hist_timestamp: Tensor | None
    ) -> MatchTable | None:
        """The histories' MatchTable when the model reads match features, else None."""
        if self.match is None:
            return None
        return match_table(hist_item, hist_category, hist_mask, hist_timestamp, self.config.short_len)

    def match_scalars(
        self,
        table: MatchTable | None,
        cand_item: Tensor,
        cand_category: Tensor,
        cand_popularity: Tensor | None,
        state_index: Tensor | None,
    ) -> Tensor | None:
        """(B, match WIDTH) match features of the candidates against table rows state_index (None = row b),
        or None for a model without them."""
        if self.match is None:
            return None
        if table is None:
            raise ValueError("this model reads match features; its state has no match table")
        rows = table if state_index is None else table.index_select(state_index)
        return self.match(rows, cand_item, cand_category, cand_popularity)

    def recent(self, e: Tensor, mask: Tensor) -> Tensor:
        """Mean of the last short_len real behaviors: (H, L, D), (H, L) -> (H, D).

        The paper's MLP input is not specified beyond "user, behavior sequence, candidate, context"
        features (section 2.1); a short-term mean is the usual companion of a long-sequence module,
        and every model gives its MLP the same one.
        """
        return recent_mean(e, mask, self.config.short_len)

    def encode_user(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        hist_timestamp: Tensor | None = None,
    ) -> Histories:
        """(H, L) ids, mask (True = real, left-aligned) and timestamps -> the state of H users."""
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
        """(B,) candidates against state rows state_index (B,) (None = row b) -> (B,) logits.

        cand_popularity (B,): the candidates' behaviors before the sample's time, read by match features only."""
        if state_index is None:
            state_index = torch.arange(cand_item.shape[0], device=cand_item.device)
        c = self.embedding.candidate(cand_item, cand_category)  # (B, D)
        interests = self.interests(state, Candidates(cand_item, cand_category, c), state_index)  # (B, K, D)
        scalars = self.match_scalars(state.match, cand_item, cand_category, cand_popularity, state_index)
        return self.head(c, interests, state.recent.index_select(0, state_index), scalars)

    def interests(self, histories: Histories, candidates: Candidates, hist_index: Tensor) -> Tensor:
        """B candidates, each against histories row hist_index (B,) -> interest vectors (B, K, D)."""
        raise NotImplementedError

    def forward(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        hist_index: Tensor,
        cand_item: Tensor,
        cand_category: Tensor,
        hist_timestamp: Tensor | None = None,
        cand_popularity: Tensor | None = None,
    ) -> Tensor:
        """H de-duplicated histories (H, L), B candidates pointing at them via hist_index (B,) -> (B,) logits."""
        state = self.encode_user(hist_item, hist_category, hist_behavior, hist_mask, hist_timestamp)
        return self.score(state, cand_item, cand_category, hist_index, cand_popularity)

    def auxiliary_loss(self) -> Tensor:
        """The loss the model adds to the CTR loss in training (DIEN's L_aux, DMQN's usage regulariser), weighted.

        That of the last forward if it ran in training mode, else zero. Add it to the CTR loss before backward.
        """
        if self._auxiliary is None:
            return torch.zeros((), device=self.embedding.item.weight.device)
        return self._auxiliary
