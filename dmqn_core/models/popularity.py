"""PopularityModel: the history-free baseline, logit = log(1 + training popularity of the candidate)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.interest_model import InterestModel


class PopularityModel(InterestModel[None]):
    """Ranks candidates by how often they occur in the training data; nothing to train.

    It reads no history, so its user state is None. log1p keeps the logit finite for unseen items
    (popularity 0) and monotone in popularity, which is all AUC looks at.
    """

    trainable: ClassVar[bool] = False
    log_popularity: Tensor  # (n_items,) buffer

    def __init__(self, config: ModelConfig, item_popularity: np.ndarray | Tensor) -> None:
        super().__init__()
        # Checked in NumPy: the model may be built on the meta device, whose tensors hold no values.
        counts = np.array(item_popularity, dtype=np.float32)  # a copy: the prepared set is read-only
        if counts.ndim != 1 or counts.shape[0] != config.n_items:
            raise ValueError(f"item_popularity must have shape ({config.n_items},), got {counts.shape}")
        if (counts < 0).any():
            raise ValueError("item_popularity must be non-negative")
        pop = torch.tensor(counts)
        self.config = config
        self.register_buffer("log_popularity", pop.log1p())  # (n_items,)

    def encode_user(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        hist_timestamp: Tensor | None = None,
    ) -> None:
        return None

    def score(
        self,
        state: None,
        cand_item: Tensor,
        cand_category: Tensor,
        state_index: Tensor | None = None,
        cand_popularity: Tensor | None = None,
    ) -> Tensor:
        """Only cand_item is read -> (B,) logits."""
        return self.log_popularity[cand_item]
