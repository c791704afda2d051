"""SequenceModel[State]: what every model that reads the behavior sequence shares, whatever its state.

Such a model (DMQN and every baseline of Table 2) creates ``self.config``, ``self.embedding``
(BehaviorEmbedding), ``self.head`` (MLPHead, with ``match_width(config)`` scalars) and ``self.match``
(``self.match_module()``) in its ``__init__``; it gets here the short-term mean of the MLP input, the
match features and the auxiliary loss that its forward leaves behind. The baselines' state is the
embedded histories (history_model.py); DMQN's is its codebook clusters (models/dmqn/model.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BehaviorEmbedding
from dmqn_core.nn.interest_model import InterestModel, State
from dmqn_core.nn.match_features import MatchFeatures, MatchTable, match_table
from dmqn_core.nn.mlp import MLPHead
from dmqn_core.nn.sequence import recent_mean


class SequenceModel(InterestModel[State]):
    embedding: BehaviorEmbedding
    head: MLPHead
    match: MatchFeatures | None
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
        c = self.config
        return MatchFeatures(c.n_items, c.n_categories) if c.match_features else None

    def match_table(
        self, hist_item: Tensor, hist_category: Tensor, hist_mask: Tensor, hist_timestamp: Tensor | None
    ) -> MatchTable | None:
        """The histories' MatchTable when the model reads match features, else None."""
        if self.match is None:
            return None
        c = self.config
        return match_table(hist_item, hist_category, hist_mask, hist_timestamp, c.short_len, c.n_items, c.n_categories)

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
        return self.match(table, cand_item, cand_category, cand_popularity, state_index)

    def recent(self, e: Tensor, mask: Tensor) -> Tensor:
        """Mean of the last short_len real behaviors: (H, L, D), (H, L) -> (H, D).

        The paper's MLP input is not specified beyond "user, behavior sequence, candidate, context"
        features (section 2.1); a short-term mean is the usual companion of a long-sequence module,
        and every model gives its MLP the same one.
        """
        return recent_mean(e, mask, self.config.short_len)

    def auxiliary_loss(self) -> Tensor:
        if self._auxiliary is None:
            return torch.zeros((), device=self.embedding.item.weight.device)
        return self._auxiliary
