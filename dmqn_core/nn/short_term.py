"""The short-term interest every long-sequence model pairs with its long-term module (``short_term``).

A long-term module (SIM's exact search, SDIM's hash buckets, DMQN's clusters) reads the whole
history; what the user did just now is read by a separate short-term signal. The models of the
paper's Table 2 disagree on it: SIM, ETA, SDIM, TWIN and TWIN V2 add a DIN over the most recent
behaviors, DMQN (section 2.1) only names "behavior sequence" features. One setting gives every
such model the same one:

- ``mean``: the mean embedding of the ``short_len`` most recent behaviors in the MLP input;
- ``din``: that, and DIN's target attention over those behaviors as one more interest vector;
- ``none``: neither.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.nn.sequence import take_last
from dmqn_core.nn.target_attention import ActivationUnit


class ShortTermDIN(nn.Module):
    """DIN's local activation unit over the `window` most recent behaviors (None = all): DIN itself, and
    the ``din`` short-term interest of the long-sequence models."""

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


def with_short_term(
    short: ShortTermDIN | None, long: Tensor, candidate: Tensor, behaviors: Tensor, mask: Tensor, hist_index: Tensor
) -> Tensor:
    """The long-term interests (B, K, D), followed by the DIN short-term interest when ``short`` exists
    (``short_term = "din"``) -> (B, K or K + 1, D)."""
    if short is None:
        return long
    return torch.cat([long, short(candidate, behaviors, mask, hist_index).unsqueeze(1)], dim=1)
