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


class ShortTermDIN(nn.Module):
    """DIN's local activation unit over the `window` most recent behaviors (None = all): DIN itself, and
    the short-term interest that SIM, ETA, SDIM, TWIN and TWIN V2 pair with their long-term module."""

    def __init__(self, dim: int, window: int | None) -> None:
        super().__init__()
        self.window = window
        self.attention = ActivationUnit(dim)

    def forward(self, candidate: Tensor, behaviors: Tensor, mask: Tensor, hist_index: Tensor) -> Tensor:
        """candidate (B, D); behaviors (H, L, D); mask (H, L); hist_index (B,) -> interest (B, D)."""
        if self.window is not None:
            behaviors, mask = take_last(behaviors, mask, self.window)  # (H, window, D)
        interest, _ = self.attention(candidate, behaviors, mask, hist_index)
        return interest


class DIN(nn.Module):
    """Local activation unit over the `window` most recent behaviors (None = the whole history)."""

    def __init__(self, config: ModelConfig, window: int | None) -> None:
        super().__init__()
        self.config = config
        self.embedding = BehaviorEmbedding(config)
        self.interest = ShortTermDIN(config.embed_dim, window)
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
        c = self.embedding.candidate(cand_item, cand_category)  # (B, D)
        interest = self.interest(c, e, hist_mask, hist_index)  # (B, D)
        return self.head(c, interest.unsqueeze(1), recent.index_select(0, hist_index))

    def auxiliary_loss(self) -> Tensor:
        return torch.zeros((), device=self.embedding.item.weight.device)
