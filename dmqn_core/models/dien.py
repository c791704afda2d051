"""DIEN (Zhou et al., "Deep Interest Evolution Network for Click-Through Rate Prediction", AAAI 2019).

Over the last `short_len` behaviors, as in the paper:

- interest extractor layer: a GRU (hidden size D) over the behavior embeddings, once per history,
  its states h_t supervised by the auxiliary loss L_aux (h_t must tell the next behavior e_{t+1}
  from a negative sample; sigma(h, e) = sigmoid(<h, e>), the paper's inner-product form);
- interest evolving layer: attention a_t = softmax_t(h_t W c) over the real steps, and an AUGRU
  (GRU whose update gate is scaled by a_t) run per candidate over h_1..h_T; its final state, the
  state after the last real behavior, is the one interest the MLP receives (K = 1).

Choices the paper leaves open or that differ from the released code:

- negatives of L_aux: the paper samples them from the item set; here they are behaviors drawn
  uniformly (torch's global RNG, so seeding torch makes them reproducible) from all real
  positions of the batch's short windows, i.e. real (item, category, behavior type) triples drawn
  by popularity, which needs no item -> category table. A draw that is the positive item itself
  is dropped, following the paper's "except the item clicked at t+1".
- L_aux is the mean over the valid (t, t+1) pairs of all histories (the paper's sum over t with
  1/N over sequences), so that its scale does not grow with history length.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BehaviorEmbedding
from dmqn_core.nn.history_model import Candidates, Histories, HistoryModel
from dmqn_core.nn.match_features import match_width
from dmqn_core.nn.mlp import MLPHead
from dmqn_core.nn.sequence import masked_softmax, take_last


class AUGRUCell(nn.Module):
    """GRU with attentional update gate (DIEN, interest evolving layer).

    u = sigmoid(W^u i + U^u h + b^u), r = sigmoid(W^r i + U^r h + b^r),
    h~ = tanh(W^h i + r * (U^h h) + b^h), u~ = a * u, h' = (1 - u~) * h + u~ * h~.

    The input part W i + b is split off (project_input) so that it runs once per history over all
    steps, and only the recurrent part runs per candidate and step.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.input = nn.Linear(input_dim, 3 * hidden_dim)  # [W^u; W^r; W^h] and the biases
        self.hidden = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)  # [U^u; U^r; U^h]

    def project_input(self, x: Tensor) -> Tensor:
        """(..., input_dim) -> (..., 3 hidden_dim)."""
        return self.input(x)

    def step(self, x_proj: Tensor, h: Tensor, a: Tensor) -> Tensor:
        """x_proj (B, 3D) from project_input, h (B, D), attention a (B,) -> next state (B, D)."""
        xu, xr, xh = x_proj.chunk(3, dim=-1)
        hu, hr, hh = self.hidden(h).chunk(3, dim=-1)
        u = torch.sigmoid(xu + hu)
        r = torch.sigmoid(xr + hr)
        candidate = torch.tanh(xh + r * hh)
        u = a.unsqueeze(-1) * u  # a = 0 (padding, irrelevant step) leaves h unchanged
        return (1 - u) * h + u * candidate

    def forward(self, x: Tensor, h: Tensor, a: Tensor) -> Tensor:
        """x (B, input_dim), h (B, D), a (B,) -> (B, D)."""
        return self.step(self.project_input(x), h, a)


