"""DSIN (dmqn_core.dsin): session division, bias encoding, session extractor, Bi-LSTM, activation, the model."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dmqn_core.config import ModelConfig
from dmqn_core.dsin import DSIN, split_sessions

CONFIG = ModelConfig(n_items=60, n_categories=8, n_behavior_types=4, embed_dim=8, short_len=5, mlp_hidden=(16, 8),
                     session_gap=100, max_sessions=3, session_len=4)


def batch(seed: int = 0, H: int = 5, L: int = 20, B: int = 9, lengths=None):
    """Random left-aligned histories (history 1 empty) with timestamps whose gaps often exceed session_gap."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, L + 1, (H,), generator=g)
        lengths[1] = 0
    mask = torch.arange(L)[None] < torch.as_tensor(lengths)[:, None]
    gaps = torch.where(torch.rand(H, L, generator=g) < 0.3, torch.randint(101, 1000, (H, L), generator=g),
                       torch.randint(0, 101, (H, L), generator=g))
    return dict(
        hist_item=torch.randint(1, CONFIG.n_items, (H, L), generator=g) * mask,
        hist_category=torch.randint(1, CONFIG.n_categories, (H, L), generator=g) * mask,
        hist_behavior=torch.randint(1, CONFIG.n_behavior_types, (H, L), generator=g) * mask,
        hist_mask=mask,
        hist_index=torch.randint(0, H, (B,), generator=g),
        cand_item=torch.randint(1, CONFIG.n_items, (B,), generator=g),
        cand_category=torch.randint(1, CONFIG.n_categories, (B,), generator=g),
        hist_timestamp=(1_600_000_000 + gaps.cumsum(1)) * mask,
    )


def model(seed: int = 0, config: ModelConfig = CONFIG) -> DSIN:
    torch.manual_seed(seed)
    return DSIN(config)


def reference_sessions(timestamps: list[int], gap: int, max_sessions: int, session_len: int) -> list[list[int]]:
    """Plain-Python session division: kept positions per kept session, chronological."""
    sessions: list[list[int]] = []
    for i, ts in enumerate(timestamps):
        if i == 0 or ts - timestamps[i - 1] > gap:
            sessions.append([])
        sessions[-1].append(i)
    return [s[-session_len:] for s in sessions[-max_sessions:]]


def as_lists(positions, mask) -> list[list[list[int]]]:
    return [[[p for p, v in zip(row_p, row_v) if v] for row_p, row_v in zip(hp, hv) if any(row_v)]
            for hp, hv in zip(positions.tolist(), mask.tolist())]


def test_split_sessions_on_hand_built_timestamps():
    # gaps:   5   100(= gap: no split)   101(split)   0   2000(split)   1
    ts = torch.tensor([[1000, 1005, 1105, 1206, 1206, 3206, 3207, 0, 0],
                       [50, 0, 0, 0, 0, 0, 0, 0, 0],
                       [0] * 9])
    mask = ts > 0
    positions, kept = split_sessions(ts, mask, gap=100, max_sessions=5, session_len=5)
    assert positions.shape == kept.shape == (3, 5, 5)
    assert as_lists(positions, kept) == [[[0, 1, 2], [3, 4], [5, 6]], [[0]], []]
    # sessions fill the rows from the first, behaviors the columns from the first
    assert kept[0].tolist() == [[True] * 3 + [False] * 2, [True] * 2 + [False] * 3, [True] * 2 + [False] * 3,
                                [False] * 5, [False] * 5]
    assert torch.all(positions[~kept] == 0)


def test_split_sessions_keeps_the_latest_sessions_and_behaviors_in_order():
    # sessions (positions): [0, 1, 2] [3] [4, 5, 6, 7] [8, 9]
    ts = torch.tensor([[0, 10, 20, 500, 1000, 1001, 1002, 1003, 5000, 5050]]) + 1
    mask = torch.ones_like(ts, dtype=torch.bool)
    positions, kept = split_sessions(ts, mask, gap=100, max_sessions=3, session_len=2)
    assert as_lists(positions, kept) == [[[3], [6, 7], [8, 9]]]
    positions, kept = split_sessions(ts, mask, gap=100, max_sessions=1, session_len=10)
    assert as_lists(positions, kept) == [[[8, 9]]]


