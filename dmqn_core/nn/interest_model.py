"""InterestModel: the skeleton every baseline of Table 2 shares, so that they differ only in their interests.

forward embeds the histories and the candidates once, asks the model for its interest vectors and
gives them, with the mean of the recent behaviors, to the MLP head. A baseline creates
``self.config``, ``self.embedding`` (BehaviorEmbedding) and ``self.head`` (MLPHead) in its
``__init__`` and implements ``interests``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BehaviorEmbedding
from dmqn_core.nn.mlp import MLPHead
from dmqn_core.nn.sequence import recent_mean


@dataclass
class Histories:
    """A batch's de-duplicated histories (left-aligned, most recent last) and their embeddings."""

    item: Tensor  # (H, L) long, 0 at padding
    category: Tensor  # (H, L) long
    behavior: Tensor  # (H, L) long
    mask: Tensor  # (H, L) bool
    timestamp: Tensor | None  # (H, L) long unix seconds, or None when the caller has none
    embedded: Tensor  # (H, L, D), zero at padding


@dataclass
class Candidates:
    item: Tensor  # (B,) long
    category: Tensor  # (B,) long
    embedded: Tensor  # (B, D)


class InterestModel(nn.Module):
    config: ModelConfig
    embedding: BehaviorEmbedding
    head: MLPHead

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
    ) -> Tensor:
        """H histories (H, L), B candidates pointing at them via hist_index (B,) -> (B,) logits."""
        e = self.embedding.behaviors(hist_item, hist_category, hist_behavior, hist_mask)  # (H, L, D)
        recent = recent_mean(e, hist_mask, self.config.short_len)  # (H, D)
        histories = Histories(hist_item, hist_category, hist_behavior, hist_mask, hist_timestamp, e)
        c = self.embedding.candidate(cand_item, cand_category)  # (B, D)
        interests = self.interests(histories, Candidates(cand_item, cand_category, c), hist_index)  # (B, K, D)
        return self.head(c, interests, recent.index_select(0, hist_index))

    def auxiliary_loss(self) -> Tensor:
        """A loss the model adds to the CTR loss in training (DIEN's L_aux); zero by default."""
        return torch.zeros((), device=self.embedding.item.weight.device)