def auxiliary_next_behavior_loss(states: Tensor, behaviors: Tensor, items: Tensor, mask: Tensor) -> Tensor:
    """DIEN's L_aux: -log sigmoid(<h_t, e_{t+1}>) - log(1 - sigmoid(<h_t, e^_{t+1}>)), mean over pairs.

    states (H, T, D) GRU outputs; behaviors (H, T, D) embeddings; items (H, T) ids; mask (H, T),
    left-aligned. Negatives e^ are drawn from the real positions of the whole batch (module
    docstring). Zero when no history has two behaviors.
    """
    H, T, D = behaviors.shape
    pair = mask[:, 1:]  # (H, T-1): t+1 real implies t real in a left-aligned history
    if not bool(pair.any()):
        return states.sum() * 0.0  # keeps the graph connected for a uniform backward
    real = mask.flatten().nonzero().squeeze(1)  # (n,) flat positions of real behaviors
    draw = real[torch.randint(real.numel(), (H, T - 1), device=mask.device)]  # (H, T-1)
    negative = behaviors.flatten(0, 1)[draw]  # (H, T-1, D)
    pair = pair & (items.flatten()[draw] != items[:, 1:])
    h = states[:, :-1]  # (H, T-1, D)
    positive_logit = (h * behaviors[:, 1:]).sum(-1)  # (H, T-1)
    negative_logit = (h * negative).sum(-1)  # (H, T-1)
    loss = -F.logsigmoid(positive_logit) - F.logsigmoid(-negative_logit)  # log(1 - sigmoid(x)) = logsigmoid(-x)
    w = pair.to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp(min=1.0)


class DIEN(HistoryModel):
    """GRU interest extractor + auxiliary loss, AUGRU interest evolution, over the last short_len behaviors."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D = config.embed_dim
        self.config = config
        self.embedding = BehaviorEmbedding(config)
        self.extractor = nn.GRU(D, D, batch_first=True)
        self.attention = nn.Linear(D, D, bias=False)  # W of a_t = softmax(h_t W c)
        self.evolution = AUGRUCell(D, D)
        self.head = MLPHead(D, 1, config.mlp_hidden, config.dropout, n_scalars=match_width(config))
        self.match = self.match_module()

    def extract(self, e: Tensor, hist_mask: Tensor, hist_item: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Interest extractor over the last short_len behaviors.

        -> states h (H, T, D) zero at padding, the behaviors (H, T, D), their item ids (H, T) and
        mask (H, T), T = the longest window of the batch (at least 1), so padding width is irrelevant.
        """
        x, mask = take_last(e, hist_mask, self.config.short_len)  # (H, T0, D)
        items, _ = take_last(hist_item, hist_mask, self.config.short_len)  # (H, T0)
        T = max(int(mask.sum(dim=1).max()), 1)
        x, mask, items = x[:, :T], mask[:, :T], items[:, :T]
        # Padding comes after the real steps, so it cannot reach any real state: no packing needed.
        h, _ = self.extractor(x)  # (H, T, D)
        return h * mask.unsqueeze(-1).to(h.dtype), x, items, mask

    def evolve(self, h: Tensor, mask: Tensor, c: Tensor, hist_index: Tensor) -> tuple[Tensor, Tensor]:
        """Interest evolving layer: h (H, T, D), mask (H, T), c (B, D) -> final AUGRU state (B, D), a (B, T)."""
        keys = self.attention(h).index_select(0, hist_index)  # (B, T, D)
        a = masked_softmax(torch.einsum("btd,bd->bt", keys, c), mask.index_select(0, hist_index))  # (B, T)
        x_proj = self.evolution.project_input(h).index_select(0, hist_index)  # (B, T, 3D)
        state = c.new_zeros(c.shape)  # (B, D)
        # a_t = 0 at padded steps freezes the state, so the last one is the state after the last real behavior.
        for t in range(h.shape[1]):
            state = self.evolution.step(x_proj[:, t], state, a[:, t])
        return state, a

    def interests(self, histories: Histories, candidates: Candidates, hist_index: Tensor) -> Tensor:
        h, c = histories, candidates.embedded
        states, x, items, mask = self.extract(h.embedded, h.mask, h.item)  # (H, T, D), (H, T, D), (H, T), (H, T)
        self._auxiliary = None
        if self.training and self.config.dien_aux_weight > 0:
            # alpha L_aux of L = L_target + alpha L_aux, read by auxiliary_loss()
            self._auxiliary = self.config.dien_aux_weight * auxiliary_next_behavior_loss(states, x, items, mask)
        interest, _ = self.evolve(states, mask, c, hist_index)  # (B, D)
        return interest.unsqueeze(1)  # (B, 1, D)
