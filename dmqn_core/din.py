"""DIN (Zhou et al., KDD 2018) over the last `window` behaviors: din-short, din-middle, din-full."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.embedding import BehaviorEmbedding
from dmqn_core.mlp import MLPHead
from dmqn_core.sequence import recent_mean, take_last
from dmqn_core.target_attention import ActivationUnit


class DIN(nn.Module):
    """Local activation unit over the `window` most recent behaviors (None = the whole history)."""

    def __init__(self, config: ModelConfig, window: int | None) -> None:
        super().__init__()
        self.config = config
        self.window = window
        self.embedding = BehaviorEmbedding(config)
        self.attention = ActivationUnit(config.embed_dim)
        self.head = MLPHead(config.embed_dim, 1, config.mlp_hidden, config.dropout)

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
        e = self.embedding.behaviors(hist_item, hist_category, hist_behavior, hist_mask)  # (H, L, D)
        recent = recent_mean(e, hist_mask, self.config.short_len)  # (H, D)
        mask = hist_mask
        if self.window is not None:
            e, mask = take_last(e, hist_mask, self.window)  # (H, window, D)
        c = self.embedding.candidate(cand_item, cand_category)  # (B, D)
        interest, _ = self.attention(c, e, mask, hist_index)  # (B, D)
        return self.head(c, interest.unsqueeze(1), recent.index_select(0, hist_index))

    def auxiliary_loss(self) -> Tensor:
        return torch.zeros((), device=self.embedding.item.weight.device)
