"""DSIN (Feng et al., "Deep Session Interest Network for Click-Through Rate Prediction", IJCAI 2019).

The four layers of the paper's behavior part:

- session division: a new session starts where the gap between consecutive behaviors is
  strictly greater than `session_gap` seconds (the paper: "a time gap of more than 30 minutes");
  the `max_sessions` most recent sessions are kept, each cut to its `session_len` most recent
  behaviors (split_sessions);
- session interest extractor: bias encoding BE_(k,t,c) = w^K_k + w^T_t + w^C_c added to the
  behaviors, one transformer layer (multi-head self-attention + FFN, residuals and layer norm)
  shared by all sessions, average pooling -> one interest I_k per session;
- session interest interacting: a Bi-LSTM over the sessions, H_k = forward + backward state
  (the paper's combination of the two directions, taken as a sum so that H_k stays in R^D);
- session interest activating: a^I_k = softmax_k(I_k W^I c), U^I = sum_k a^I_k I_k and
  a^H_k = softmax_k(H_k W^H c), U^H = sum_k a^H_k H_k, over the existing sessions only.

The MLP receives [U^I, U^H] (K = 2). The paper does not say from which end the sessions k and
positions t of the bias encoding are counted; here both count back from the most recent one, so
a bias means the same thing ("the latest session", "a session's latest behavior") for every
user, whatever its number of sessions or session length. Heads: config.attention_heads; FFN
width 4 D as in the Transformer the paper builds on.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BehaviorEmbedding
from dmqn_core.nn.history_model import Candidates, Histories, HistoryModel
from dmqn_core.nn.match_features import match_width
from dmqn_core.nn.mlp import MLPHead
from dmqn_core.nn.sequence import masked_softmax


def split_sessions(
    timestamp: Tensor, mask: Tensor, gap: int, max_sessions: int, session_len: int
) -> tuple[Tensor, Tensor]:
    """Session division: (H, L) timestamps and left-aligned mask -> positions (H, S, T) and mask (H, S, T).

    Behavior l > 0 opens a new session iff timestamp[l] - timestamp[l-1] > gap (a gap of exactly
    `gap` does not split). positions[h, s, t] is the history position of the t-th kept behavior
    of the s-th kept session (S = max_sessions, T = session_len), both chronological and
    left-aligned: the most recent session is the last real row, the most recent behavior of a
    session its last real column. Unused slots point at position 0 and are False in the mask.
    """
    H, L = mask.shape
    S, T = max_sessions, session_len
    pos = torch.arange(L, device=mask.device).expand(H, L)  # (H, L)
    previous = F.pad(timestamp[:, :-1], (1, 0))  # (H, L) timestamp of behavior l-1
    starts = mask & ((pos == 0) | (timestamp - previous > gap))  # (H, L)
    session = starts.long().cumsum(dim=1) - 1  # (H, L) chronological session number, -1 before any
    n_sessions = starts.sum(dim=1, keepdim=True)  # (H, 1)
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values  # (H, L) start of own session
    offset = pos - first  # (H, L) index within the session
    safe_session = session.clamp(min=0)
    length = torch.zeros_like(pos).scatter_add(1, safe_session, mask.long()).gather(1, safe_session)  # (H, L)
    slot = session - (n_sessions - n_sessions.clamp(max=S))  # (H, L) row among the kept sessions
    column = offset - (length - length.clamp(max=T))  # (H, L) column among the kept behaviors
    keep = mask & (slot >= 0) & (column >= 0)  # (H, L)
    # Dropped behaviors all go to one extra bin at S*T, cut off afterwards.
    target = torch.where(keep, slot * T + column, torch.full_like(pos, S * T))  # (H, L)
    positions = torch.zeros(H, S * T + 1, dtype=torch.long, device=mask.device).scatter_(1, target, pos)
    kept = torch.zeros(H, S * T + 1, dtype=torch.bool, device=mask.device).scatter_(1, target, keep)
    return positions[:, : S * T].view(H, S, T), kept[:, : S * T].view(H, S, T)


class SessionInterestExtractor(nn.Module):
    """Bias encoding + one transformer layer per session + average pooling: (H, S, T, D) -> (H, S, D)."""

    def __init__(self, dim: int, heads: int, max_sessions: int, session_len: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        # BE_(k,t,c) = w^K_k + w^T_t + w^C_c: a scalar per session, a scalar per position, a vector over units.
        self.session_bias = nn.Parameter(torch.zeros(max_sessions))  # w^K
        self.position_bias = nn.Parameter(torch.zeros(session_len))  # w^T
        self.unit_bias = nn.Parameter(torch.zeros(dim))  # w^C
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def bias_encoding(self, mask: Tensor) -> Tensor:
        """mask (H, S, T) -> BE (H, S, T, D); k and t count back from the latest session / behavior."""
        n_sessions = mask.any(dim=-1).sum(dim=-1, keepdim=True)  # (H, 1)
        n_behaviors = mask.sum(dim=-1, keepdim=True)  # (H, S, 1)
        s = torch.arange(mask.shape[1], device=mask.device)
        t = torch.arange(mask.shape[2], device=mask.device)
        k = (n_sessions - 1 - s).clamp(min=0)  # (H, S)
        j = (n_behaviors - 1 - t).clamp(min=0)  # (H, S, T)
        be = self.session_bias[k].unsqueeze(-1) + self.position_bias[j]  # (H, S, T)
        return (be.unsqueeze(-1) + self.unit_bias) * mask.unsqueeze(-1).to(be.dtype)

    def attend(self, x: Tensor, mask: Tensor) -> Tensor:
        """Transformer layer (post-norm, as in the Transformer DSIN uses): x (n, T, D), mask (n, T) -> (n, T, D).

        Heads split the D units; logits are scaled by sqrt(D / heads), the Transformer's sqrt(d_k). Every row
        must hold at least one real behavior (the caller passes existing sessions only).
        """
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (n, h, T, d)
        x = self.norm1(x + self.dropout(self.out(attended.transpose(1, 2).flatten(2))))
        return self.norm2(x + self.dropout(self.ffn(x)))

    def forward(self, q: Tensor, mask: Tensor) -> Tensor:
        """q (H, S, T, D) session behaviors, mask (H, S, T) -> interests I (H, S, D), zero for missing sessions."""
        H, S, T, D = q.shape
        q = q + self.bias_encoding(mask)
        exists = mask.any(dim=-1).flatten()  # (H*S,)
        index = exists.nonzero().squeeze(1)  # (n,)
        m = mask.flatten(0, 1).index_select(0, index)  # (n, T)
        x = self.attend(q.flatten(0, 1).index_select(0, index), m)  # (n, T, D)
        w = m.to(x.dtype)
        pooled = torch.einsum("ntd,nt->nd", x, w) / w.sum(dim=1, keepdim=True)  # (n, D) average over real behaviors
        return q.new_zeros(H * S, D).index_copy(0, index, pooled).view(H, S, D)


class DSIN(HistoryModel):
    """Session division, session self-attention, Bi-LSTM over sessions, target attention over both."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D = config.embed_dim
        self.config = config
        self.embedding = BehaviorEmbedding(config)
        self.extractor = SessionInterestExtractor(
            D, config.attention_heads, config.max_sessions, config.session_len, config.dropout
        )
        self.interaction = nn.LSTM(D, D, batch_first=True, bidirectional=True)
        self.activate_interest = nn.Linear(D, D, bias=False)  # W^I
        self.activate_hidden = nn.Linear(D, D, bias=False)  # W^H
        self.head = MLPHead(D, 2, config.mlp_hidden, config.dropout, n_scalars=match_width(config))
        self.match = self.match_module()

    def interact(self, interests: Tensor, session_mask: Tensor) -> Tensor:
        """Bi-LSTM over the existing sessions: I (H, S, D), mask (H, S) -> H_k (H, S, D), zero for missing sessions.

        Packing makes the backward direction start at each user's latest session, not at padding.
        """
        H, S, D = interests.shape
        lengths = session_mask.sum(dim=1).clamp(min=1).cpu()  # an empty history runs one masked step
        packed = pack_padded_sequence(interests, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.interaction(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=S)  # (H, S, 2D)
        return out.view(H, S, 2, D).sum(dim=2) * session_mask.unsqueeze(-1).to(out.dtype)

    def activate(
        self, values: Tensor, weight: nn.Linear, session_mask: Tensor, c: Tensor, hist_index: Tensor
    ) -> Tensor:
        """a_k = softmax_k(v_k W c) over existing sessions, sum_k a_k v_k: values (H, S, D) -> (B, D)."""
        keys = weight(values).index_select(0, hist_index)  # (B, S, D)
        a = masked_softmax(torch.einsum("bsd,bd->bs", keys, c), session_mask.index_select(0, hist_index))
        return torch.einsum("bs,bsd->bd", a, values.index_select(0, hist_index))

    def interests(self, histories: Histories, candidates: Candidates, hist_index: Tensor) -> Tensor:
        h, cfg = histories, self.config
        if h.timestamp is None:
            raise ValueError("DSIN needs hist_timestamp to divide the history into sessions")
        positions, mask = split_sessions(h.timestamp, h.mask, cfg.session_gap, cfg.max_sessions, cfg.session_len)
        H, S, T = positions.shape
        e = h.embedded
        q = e.gather(1, positions.view(H, S * T, 1).expand(-1, -1, e.shape[-1])).view(H, S, T, -1)
        q = q * mask.unsqueeze(-1).to(q.dtype)  # (H, S, T, D)
        session_mask = mask.any(dim=-1)  # (H, S)
        interests = self.extractor(q, mask)  # (H, S, D)
        hidden = self.interact(interests, session_mask)  # (H, S, D)
        cand = candidates.embedded  # (B, D)
        u_i = self.activate(interests, self.activate_interest, session_mask, cand, hist_index)  # (B, D)
        u_h = self.activate(hidden, self.activate_hidden, session_mask, cand, hist_index)  # (B, D)
        return torch.stack([u_i, u_h], dim=1)
