"""DIN (Zhou et al., KDD 2018) over the last `window` behaviors: din-short, din-middle, din-full."""

from __future__ import annotations

from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BehaviorEmbedding
from dmqn_core.nn.history_model import Candidates, Histories, HistoryModel
from dmqn_core.nn.match_features import match_width
from dmqn_core.nn.mlp import MLPHead
from dmqn_core.nn.short_term import ShortTermDIN


class DIN(HistoryModel):
    """Local activation unit over the `window` most recent behaviors (None = the whole history)."""

    def __init__(self, config: ModelConfig, window: int | None) -> None:
        super().__init__()
        self.config = config
        self.embedding = BehaviorEmbedding(config)
        self.interest = ShortTermDIN(config.embed_dim, window)
        self.head = MLPHead(config.embed_dim, 1, config.mlp_hidden, config.dropout, n_scalars=match_width(config))
        self.match = self.match_module()

    def interests(self, histories: Histories, candidates: Candidates, hist_index: Tensor) -> Tensor:
        h, c = histories, candidates.embedded
        return self.interest(c, h.embedded, h.mask, hist_index).unsqueeze(1)  # (B, 1, D)
