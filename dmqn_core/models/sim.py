"""SIM (Pi et al., "Search-based User Interest Modeling with Lifelong Sequential Behavior Data for
Click-Through Rate Prediction", CIKM 2020), hard-search variant.

Implemented: the General Search Unit's hard search (eq. 1 with the category as the key:
r_i = Sign(C_i = C_a)) keeps, for every candidate, the behaviors of its full history that share
the candidate's category, the `top_k` most recent of them. The Exact Search Unit is multi-head
target attention over them; each retrieved behavior carries SIM's temporal embedding,
z_j = e_j + e_t(D_j). A DIN over the `short_len` most recent behaviors
(ShortTermDIN, shared with ETA and SDIM) gives the short-term interest; the MLP sees [long, short].

Choices and simplifications, with reasons:
- Time interval D_j: SIM measures it from the behavior to the target's request time, which is not
  in the data; here it is the gap to the user's most recent behavior (sequence.time_gaps, the same
  log2 buckets as TWIN). Without timestamps the temporal embedding is left out.
- SIM concatenates [e_j; e_t] before the attention projections; adding e_t to e_j keeps the
  width D of MultiHeadTargetAttention and spans the same functions (W [e; t] = W_e e + W_t t, and
  the learned table can absorb W_t).
- Recency among same-category behaviors: SIM's hard search keeps the category's behaviors up to a
  length limit; when more than `top_k` match, the most recent are kept, as a time-ordered
  category index truncated at `top_k` would.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BEHAVIOR_INIT_STD, BehaviorEmbedding
from dmqn_core.nn.history_model import Candidates, Histories, HistoryModel
from dmqn_core.nn.sequence import TIME_BUCKETS, gather_rows, time_buckets
from dmqn_core.nn.short_term import ShortTermDIN, with_short_term
from dmqn_core.nn.target_attention import MultiHeadTargetAttention


def category_search(
    hist_category: Tensor, hist_mask: Tensor, hist_index: Tensor, cand_category: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """SIM hard search: the k most recent behaviors of each candidate's history in the candidate's category.

    hist_category, hist_mask (H, L); hist_index, cand_category (B,) -> positions (B, k'), valid (B, k'),
    k' = min(k, L). Left-aligned and chronological like the histories; invalid entries point at 0.
    """
    B, L = hist_index.shape[0], hist_category.shape[1]
    k = min(k, L)
    match = (hist_category.index_select(0, hist_index) == cand_category.unsqueeze(1)) & hist_mask.index_select(
        0, hist_index
    )  # (B, L), eq. 1: r_i = Sign(C_i = C_a)
    count = match.sum(dim=1, keepdim=True)  # (B, 1)
    kept = count.clamp(max=k)  # (B, 1)
    # A match's output slot is its chronological rank among the matches minus the number dropped
    # (the oldest count - kept); negative slots are the dropped ones.
    slot = match.cumsum(dim=1) - 1 - (count - kept)  # (B, L)
    keep = match & (slot >= 0)
    pos = torch.arange(L, device=hist_category.device).expand(B, L)
    # Everything not kept is written to the spare column k, which is then cut off.
    positions = torch.zeros(B, k + 1, dtype=torch.long, device=hist_category.device)
    positions.scatter_(1, torch.where(keep, slot, k), pos)
    valid = torch.arange(k, device=hist_category.device).unsqueeze(0) < kept  # (B, k)
    return positions[:, :k], valid


class SIM(HistoryModel):
    default_short_term: ClassVar[str] = "din"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D = config.embed_dim
        self.config = config = self.with_resolved_short_term(config)
        self.embedding = BehaviorEmbedding(config)
        self.time = nn.Embedding(TIME_BUCKETS, D)  # the ESU's temporal embedding e_t, one per log2 gap bucket
        nn.init.normal_(self.time.weight, std=BEHAVIOR_INIT_STD)  # a small field seen often, like behavior types
        self.esu = MultiHeadTargetAttention(D, config.attention_heads)
        # Created only with a DIN short-term interest (the default), in the place it always had: the
        # same parameter names and initialisation as before the setting existed.
        self.short = ShortTermDIN(D, config.short_len) if config.short_term == "din" else None
        self.head = self.long_sequence_head()
        self.match = self.match_module()

    def interests(self, histories: Histories, candidates: Candidates, hist_index: Tensor) -> Tensor:
        h, c, cfg = histories, candidates.embedded, self.config
        positions, valid = category_search(h.category, h.mask, hist_index, candidates.category, cfg.top_k)  # (B, k)
        z = gather_rows(h.embedded, hist_index, positions)  # (B, k, D)
        if h.timestamp is not None:
            bucket = gather_rows(time_buckets(h.timestamp, h.mask), hist_index, positions)  # (B, k)
            z = z + self.time(bucket)
        long, _ = self.esu(c, z, valid)  # (B, D)
        return with_short_term(self.short, long.unsqueeze(1), c, h.embedded, h.mask, hist_index)  # (B, 1 or 2, D)
