"""ETA (Chen et al., "Efficient Long Sequential User Data Modeling for Click-Through Rate Prediction",
2021; first circulated as "End-to-End User Behavior Retrieval in Click-Through Rate Prediction Model").

Implemented: SimHash retrieval inside the model. A fixed random projection R (D x simhash_bits,
drawn once from a seeded generator, never trained) maps every item embedding to the sign bits of
e R; the candidate's signature is compared with the signature of every behavior of its history by
Hamming distance, and the `top_k` closest behaviors go to multi-head target attention. Because the
hash is applied to the current embeddings, retrieval and attention use the same, end-to-end
trained representation (ETA's point against SIM's offline index). Behavior signatures depend on
the history only and are computed once per history. The short-term interest is the shared
ShortTermDIN; the MLP sees [long, short].

Choices and simplifications, with reasons:
- What is hashed: the item part of a behavior (item + category embedding), i.e. the space the
  candidate lives in; the behavior type has no counterpart in the candidate and would shift every
  behavior's signature alike. The attention itself sees the full behavior embedding.
- Ties: behaviors at equal Hamming distance are taken most recent first, so that with few bits
  the retrieval degrades towards the recent history rather than an arbitrary subset.
- The Hamming distance is computed as the count of differing signature bits on bool tensors;
  ETA packs the bits into integers for XOR + popcount, the same number.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BehaviorEmbedding
from dmqn_core.nn.history_model import Candidates, Histories, HistoryModel
from dmqn_core.nn.sequence import gather_rows
from dmqn_core.nn.short_term import ShortTermDIN, with_short_term
from dmqn_core.nn.target_attention import MultiHeadTargetAttention

# Seed of the SimHash projection: fixed, so that every run and every checkpoint hashes alike.
SIMHASH_SEED = 2021


def simhash(x: Tensor, planes: Tensor) -> Tensor:
    """SimHash signature: (..., D) embeddings, (D, bits) projection -> (..., bits) bool, True where x R > 0."""
    return (x @ planes) > 0


def hamming_top_k(
    hist_signature: Tensor, hist_mask: Tensor, hist_index: Tensor, cand_signature: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """The k behaviors of each candidate's history nearest to it in Hamming distance.

    hist_signature (H, L, bits) bool; hist_mask (H, L); hist_index (B,); cand_signature (B, bits) bool
    -> positions (B, k'), valid (B, k'), k' = min(k, L). Smallest distance first, equal distances
    most recent first, padding never before a real behavior; the kept positions are returned in
    chronological order, left-aligned, invalid entries pointing at 0.
    """
    L, bits = hist_signature.shape[1], hist_signature.shape[2]
    k = min(k, L)
    distance = (hist_signature.index_select(0, hist_index) != cand_signature.unsqueeze(1)).sum(dim=-1)  # (B, L)
    mask = hist_mask.index_select(0, hist_index)  # (B, L)
    pos = torch.arange(L, device=hist_signature.device)
    # One integer orders by (distance, recency); bits + 1 is beyond every real distance.
    key = torch.where(mask, distance * L + (L - 1 - pos), (bits + 1) * L)  # (B, L)
    best = key.topk(k, dim=1, largest=False).indices  # (B, k)
    chosen = torch.where(mask.gather(1, best), best, L).sort(dim=1).values  # (B, k), padding (= L) last
    valid = chosen < L
    return chosen * valid, valid


class ETA(HistoryModel):
    default_short_term: ClassVar[str] = "din"
    planes: Tensor  # a buffer (register_buffer): nn.Module's attribute lookup alone types it Tensor | Module

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D = config.embed_dim
        self.config = config = self.with_resolved_short_term(config)
        self.embedding = BehaviorEmbedding(config)
        g = torch.Generator().manual_seed(SIMHASH_SEED)
        self.register_buffer("planes", torch.randn(D, config.simhash_bits, generator=g))  # (D, bits), not trained
        self.esu = MultiHeadTargetAttention(D, config.attention_heads)
        # Created only with a DIN short-term interest (the default), in the place it always had: the
        # same parameter names and initialisation as before the setting existed.
        self.short = ShortTermDIN(D, config.short_len) if config.short_term == "din" else None
        self.head = self.long_sequence_head()
        self.match = self.match_module()

    def interests(self, histories: Histories, candidates: Candidates, hist_index: Tensor) -> Tensor:
        h, c, cfg = histories, candidates.embedded, self.config
        # Retrieval is a hard selection: no gradient passes it, the embeddings learn through the attention.
        with torch.no_grad():
            hist_signature = simhash(self.embedding.candidate(h.item, h.category), self.planes)  # (H, L, bits)
            positions, valid = hamming_top_k(
                hist_signature, h.mask, hist_index, simhash(c, self.planes), cfg.top_k
            )  # (B, k)
        long, _ = self.esu(c, gather_rows(h.embedded, hist_index, positions), valid)  # (B, D)
        return with_short_term(self.short, long.unsqueeze(1), c, h.embedded, h.mask, hist_index)  # (B, 1 or 2, D)
