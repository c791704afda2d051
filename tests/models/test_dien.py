"""DIEN (dmqn_core.models.dien): AUGRU, the auxiliary next-behavior loss, the interest evolving layer, the model."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.dien import DIEN, AUGRUCell, auxiliary_next_behavior_loss

# DIEN's own mechanism alone; match features have their own tests.
CONFIG = ModelConfig(
    n_items=60, n_categories=8, n_behavior_types=4, embed_dim=8, short_len=6, mlp_hidden=(16, 8), match_features=False
)


def model(seed: int = 0, config: ModelConfig = CONFIG) -> DIEN:
    torch.manual_seed(seed)
    return DIEN(config)


def manual_augru(cell: AUGRUCell, x, h, a):
    """DIEN's AUGRU written out gate by gate from the cell's weight blocks."""
    D = h.shape[-1]
    (wu, wr, wh), (bu, br, bh) = cell.input.weight.split(D), cell.input.bias.split(D)
    uu, ur, uh = cell.hidden.weight.split(D)
    u = torch.sigmoid(x @ wu.T + h @ uu.T + bu)
    r = torch.sigmoid(x @ wr.T + h @ ur.T + br)
    candidate = torch.tanh(x @ wh.T + r * (h @ uh.T) + bh)
    u = a[:, None] * u
    return (1 - u) * h + u * candidate


def test_augru_zero_attention_keeps_the_state():
    torch.manual_seed(0)
    cell = AUGRUCell(5, 4)
    x, h = torch.randn(3, 5), torch.randn(3, 4)
    assert torch.equal(cell(x, h, torch.zeros(3)), h)


def test_augru_matches_manual_gates_and_a_standard_gru_at_full_attention():
    torch.manual_seed(1)
    cell = AUGRUCell(5, 4)
    x, h = torch.randn(3, 5), torch.randn(3, 4)
    a = torch.tensor([1.0, 0.3, 0.8])
    torch.testing.assert_close(cell(x, h, a), manual_augru(cell, x, h, a))
    # torch's GRUCell with the same weights: its gate order is (r, z, n) and z = 1 - u, i.e. z uses -W^u, -U^u, -b^u.
    gru = torch.nn.GRUCell(5, 4)
    (wu, wr, wh), (bu, br, bh) = cell.input.weight.split(4), cell.input.bias.split(4)
    uu, ur, uh = cell.hidden.weight.split(4)
    with torch.no_grad():
        gru.weight_ih.copy_(torch.cat([wr, -wu, wh]))
        gru.bias_ih.copy_(torch.cat([br, -bu, bh]))
        gru.weight_hh.copy_(torch.cat([ur, -uu, uh]))
        gru.bias_hh.zero_()
    with torch.no_grad():
        torch.testing.assert_close(cell(x, h, torch.ones(3)), gru(x, h))
        assert (cell(x, h, a) - gru(x, h))[1:].abs().max() > 1e-3  # attention < 1 does change the step


def test_evolve_is_the_augru_over_the_real_steps_with_softmax_attention():
    m = model(2)
    torch.manual_seed(2)
    h = torch.randn(2, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    h_padded = h.clone()
    h_padded[0, 3:] = 100.0  # whatever sits at padded steps must not matter
    c = torch.randn(3, 8)
    hist_index = torch.tensor([0, 1, 0])
    with torch.no_grad():
        final, a = m.evolve(h_padded, mask, c, hist_index)
        for b, u in enumerate(hist_index.tolist()):
            n = int(mask[u].sum())
            hu = h[u, :n]  # (n, D)
            att = torch.softmax(m.attention(hu) @ c[b], dim=0)  # a_t = softmax_t(h_t W c)
            torch.testing.assert_close(a[b, :n], att)
            assert torch.all(a[b, n:] == 0)
            state = torch.zeros(1, 8)
            for t in range(n):
                state = manual_augru(m.evolution, hu[t : t + 1], state, att[t : t + 1])
            torch.testing.assert_close(final[b], state[0])


def test_auxiliary_loss_uses_next_behavior_and_real_in_batch_negatives():
    # History 0: items (1, 2), history 1: item 3 and a padded position. The only pair is h_0 -> e_1.
    # Negatives: position of item 1 or item 3 (same embedding, so the same loss L*) or item 2 (the
    # positive itself: the pair is dropped, loss 0). A drawn padded position would give another value.
    states = torch.tensor([[[1.0, 0.5], [9.0, 9.0]], [[0.0, 0.0], [0.0, 0.0]]])
    behaviors = torch.tensor([[[0.2, -1.0], [0.7, 0.3]], [[0.2, -1.0], [50.0, 50.0]]])
    items = torch.tensor([[1, 2], [3, 9]])
    mask = torch.tensor([[True, True], [True, False]])
    h0 = states[0, 0]
    expected = -F.logsigmoid(h0 @ behaviors[0, 1]) - F.logsigmoid(-(h0 @ behaviors[0, 0]))
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        loss = auxiliary_next_behavior_loss(states, behaviors, items, mask)
        if float(loss) == 0.0:
            seen.add("dropped")
        else:
            torch.testing.assert_close(loss, expected)
            seen.add("negative")
    assert seen == {"dropped", "negative"}
    # no history with two behaviors: zero
    assert float(auxiliary_next_behavior_loss(states, behaviors, items, torch.tensor([[True, False]] * 2))) == 0.0


def test_auxiliary_loss_is_positive_in_training_and_scaled_by_its_weight():
    b = random_batch(CONFIG, seed=3)
    m = model(3)
    torch.manual_seed(0)
    m(**b)
    first = m.auxiliary_loss()
    assert first.requires_grad and float(first.detach()) > 0
    m2 = model(3, replace(CONFIG, dien_aux_weight=2.5))
    torch.manual_seed(0)  # the same negatives
    m2(**b)
    torch.testing.assert_close(m2.auxiliary_loss(), 2.5 * first)
    m0 = model(3, replace(CONFIG, dien_aux_weight=0.0))
    m0(**b)
    assert float(m0.auxiliary_loss()) == 0.0


def test_auxiliary_loss_trains_the_extractor():
    b = random_batch(CONFIG, seed=4)
    m = model(4)
    torch.manual_seed(0)
    m(**b)
    m.auxiliary_loss().backward()
    assert m.extractor.weight_hh_l0.grad.abs().sum() > 0
    assert m.embedding.item.weight.grad.abs().sum() > 0


def test_only_the_last_short_len_behaviors_matter():
    m = model(7).eval()
    long = random_batch(CONFIG, seed=7, lengths=[10, 0, 8, 10, 3], B=9)
    older = dict(long, hist_item=long["hist_item"].clone())
    older["hist_item"][0, : 10 - CONFIG.short_len] = 1
    with torch.no_grad():
        torch.testing.assert_close(m(**older), m(**long), rtol=0, atol=1e-6)
        older["hist_item"][0, 10 - CONFIG.short_len] = 1 + long["hist_item"][0, 10 - CONFIG.short_len] % 50
        assert (m(**older) - m(**long)).abs().max() > 0


def test_timestamps_are_ignored():
    m = model(9).eval()
    b = random_batch(CONFIG, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(m(**dict(b, hist_timestamp=None)), m(**b))


@pytest.mark.parametrize("short_len", [1, 3])
def test_short_windows(short_len):
    m = model(10, replace(CONFIG, short_len=short_len)).train()
    logits = m(**random_batch(CONFIG, seed=10))
    assert torch.isfinite(logits).all()
    assert float(m.auxiliary_loss().detach()) >= 0
