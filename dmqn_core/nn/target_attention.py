"""Target attention, the candidate-conditioned pooling every baseline of Table 2 is built from.

ActivationUnit is DIN's local activation unit (Zhou et al., KDD 2018); MultiHeadTargetAttention
is the scaled dot-product multi-head attention with the candidate as the only query that SIM,
ETA, TWIN and TWIN V2 use in their exact search units.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor


class ActivationUnit(nn.Module):
    """DIN: w_l = MLP([b_l, c, b_l - c, b_l * c]); interest = sum_l w_l b_l (no softmax, as in DIN).

    The first layer is linear in its four blocks, so W [b, c, b - c, b*c] is computed as
    (W_b + W_d) b + (W_c - W_d) c + W_p (b*c): the b-part once per history (not once per
    candidate), the c-part once per candidate. Same function, a third of the work at L = 1000.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (80, 40)) -> None:
        super().__init__()
        self.first = nn.Linear(4 * dim, hidden[0])
        layers: list[nn.Module] = [nn.PReLU(hidden[0])]
        width = hidden[0]
        for h in hidden[1:]:
            layers += [nn.Linear(width, h), nn.PReLU(h)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.rest = nn.Sequential(*layers)

    def weights(self, candidate: Tensor, behaviors: Tensor, mask: Tensor, hist_index: Tensor) -> Tensor:
        """candidate (B, D); behaviors (H, L, D); mask (H, L); hist_index (B,) -> weights (B, L), 0 at padding."""
        D = candidate.shape[-1]
        w_b, w_c, w_d, w_p = self.first.weight.split(D, dim=1)  # 4 x (h0, D)
        per_history = behaviors @ (w_b + w_d).T  # (H, L, h0)
        per_candidate = candidate @ (w_c - w_d).T + self.first.bias  # (B, h0)
        # One history for every candidate (a served user): broadcast it, the same values as B copies.
        rows = (lambda x: x) if behaviors.shape[0] == 1 else (lambda x: x.index_select(0, hist_index))
        b = rows(behaviors)  # (B or 1, L, D)
        hidden = rows(per_history) + per_candidate.unsqueeze(1) + (b * candidate.unsqueeze(1)) @ w_p.T  # (B, L, h0)
        # PReLU's per-channel slopes read dim 1 as the channel: run the MLP on (B*L, h0).
        w = self.rest(hidden.flatten(0, 1)).view(hidden.shape[:2])  # (B, L)
        return w * rows(mask).to(w.dtype)

    def forward(self, candidate: Tensor, behaviors: Tensor, mask: Tensor, hist_index: Tensor) -> tuple[Tensor, Tensor]:
        """-> interest (B, D) and weights (B, L)."""
        w = self.weights(candidate, behaviors, mask, hist_index)  # (B, L)
        if behaviors.shape[0] == 1:
            return w @ behaviors[0], w  # (B, L) x (L, D)
        return torch.einsum("bl,bld->bd", w, behaviors.index_select(0, hist_index)), w


class MultiHeadTargetAttention(nn.Module):
    """softmax_l(q_h . k_hl / sqrt(d) + bias_l) v_hl per head h, heads concatenated and projected.

    q = c W_q, k = x W_k, v = x W_v. The keys depend on the behavior only, which is what lets
    TWIN's general search unit score a whole history with precomputed (cached) keys.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def project_keys(self, x: Tensor) -> Tensor:
        """x (..., D) -> keys (..., heads, D / heads)."""
        return self.wk(x).unflatten(-1, (self.heads, -1))

    def logits(self, candidate: Tensor, keys: Tensor) -> Tensor:
        """candidate (B, D); keys (B, K, heads, d) -> attention logits (B, heads, K)."""
        q = self.wq(candidate).unflatten(-1, (self.heads, -1))  # (B, h, d)
        return torch.einsum("bhd,bkhd->bhk", q, keys) / math.sqrt(keys.shape[-1])

    def forward(self, candidate: Tensor, x: Tensor, mask: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """candidate (B, D); x (B, K, D); mask (B, K) bool; bias (B, K) added to every head's logits.

        Returns the interest (B, D) and the weights (B, heads, K), which are 0 at masked
        positions; a row without any real behavior gets a zero interest before the output layer.
        """
        logits = self.logits(candidate, self.project_keys(x))  # (B, h, K)
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        has_any = mask.any(dim=-1).view(-1, 1, 1)  # (B, 1, 1)
        weights = logits.masked_fill(~has_any, 0.0).softmax(dim=-1) * has_any  # (B, h, K)
        v = self.wv(x).unflatten(-1, (self.heads, -1))  # (B, K, h, d)
        pooled = torch.einsum("bhk,bkhd->bhd", weights, v).flatten(1)  # (B, D)
        return self.out(pooled), weights