def test_split_sessions_matches_a_plain_python_reference():
    b = batch(1, H=12, L=30)
    ts, mask = b["hist_timestamp"], b["hist_mask"]
    for gap, S, T in ((100, 3, 4), (50, 2, 7), (400, 6, 1)):
        positions, kept = split_sessions(ts, mask, gap, S, T)
        expected = [reference_sessions(ts[h, : int(mask[h].sum())].tolist(), gap, S, T) for h in range(12)]
        assert as_lists(positions, kept) == expected


def test_bias_encoding_counts_back_from_the_latest_session_and_behavior():
    m = model(2)
    ext = m.extractor
    with torch.no_grad():
        ext.session_bias.copy_(torch.tensor([100.0, 200.0, 300.0]))
        ext.position_bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        ext.unit_bias.copy_(torch.arange(8.0) / 100)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, 0, :3] = True  # older session, 3 behaviors
    mask[0, 1, :1] = True  # latest session, 1 behavior
    with torch.no_grad():
        be = ext.bias_encoding(mask)
    units = torch.arange(8.0) / 100
    torch.testing.assert_close(be[0, 0, 0], 200 + 3 + units)  # second latest session, third latest behavior
    torch.testing.assert_close(be[0, 0, 2], 200 + 1 + units)
    torch.testing.assert_close(be[0, 1, 0], 100 + 1 + units)
    assert torch.all(be[0, 2] == 0) and torch.all(be[0, 0, 3] == 0)


def test_session_interest_is_the_mean_of_a_transformer_layer_over_the_session_alone():
    m = model(3).eval()
    ext = m.extractor
    torch.manual_seed(3)
    with torch.no_grad():
        ext.session_bias.normal_()
        ext.position_bias.normal_()
        q = torch.randn(2, 3, 4, 8)
        mask = torch.tensor([[[True, True, False, False], [True, True, True, True], [False] * 4],
                             [[True, False, False, False], [False] * 4, [False] * 4]])
        interests = ext(q, mask)
        be = ext.bias_encoding(mask)
        for h in range(2):
            for s in range(3):
                n = int(mask[h, s].sum())
                if n == 0:
                    assert torch.all(interests[h, s] == 0)
                    continue
                x = (q[h, s, :n] + be[h, s, :n]).unsqueeze(0)  # the session without its padding
                # multi-head self-attention written out, then the post-norm residual blocks
                qq, kk, vv = ext.qkv(x).chunk(3, dim=-1)
                heads = []
                for i in range(CONFIG.attention_heads):
                    sl = slice(4 * i, 4 * (i + 1))
                    w = torch.softmax(qq[..., sl] @ kk[..., sl].transpose(1, 2) / 2.0, dim=-1)
                    heads.append(w @ vv[..., sl])
                y = ext.norm1(x + ext.out(torch.cat(heads, dim=-1)))
                y = ext.norm2(y + ext.ffn(y))
                torch.testing.assert_close(interests[h, s], y[0].mean(0))


def test_bilstm_respects_the_number_of_sessions():
    m = model(4).eval()
    torch.manual_seed(4)
    interests = torch.randn(2, 3, 8)
    session_mask = torch.tensor([[True, True, False], [False, False, False]])
    interests[0, 2] = 7.0  # a padded session must not reach the backward direction
    with torch.no_grad():
        hidden = m.interact(interests, session_mask)
        out, _ = m.interaction(interests[:1, :2])  # the two real sessions alone
    torch.testing.assert_close(hidden[0, :2], out[0].view(2, 2, 8).sum(1))
    assert torch.all(hidden[0, 2] == 0) and torch.all(hidden[1] == 0)


def test_activation_is_softmax_bilinear_attention_over_existing_sessions():
    m = model(5)
    torch.manual_seed(5)
    values = torch.randn(2, 3, 8)
    session_mask = torch.tensor([[True, True, False], [False, False, False]])
    c = torch.randn(3, 8)
    hist_index = torch.tensor([0, 1, 0])
    with torch.no_grad():
        pooled = m.activate(values, m.activate_interest, session_mask, c, hist_index)
        a = torch.softmax(m.activate_interest(values[0, :2]) @ c[0], dim=0)  # a_k = softmax(I_k W^I c)
    torch.testing.assert_close(pooled[0], a @ values[0, :2])
    assert torch.all(pooled[1] == 0)


