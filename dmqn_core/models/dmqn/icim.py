"""ICIM, the Interest Clusters Interaction Module (section 2.3, eq. 11-13): HSTU over cluster tokens.

Each codebook's W cluster tokens form one short sequence; an HSTU layer lets the clusters of
one user and codebook interact. Codebooks never mix: each is its own quantization of the
behavior space, so each gets its own parameters (batched over N with einsum).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class HSTULayer(nn.Module):
    def __init__(self, n_codebooks: int, codebook_size: int, dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        N, W, D = n_codebooks, codebook_size, dim
        assert D % n_heads == 0, "dim must be divisible by n_heads"
        self.n_heads = n_heads
        # eq. 11: f1 is one fused linear D -> 4D producing U, V, Q, K (per codebook).
        self.w1 = nn.Parameter(torch.empty(N, D, 4 * D))
        self.b1 = nn.Parameter(torch.zeros(N, 4 * D))
        # eq. 13: f2 is one linear D -> D.
        self.w2 = nn.Parameter(torch.empty(N, D, D))
        self.b2 = nn.Parameter(torch.zeros(N, D))
        # eq. 12 bias^p, "relative cluster bias". Codeword indices carry no order, so there is no
        # distance to be relative to; but a codeword keeps its identity across users, so the pair
        # (codeword i, codeword j) plays the role of the relative position: one learnable bias per
        # (codebook, head, i, j), a W x W table per codebook and head. Zero init = no prior.
        self.rel_bias = nn.Parameter(torch.zeros(N, n_heads, W, W))
        # nn.Linear's default range U(-1/sqrt(fan_in), 1/sqrt(fan_in)), applied to the batched weights.
        bound = D**-0.5
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.w2, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (H, N, W, D) cluster tokens, zero at empty clusters; mask (H, N, W) bool -> (H, N, W, D).

        Computed codebook-major, (N, H, W, ...): each codebook's weights then apply to one contiguous
        (H W, D) block in a single batched matmul with its bias (baddbmm), and the elementwise ops that
        follow read contiguous memory (an einsum over (H, N, W, D) returns a permuted view, on which
        the bias add and SiLU ran several times slower on CPU).
        """
        H, N, W, D = x.shape
        h, dh = self.n_heads, D // self.n_heads
        xn = x.transpose(0, 1).reshape(N, H * W, D)  # (N, H W, D)
        m = mask.transpose(0, 1).to(x.dtype)  # (N, H, W)

        # eq. 11: U, V, Q, K = Split(SiLU(f1(R)))
        uvqk = F.silu(torch.baddbmm(self.b1.unsqueeze(1), xn, self.w1))  # (N, H W, 4D)
        u, v, q, k = uvqk.split(D, dim=-1)  # each (N, H W, D)

        def heads(t: Tensor) -> Tensor:
            return t.reshape(N * H, W, h, dh).transpose(1, 2)  # (N H, h, W, dh)

        # eq. 12: A = SiLU(Q K^T + bias^p), no softmax. The reference HSTU divides by the sequence
        # length n; we divide by the number of NON-EMPTY clusters of this user and codebook, and zero
        # every pair that involves an empty cluster, so the output does not depend on how many empty
        # cluster tokens are carried along (the serving cache keeps only the non-empty ones).
        # The bias is indexed by codeword id, so x must hold all W tokens in codeword order here.
        logits = (heads(q) @ heads(k).transpose(-1, -2)).view(N, H, h, W, W) + self.rel_bias.unsqueeze(1)
        pair = m[:, :, None, :, None] * m[:, :, None, None, :]  # (N, H, 1, W, W)
        n_real = m.sum(dim=-1).clamp(min=1.0)[:, :, None, None, None]  # (N, H, 1, 1, 1)
        attn = F.silu(logits) * pair / n_real  # (N, H, h, W, W)
        av = (attn.view(N * H, h, W, W) @ heads(v)).transpose(1, 2).reshape(N, H * W, D)  # (N, H W, D)

        # eq. 13: Y = f2(Norm(A V) * U). The layer norm has no affine parameters, as in the reference
        # HSTU: the gate U and f2 that follow already provide a per-channel scale and shift.
        gated = self.dropout(F.layer_norm(av, (D,)) * u)
        y = torch.baddbmm(self.b2.unsqueeze(1), gated, self.w2)  # (N, H W, D)
        # Residual (as in the reference HSTU) so stacked layers refine rather than replace the
        # cluster means; empty clusters stay exactly zero.
        out = (xn + y).view(N, H, W, D) * m.unsqueeze(-1)  # (N, H, W, D)
        return out.transpose(0, 1).contiguous()  # (H, N, W, D)


class ClusterInteraction(nn.Module):
    """A stack of icim_layers HSTU layers; 0 layers is the identity (DMQN-simple, Table 3)."""

    def __init__(
        self, n_layers: int, n_codebooks: int, codebook_size: int, dim: int, n_heads: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            HSTULayer(n_codebooks, codebook_size, dim, n_heads, dropout) for _ in range(n_layers)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """(H, N, W, D), (H, N, W) bool -> (H, N, W, D)."""
        for layer in self.layers:
            x = layer(x, mask)
        return x

    @torch.no_grad()
    def layer_change(self, x: Tensor, mask: Tensor) -> np.ndarray:
        """How much each layer changes its input: (n_layers, 2) float64 sums over the non-empty clusters of
        [|output - input|^2, |input|^2], so that sqrt(first / second) is the layer's relative change and
        batches add up. x (H, N, W, D) cluster tokens, mask (H, N, W) bool.
        """
        sums = np.zeros((len(self.layers), 2))
        m = mask.unsqueeze(-1).to(x.dtype)  # (H, N, W, 1); empty clusters are zero anyway, this makes it explicit
        for i, layer in enumerate(self.layers):
            y = layer(x, mask)
            sums[i] = [float((((y - x) * m) ** 2).sum()), float(((x * m) ** 2).sum())]
            x = y
        return sums
