"""DIEN (dmqn_core.dien): AUGRU, the auxiliary next-behavior loss, the interest evolving layer, the model."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dmqn_core.config import ModelConfig
from dmqn_core.dien import DIEN, AUGRUCell, auxiliary_next_behavior_loss

CONFIG = ModelConfig(n_items=60, n_categories=8, n_behavior_types=4, embed_dim=8, short_len=6, mlp_hidden=(16, 8))


def batch(seed: int = 0, H: int = 5, L: int = 12, B: int = 9, lengths=None):
    """Random left-aligned histories with padding (history 1 empty), B candidates over them."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, L + 1, (H,), generator=g)
        lengths[1] = 0
    mask = torch.arange(L)[None] < torch.as_tensor(lengths)[:, None]
    return dict(
        hist_item=torch.randint(1, CONFIG.n_items, (H, L), generator=g) * mask,
        hist_category=torch.randint(1, CONFIG.n_categories, (H, L), generator=g) * mask,
        hist_behavior=torch.randint(1, CONFIG.n_behavior_types, (H, L), generator=g) * mask,
        hist_mask=mask,
        hist_index=torch.randint(0, H, (B,), generator=g),
        cand_item=torch.randint(1, CONFIG.n_items, (B,), generator=g),
        cand_category=torch.randint(1, CONFIG.n_categories, (B,), generator=g),
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


def test_auxiliary_loss_positive_in_training_zero_in_eval_and_scaled_by_weight():
    b = batch(3)
    m = model(3)
    torch.manual_seed(0)
    m(**b)
    first = m.auxiliary_loss()
    assert first.requires_grad and float(first.detach()) > 0
    m2 = model(3, replace(CONFIG, dien_aux_weight=2.5))
    torch.manual_seed(0)  # the same negatives
    m2(**b)
    torch.testing.assert_close(m2.auxiliary_loss(), 2.5 * first)
    m.eval()
    m(**b)
    assert float(m.auxiliary_loss().detach()) == 0.0
    m0 = model(3, replace(CONFIG, dien_aux_weight=0.0))
    m0(**b)
    assert float(m0.auxiliary_loss()) == 0.0


def test_auxiliary_loss_trains_the_extractor():
    b = batch(4)
    m = model(4)
    torch.manual_seed(0)
    m(**b)
    m.auxiliary_loss().backward()
    assert m.extractor.weight_hh_l0.grad.abs().sum() > 0
    assert m.embedding.item.weight.grad.abs().sum() > 0


def test_forward_finite_with_empty_histories():
    m = model(5).eval()
    b = batch(5)
    b["hist_index"][0] = 1  # history 1 is empty
    with torch.no_grad():
        logits = m(**b)
    assert logits.shape == (9,) and torch.isfinite(logits).all()
    everything_empty = batch(5, lengths=[0] * 5)
    m.train()
    logits = m(**everything_empty)
    assert torch.isfinite(logits).all() and float(m.auxiliary_loss().detach()) == 0.0


def test_padding_ids_and_width_and_old_behaviors_do_not_matter():
    m = model(6).eval()
    b = batch(6, L=10)
    noisy = dict(b)
    for key in ("hist_item", "hist_category", "hist_behavior"):
        noisy[key] = torch.where(b["hist_mask"], b[key], torch.full_like(b[key], 3))
    wider = {k: torch.cat([v, torch.zeros(v.shape[0], 7, dtype=v.dtype)], 1) if v.dim() == 2 else v
             for k, v in b.items()}
    wider["hist_item"][:, 10:] = 5
    with torch.no_grad():
        logits = m(**b)
        torch.testing.assert_close(m(**noisy), logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(m(**wider), logits, rtol=0, atol=1e-6)
    # only the last short_len behaviors matter: changing older ones leaves the logits unchanged
    long = batch(7, lengths=[10, 0, 8, 10, 3])
    older = dict(long)
    older["hist_item"] = long["hist_item"].clone()
    older["hist_item"][0, : 10 - CONFIG.short_len] = 1
    with torch.no_grad():
        torch.testing.assert_close(m(**older), m(**long), rtol=0, atol=1e-6)
        older["hist_item"][0, 10 - CONFIG.short_len] = 1 + long["hist_item"][0, 10 - CONFIG.short_len] % 50
        assert (m(**older) - m(**long)).abs().max() > 0


def test_gradients_reach_embeddings_and_training_reduces_loss():
    # Learnable: the label is whether the candidate's category is that of the latest behavior.
    torch.manual_seed(8)
    H, L = 16, 8
    b = batch(8, H=H, L=L, B=32, lengths=torch.randint(1, L + 1, (H,)))
    last = b["hist_mask"].sum(1) - 1
    latest_category = b["hist_category"].gather(1, last[:, None]).squeeze(1)
    b["cand_category"][::2] = latest_category[b["hist_index"][::2]]
    y = (b["cand_category"] == latest_category[b["hist_index"]]).float()
    m = model(8)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    losses = []
    for step in range(15):
        opt.zero_grad()
        bce = F.binary_cross_entropy_with_logits(m(**b), y)
        (bce + m.auxiliary_loss()).backward()
        if step == 0:
            for table in (m.embedding.item, m.embedding.category, m.embedding.behavior):
                assert table.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(bce.item())
    assert losses[-1] < 0.5 * losses[0]


def test_timestamps_are_ignored():
    m = model(9).eval()
    b = batch(9)
    ts = torch.arange(b["hist_mask"].shape[1])[None].expand_as(b["hist_mask"]) * b["hist_mask"]
    with torch.no_grad():
        torch.testing.assert_close(m(**b, hist_timestamp=ts), m(**b))


@pytest.mark.parametrize("short_len", [1, 3])
def test_short_windows(short_len):
    m = model(10, replace(CONFIG, short_len=short_len)).train()
    logits = m(**batch(10))
    assert torch.isfinite(logits).all()
    assert float(m.auxiliary_loss().detach()) >= 0


def test_logits_do_not_depend_on_the_other_histories_of_the_batch():
    # The batch's longest window sets T, so a shorter history runs padded steps that must not count.
    m = model(11).eval()
    b = batch(11, lengths=[2, 0, 6, 4, 1])
    with torch.no_grad():
        logits = m(**b)
        for i, u in enumerate(b["hist_index"].tolist()):
            alone = {k: v[u : u + 1] for k, v in b.items() if k.startswith("hist_")}
            alone.update(hist_index=torch.tensor([0]), cand_item=b["cand_item"][i : i + 1],
                         cand_category=b["cand_category"][i : i + 1])
            torch.testing.assert_close(m(**alone), logits[i : i + 1], rtol=0, atol=1e-6)
