"""MLPHead: the prediction MLP shared by every sequence model (section 2.1, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class MLPHead(nn.Module):
    """concat[c, interests (K*D), c * interests (K*D), recent, c * recent, scalars (S)] -> MLP -> logit.

    The products give the MLP explicit candidate / interest match features, which a ReLU-family
    MLP otherwise has to approximate from the concatenation; ``scalars`` carries per-interest
    match strengths (see ctam.py). ``products=False`` drops c * interests and c * recent, leaving
    the plain concatenation of eq. 1 (DMQN's ``mlp_products``; every baseline keeps them).
    ``recent=False`` drops recent and c * recent (``short_term = "none"``).
    Activation: PReLU, as in DIN's MLP.
    """

    def __init__(
        self,
        dim: int,
        n_interests: int,
        hidden: tuple[int, ...],
        dropout: float = 0.0,
        n_scalars: int = 0,
        products: bool = True,
        recent: bool = True,
    ) -> None:
        super().__init__()
        self.products = products
        self.n_scalars = n_scalars
        self.recent = recent
        # c, interests, recent; the products add one D per interest and one for recent.
        n_recent = 1 if recent else 0
        width = dim * (n_interests + 1 + n_recent) + (dim * (n_interests + n_recent) if products else 0) + n_scalars
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU(h), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, candidate: Tensor, interests: Tensor, recent: Tensor, scalars: Tensor | None = None) -> Tensor:
        """candidate (B, D), interests (B, K, D), recent (B, D), scalars (B, S) -> (B,) logits.

        ``recent`` is not read by a head built with ``recent=False``."""
        given = 0 if scalars is None else scalars.shape[-1]
        if given != self.n_scalars:  # a clearer error than the first Linear's shape mismatch
            raise ValueError(f"the head was built for {self.n_scalars} scalars, got {given}")
        parts = [candidate, interests.flatten(1)]
        if self.products:
            parts.append((candidate.unsqueeze(1) * interests).flatten(1))
        if self.recent:
            parts += [recent, candidate * recent] if self.products else [recent]
        if scalars is not None:
            parts.append(scalars)
        # input (B, (2K+3) D + S) with the products, (B, (K+2) D + S) without
        return self.net(torch.cat(parts, dim=-1)).squeeze(-1)