def test_forward_finite_with_empty_histories_and_needs_timestamps():
    m = model(6).eval()
    b = batch(6)
    b["hist_index"][0] = 1  # history 1 is empty: no session
    with torch.no_grad():
        logits = m(**b)
        assert logits.shape == (9,) and torch.isfinite(logits).all()
        assert torch.isfinite(m(**batch(6, lengths=[0] * 5))).all()
    assert float(m.auxiliary_loss()) == 0.0
    b.pop("hist_timestamp")
    with pytest.raises(ValueError, match="hist_timestamp"):
        m(**b)


def test_padding_ids_and_width_and_dropped_behaviors_do_not_matter():
    m = model(7).eval()
    b = batch(7)
    noisy = dict(b)
    for key in ("hist_item", "hist_category", "hist_behavior"):
        noisy[key] = torch.where(b["hist_mask"], b[key], torch.full_like(b[key], 3))
    wider = {k: torch.cat([v, torch.zeros(v.shape[0], 6, dtype=v.dtype)], 1) if v.dim() == 2 else v
             for k, v in b.items()}
    wider["hist_item"][:, 20:] = 5
    with torch.no_grad():
        logits = m(**b)
        torch.testing.assert_close(m(**noisy), logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(m(**wider), logits, rtol=0, atol=1e-6)
    # a behavior outside the kept sessions (the oldest of a history with many sessions) and outside
    # the short_len window does not matter; one inside the latest session does
    ts = torch.tensor([[0, 500, 1000, 1500, 2000, 2500, 3000, 3001]]) + 1
    one = dict(hist_item=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), hist_category=torch.ones(1, 8, dtype=torch.long),
               hist_behavior=torch.ones(1, 8, dtype=torch.long), hist_mask=torch.ones(1, 8, dtype=torch.bool),
               hist_index=torch.tensor([0]), cand_item=torch.tensor([9]), cand_category=torch.tensor([2]),
               hist_timestamp=ts)
    with torch.no_grad():
        base = m(**one)
        one["hist_item"] = torch.tensor([[11, 2, 3, 4, 5, 6, 7, 8]])
        torch.testing.assert_close(m(**one), base, rtol=0, atol=1e-6)
        one["hist_item"] = torch.tensor([[11, 2, 3, 4, 5, 6, 7, 18]])
        assert (m(**one) - base).abs().max() > 0


def test_gradients_reach_embeddings_and_training_reduces_loss():
    # Learnable: the label is whether the candidate's category is that of the latest behavior.
    H, L = 16, 12
    b = batch(8, H=H, L=L, B=32, lengths=torch.randint(1, L + 1, (H,), generator=torch.Generator().manual_seed(8)))
    last = b["hist_mask"].sum(1) - 1
    latest_category = b["hist_category"].gather(1, last[:, None]).squeeze(1)
    b["cand_category"][::2] = latest_category[b["hist_index"][::2]]
    y = (b["cand_category"] == latest_category[b["hist_index"]]).float()
    m = model(8)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    losses = []
    for step in range(15):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(m(**b), y)
        loss.backward()
        if step == 0:
            for table in (m.embedding.item, m.embedding.category, m.embedding.behavior):
                assert table.weight.grad.abs().sum() > 0
            for p in (m.extractor.session_bias, m.extractor.position_bias, m.extractor.unit_bias):
                assert p.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_single_session_and_single_behavior_configs():
    for cfg in (replace(CONFIG, max_sessions=1), replace(CONFIG, session_len=1), replace(CONFIG, session_gap=10**9)):
        m = model(9, cfg).train()
        logits = m(**batch(9))
        assert torch.isfinite(logits).all()
        logits.sum().backward()


def test_logits_do_not_depend_on_the_other_histories_of_the_batch():
    m = model(10).eval()
    b = batch(10)
    with torch.no_grad():
        logits = m(**b)
        for i, u in enumerate(b["hist_index"].tolist()):
            alone = {k: v[u : u + 1] for k, v in b.items() if k.startswith("hist_")}
            alone.update(hist_index=torch.tensor([0]), cand_item=b["cand_item"][i : i + 1],
                         cand_category=b["cand_category"][i : i + 1])
            torch.testing.assert_close(m(**alone), logits[i : i + 1], rtol=0, atol=1e-6)
