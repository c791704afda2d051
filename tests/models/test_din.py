"""DIN's local activation unit, the multi-head target attention and the history helpers they use."""

from __future__ import annotations

import math

import torch
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.din import DIN
from dmqn_core.nn.sequence import last_positions, recent_mean, take_last
from dmqn_core.nn.target_attention import ActivationUnit, MultiHeadTargetAttention

CONFIG = ModelConfig(
    n_items=40,
    n_categories=6,
    n_behavior_types=3,
    embed_dim=8,
    short_len=3,
    middle_len=5,
    mlp_hidden=(16,),
    match_features=False,  # DIN's own mechanism alone; match features have their own tests
)


def test_last_positions_and_take_last():
    mask = torch.tensor([[True, True, True, True, False], [True, False, False, False, False], [False] * 5])
    index, valid = last_positions(mask, 3)
    assert index.tolist() == [[1, 2, 3], [0, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    x = torch.arange(15).view(3, 5) + 1
    values, kept = take_last(x, mask, 3)
    assert values.tolist() == [[2, 3, 4], [6, 0, 0], [0, 0, 0]] and kept.tolist() == valid.tolist()
    e = torch.arange(30, dtype=torch.float).view(3, 5, 2)
    vectors, _ = take_last(e, mask, 10)  # k beyond L keeps everything
    assert vectors.shape == (3, 5, 2) and torch.equal(vectors[0, :4], e[0, :4]) and vectors[2].abs().sum() == 0
    mean = recent_mean(e, mask, 2)
    torch.testing.assert_close(mean[0], e[0, 2:4].mean(0))
    torch.testing.assert_close(mean[2], torch.zeros(2))


def test_activation_unit_equals_the_mlp_over_the_concatenation():
    torch.manual_seed(0)
    unit = ActivationUnit(4, hidden=(6, 5))
    H, L, B = 2, 7, 3
    behaviors, candidate = torch.randn(H, L, 4), torch.randn(B, 4)
    mask = torch.arange(L)[None] < torch.tensor([[7], [3]])
    hist_index = torch.tensor([0, 1, 1])
    interest, weights = unit(candidate, behaviors, mask, hist_index)
    for b in range(B):
        h = hist_index[b]
        for l in range(L):
            x = torch.cat(
                [behaviors[h, l], candidate[b], behaviors[h, l] - candidate[b], behaviors[h, l] * candidate[b]]
            )
            hidden = unit.rest[0](unit.first(x).unsqueeze(0))
            expected = unit.rest[1:](hidden).squeeze() if bool(mask[h, l]) else torch.tensor(0.0)
            torch.testing.assert_close(weights[b, l], expected, atol=1e-5, rtol=1e-5)
        # no softmax: the interest is the weighted sum of the real behaviors
        torch.testing.assert_close(interest[b], (weights[b, :, None] * behaviors[h]).sum(0), atol=1e-5, rtol=1e-5)


def test_multi_head_target_attention_softmax_per_head_and_bias():
    torch.manual_seed(1)
    attention = MultiHeadTargetAttention(8, heads=2)
    candidate, x = torch.randn(2, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, True], [False] * 4])
    bias = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0], [0.0] * 4])
    out, weights = attention(candidate, x, mask, bias)
    q = attention.wq(candidate[0]).view(2, 4)
    k = attention.wk(x[0]).view(4, 2, 4)
    for head in range(2):
        logits = (k[:, head] @ q[head]) / 2.0 + bias[0]
        expected = torch.where(mask[0], logits, torch.tensor(float("-inf"))).softmax(0)
        torch.testing.assert_close(weights[0, head], expected)
    assert weights[1].abs().sum() == 0 and torch.isfinite(out).all()  # an empty row: no NaN
    torch.testing.assert_close(out[1], attention.out.bias)


def test_din_windows_see_only_their_most_recent_behaviors():
    torch.manual_seed(0)
    short = DIN(CONFIG, window=CONFIG.short_len).eval()
    full = DIN(CONFIG, window=None).eval()
    full.load_state_dict(short.state_dict())
    batch = random_batch(CONFIG, seed=5, lengths=[9, 2, 0], B=4)
    changed = dict(batch, hist_item=batch["hist_item"].clone())
    changed["hist_item"][0, :4] = torch.tensor([11, 12, 13, 14])  # older than the last short_len (and the mean)
    with torch.no_grad():
        assert torch.equal(short(**batch), short(**changed))
        assert not torch.allclose(full(**batch), full(**changed))


def test_one_history_for_every_candidate_is_broadcast_with_the_same_result():
    """A served user (H = 1) takes the broadcasting path: the weights of the per-candidate copies exactly, and
    the interest within float32 rounding of an L-term sum (|w b| < 50 here, L = 9: 9 roundings of 2^-24)."""
    torch.manual_seed(3)
    unit = ActivationUnit(4, hidden=(6, 5))
    L, B = 9, 5
    behaviors, candidate = torch.randn(1, L, 4), torch.randn(B, 4)
    mask = torch.arange(L)[None] < 6
    one, copies = torch.zeros(B, dtype=torch.long), torch.tensor([0, 1, 0, 1, 1])
    interest, weights = unit(candidate, behaviors, mask, one)
    expected_interest, expected_weights = unit(candidate, behaviors.expand(2, L, 4), mask.expand(2, L), copies)
    assert torch.equal(weights, expected_weights)
    assert (weights[:, 6:] == 0).all()
    assert torch.allclose(interest, expected_interest, rtol=0, atol=9 * 50 * 2**-24)
