"""TWIN (Chang et al., "TWIN: TWo-stage Interest Network for Lifelong User Behavior Modeling in CTR
Prediction at Kuaishou", KDD 2023).

Implemented: the Consistency-Preserved GSU. The general search unit scores every behavior of the
full history with the very target attention of the exact search unit (same W_q, W_k, same
cross-feature bias), so that both stages agree on what is relevant; the keys x W_k depend on the
behavior only and are computed once per history (what TWIN pre-computes and caches), the query
once per candidate. The `top_k` highest-scoring behaviors go to the ESU, multi-head target
attention with the cross-feature bias. As in every model of the toolkit, a DIN over
the `short_len` most recent behaviors gives the short-term interest; the MLP sees [long, short].

Choices and simplifications, with reasons:
- Multi-head GSU score: TWIN's relevance is one attention score per behavior; with several ESU
  heads we rank by the logit averaged over heads (the log of the geometric mean of the heads'
  unnormalised weights), which treats every head alike.
- Cross features: TWIN compresses each user-behavior cross feature (e.g. time since the
  behavior) into a scalar added to the attention logits ((K_c W^c) beta). The only cross
  feature here is time: the gap between the behavior and the user's most recent behavior (the
  request time is not in the data), in log2 buckets, each with a learned bias shared by the heads
  (MultiHeadTargetAttention takes one bias for all heads). TWIN also feeds the cross features into
  the values; here the values are the behavior embeddings only. Without timestamps the bias is 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BehaviorEmbedding
from dmqn_core.nn.history_model import Candidates, Histories, HistoryModel
from dmqn_core.nn.sequence import TIME_BUCKETS, gather_rows, time_gaps
from dmqn_core.nn.short_term import ShortTermDIN, with_short_term
from dmqn_core.nn.target_attention import MultiHeadTargetAttention


class TimeGapBias(nn.Module):
    """TWIN's compressed cross feature: one learned logit bias per log2 time-gap bucket."""

    def __init__(self, buckets: int = TIME_BUCKETS) -> None:
        super().__init__()
        self.table = nn.Embedding(buckets, 1)
        nn.init.zeros_(self.table.weight)  # start from the plain attention of the inherent features

    def forward(self, gap: Tensor) -> Tensor:
        """gap (...) seconds, float -> bias (...)."""
        bucket = torch.log2(1.0 + gap).floor().long().clamp(0, self.table.num_embeddings - 1)
        return self.table(bucket).squeeze(-1)


def general_search_scores(
    esu: MultiHeadTargetAttention,
    candidate: Tensor,
    keys: Tensor,
    mask: Tensor,
    hist_index: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """CP-GSU relevance of every behavior to every candidate, with the ESU's own attention.

    candidate (B, D); keys (H, L, heads, d) = esu.project_keys(behaviors); mask (H, L);
    hist_index (B,); bias (H, L) or None -> scores (B, L): the logit averaged over heads plus the
    bias, -inf at padding.
    """
    logits = esu.logits(candidate, keys.index_select(0, hist_index)).mean(dim=1)  # (B, L)
    if bias is not None:
        logits = logits + bias.index_select(0, hist_index)
    return logits.masked_fill(~mask.index_select(0, hist_index), float("-inf"))


def top_k_search(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best positions of scores (B, L) -> index (B, k'), valid (B, k'); k' = min(k, L).

    Invalid entries (a history with fewer than k behaviors) hold a padding position and are masked.
    """
    top, index = scores.topk(min(k, scores.shape[1]), dim=1)  # (B, k')
    return index, torch.isfinite(top)


def general_search(
    esu: MultiHeadTargetAttention,
    candidate: Tensor,
    behaviors: Tensor,
    mask: Tensor,
    hist_index: Tensor,
    k: int,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """TWIN's GSU: the k behaviors (H, L, D) of each candidate's history the ESU attention rates highest.

    Returns positions (B, k') and their validity (B, k'). Retrieval is a hard selection that no
    gradient passes; the ESU parameters learn through the ESU, which the GSU then follows.
    """
    with torch.no_grad():
        keys = esu.project_keys(behaviors)  # (H, L, heads, d), once per history
        scores = general_search_scores(esu, candidate, keys, mask, hist_index, bias)  # (B, L)
        return top_k_search(scores, k)


class TWIN(HistoryModel):
    default_short_term: ClassVar[str] = "din"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D = config.embed_dim
        self.config = config = self.with_resolved_short_term(config)
        self.embedding = BehaviorEmbedding(config)
        self.esu = MultiHeadTargetAttention(D, config.attention_heads)
        self.time_bias = TimeGapBias()
        # Created only with a DIN short-term interest (the default), in the place it always had: the
        # same parameter names and initialisation as before the setting existed.
        self.short = ShortTermDIN(D, config.short_len) if config.short_term == "din" else None
        self.head = self.long_sequence_head()
        self.match = self.match_module()

    def interests(self, histories: Histories, candidates: Candidates, hist_index: Tensor) -> Tensor:
        h, c, cfg = histories, candidates.embedded, self.config
        bias = None if h.timestamp is None else self.time_bias(time_gaps(h.timestamp, h.mask))  # (H, L)
        index, valid = general_search(self.esu, c, h.embedded, h.mask, hist_index, cfg.top_k, bias)  # (B, k)
        picked = gather_rows(h.embedded, hist_index, index)  # (B, k, D)
        picked_bias = None if bias is None else gather_rows(bias, hist_index, index)  # (B, k)
        long, _ = self.esu(c, picked, valid, picked_bias)  # (B, D)
        return with_short_term(self.short, long.unsqueeze(1), c, h.embedded, h.mask, hist_index)  # (B, 1 or 2, D)
