"""ICIM (dmqn_core.models.dmqn.icim): the HSTU layer against a hand-written eq. 11-13, and masking of empty clusters."""

import numpy as np
import torch
import torch.nn.functional as F

from dmqn_core.models.dmqn.icim import ClusterInteraction, HSTULayer


def randomised_layer(N: int, W: int, D: int, heads: int, seed: int = 0) -> HSTULayer:
    torch.manual_seed(seed)
    layer = HSTULayer(N, W, D, heads)
    with torch.no_grad():
        for p in layer.parameters():  # biases and rel_bias start at zero; make every term count
            p.copy_(torch.randn_like(p) * 0.5)
    return layer.eval()


def reference(layer: HSTULayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 11-13 with explicit loops over users, codebooks, heads and (non-empty) tokens."""
    H, N, W, D = x.shape
    heads = layer.n_heads
    dh = D // heads
    out = torch.zeros_like(x)
    for u in range(H):
        for j in range(N):
            real = [i for i in range(W) if mask[u, j, i]]
            n = max(len(real), 1)
            uvqk = {i: F.silu(x[u, j, i] @ layer.w1[j] + layer.b1[j]) for i in real}  # eq. 11
            for i in real:
                U, _, Q, _ = uvqk[i].split(D)
                av = torch.zeros(D)
                for h in range(heads):
                    sl = slice(h * dh, (h + 1) * dh)
                    for t in real:
                        _, V, _, K = uvqk[t].split(D)
                        a = F.silu(Q[sl] @ K[sl] + layer.rel_bias[j, h, i, t]) / n  # eq. 12
                        av[sl] += a * V[sl]
                normed = (av - av.mean()) / torch.sqrt(av.var(unbiased=False) + 1e-5)
                y = (normed * U) @ layer.w2[j] + layer.b2[j]  # eq. 13
                out[u, j, i] = x[u, j, i] + y
    return out


def test_hstu_layer_matches_hand_written_equations():
    N, W, D, heads = 2, 4, 6, 2
    layer = randomised_layer(N, W, D, heads)
    x = torch.randn(3, N, W, D)
    mask = torch.tensor(
        [
            [[True, True, False, True], [True, False, False, False]],
            [[True, True, True, True], [False, True, True, False]],
            [[False, False, False, False], [False, False, True, True]],
        ]
    )
    x = x * mask[..., None]
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask), reference(layer, x, mask), rtol=1e-5, atol=1e-5)


def test_empty_clusters_neither_attend_nor_are_attended():
    N, W, D, heads = 2, 4, 6, 3
    layer = randomised_layer(N, W, D, heads, seed=1)
    mask = torch.rand(5, N, W) < 0.6
    x = torch.randn(5, N, W, D) * mask[..., None]
    with torch.no_grad():
        out = layer(x, mask)
        garbage = x + torch.randn_like(x) * (~mask)[..., None]  # change only the empty tokens
        assert torch.equal(out, layer(garbage, mask))
    assert torch.equal(out * (~mask)[..., None], torch.zeros_like(out))


def test_extra_empty_cluster_token_changes_no_output():
    N, D, heads = 2, 4, 2
    small = randomised_layer(N, 3, D, heads, seed=2)
    big = randomised_layer(N, 4, D, heads, seed=3)
    with torch.no_grad():  # same parameters; the extra codeword's bias entries get random values
        for name in ("w1", "b1", "w2", "b2"):
            getattr(big, name).copy_(getattr(small, name))
        big.rel_bias[:, :, :3, :3] = small.rel_bias
    mask = torch.tensor([[[True, False, True], [True, True, True]]])
    x = torch.randn(1, N, 3, D) * mask[..., None]
    x_big = torch.cat([x, torch.randn(1, N, 1, D)], dim=2)
    mask_big = torch.cat([mask, torch.zeros(1, N, 1, dtype=torch.bool)], dim=2)
    with torch.no_grad():
        out = small(x, mask)
        out_big = big(x_big, mask_big)
    torch.testing.assert_close(out_big[:, :, :3], out, rtol=0, atol=1e-6)
    assert torch.equal(out_big[:, :, 3], torch.zeros(1, N, D))


def test_stack_gradients_and_identity_with_zero_layers():
    N, W, D = 2, 5, 4
    stack = ClusterInteraction(2, N, W, D, n_heads=2)
    mask = torch.rand(3, N, W) < 0.7
    x = torch.randn(3, N, W, D) * mask[..., None]
    (stack(x, mask) * torch.randn(3, N, W, D)).sum().backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    empty = ClusterInteraction(0, N, W, D, n_heads=2)
    assert list(empty.parameters()) == []
    assert torch.equal(empty(x, mask), x)


def test_layer_change_sums_over_non_empty_clusters():
    # f2 = 0 with bias b: every layer adds b to each non-empty cluster, so |output - input|^2 = |b|^2 per
    # non-empty cluster, and the second layer's input is the first one's output.
    stack = ClusterInteraction(2, n_codebooks=1, codebook_size=3, dim=2, n_heads=1).eval()
    with torch.no_grad():
        for layer in stack.layers:
            layer.w2.zero_()
            layer.b2.copy_(torch.tensor([[3.0, 4.0]]))
    x = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]]])  # (1, 1, 3, 2); the third cluster is empty
    mask = torch.tensor([[[True, True, False]]])
    sums = stack.layer_change(x, mask)
    # layer 0: two clusters change by |(3, 4)|^2 = 25; input 1 + 4. layer 1: input (4, 4) and (3, 6) = 32 + 45.
    np.testing.assert_allclose(sums, [[50.0, 5.0], [50.0, 77.0]])
    assert ClusterInteraction(0, 1, 3, 2, 1).layer_change(x, mask).shape == (0, 2)
