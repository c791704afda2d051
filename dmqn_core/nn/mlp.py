"""MLPHead: the prediction MLP shared by every sequence model (section 2.1, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class MLPHead(nn.Module):
    """concat[c, interests (K*D), c * interests (K*D), recent, c * recent, scalars (S)] -> MLP -> logit.

    The products give the MLP explicit candidate / interest match features, which a ReLU-family
    MLP otherwise has to approximate from the concatenation; ``scalars`` carries per-interest
    match strengths (see attention.py). Activation: PReLU, as in DIN's MLP.
    """

    def __init__(
        self, dim: int, n_interests: int, hidden: tuple[int, ...], dropout: float = 0.0, n_scalars: int = 0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim * (2 * n_interests + 3) + n_scalars
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU(h), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, candidate: Tensor, interests: Tensor, recent: Tensor, scalars: Tensor | None = None) -> Tensor:
        """candidate (B, D), interests (B, K, D), recent (B, D), scalars (B, S) -> (B,) logits."""
        parts = [
            candidate,
            interests.flatten(1),
            (candidate.unsqueeze(1) * interests).flatten(1),
            recent,
            candidate * recent,
        ]
        if scalars is not None:
            parts.append(scalars)
        return self.net(torch.cat(parts, dim=-1)).squeeze(-1)  # input (B, (2K+3) D + S)
