"""BehaviorEmbedding: the item, category and behavior-type tables shared by every model."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ModelConfig

# Small enough that the three summed tables start near the origin (|e| ~ 0.09 per coordinate),
# large enough that distinct items are distinguishable from the first step.
EMBED_INIT_STD = 0.05


class BehaviorEmbedding(nn.Module):
    """e_i = item + category + behavior-type embedding; candidate c = item + category.

    Summing (instead of concatenating) keeps the paper's D for behaviors (section 2.2: x^s in R^{L x D})
    and puts candidates and behaviors in one D-dimensional space, which target attention (CTAM)
    and the c * recent feature of the MLP need. The candidate has no behavior type: it is what
    the user may click, not something the user did.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D = config.embed_dim
        self.item = nn.Embedding(config.n_items, D, padding_idx=0)
        self.category = nn.Embedding(config.n_categories, D, padding_idx=0)
        self.behavior = nn.Embedding(config.n_behavior_types, D, padding_idx=0)
        for table in (self.item, self.category, self.behavior):
            nn.init.normal_(table.weight, std=EMBED_INIT_STD)
            with torch.no_grad():
                table.weight[0].zero_()  # re-zero the padding row that normal_ overwrote

    def behaviors(self, item: Tensor, category: Tensor, behavior: Tensor, mask: Tensor) -> Tensor:
        """(..., L) ids and bool mask -> (..., L, D), exactly zero at padding.

        Zeroing through the mask, not only through padding_idx, keeps every downstream sum
        independent of whatever ids a loader leaves in padded positions.
        """
        e = self.item(item) + self.category(category) + self.behavior(behavior)
        return e * mask.unsqueeze(-1).to(e.dtype)

    def candidate(self, item: Tensor, category: Tensor) -> Tensor:
        """(...,) ids -> (..., D)."""
        return self.item(item) + self.category(category)
