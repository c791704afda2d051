"""MLPHead: the prediction MLP shared by every sequence model (section 2.1, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class MLPHead(nn.Module):
    """concat[c, interests (K*D), recent, c * recent] -> hidden layers -> one logit.

    c * recent gives the MLP an explicit candidate / short-term-interest match feature, which a
    ReLU-family MLP otherwise has to approximate from the concatenation.
    Activation: PReLU, as in DIN's MLP (no dead units on these small inputs).
    """

    def __init__(self, dim: int, n_interests: int, hidden: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim * (n_interests + 3)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU(h), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, candidate: Tensor, interests: Tensor, recent: Tensor) -> Tensor:
        """candidate (B, D), interests (B, K, D), recent (B, D) -> (B,) logits."""
        x = torch.cat([candidate, interests.flatten(1), recent, candidate * recent], dim=-1)  # (B, (K+3) D)
        return self.net(x).squeeze(-1)
