"""DSIN (dmqn_core.models.dsin): session division, bias encoding, session extractor, Bi-LSTM, activation, the model."""

from dataclasses import replace

import torch
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.dsin import DSIN, split_sessions

CONFIG = ModelConfig(
    n_items=60,
    n_categories=8,
    n_behavior_types=4,
    embed_dim=8,
    short_len=5,
    mlp_hidden=(16, 8),
    session_gap=100,
    max_sessions=3,
    session_len=4,
    # The model's own mechanism alone; match features, the DIN short term, the time embedding and the clusters'
    # categories have their own tests.
    match_features=False,
    short_term=None,
    behavior_time=False,
    cluster_categories=0,
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
    return [
        [[p for p, v in zip(row_p, row_v) if v] for row_p, row_v in zip(hp, hv) if any(row_v)]
        for hp, hv in zip(positions.tolist(), mask.tolist())
    ]


def test_split_sessions_on_hand_built_timestamps():
    # gaps:   5   100(= gap: no split)   101(split)   0   2000(split)   1
    ts = torch.tensor([[1000, 1005, 1105, 1206, 1206, 3206, 3207, 0, 0], [50, 0, 0, 0, 0, 0, 0, 0, 0], [0] * 9])
    mask = ts > 0
    positions, kept = split_sessions(ts, mask, gap=100, max_sessions=5, session_len=5)
    assert positions.shape == kept.shape == (3, 5, 5)
    assert as_lists(positions, kept) == [[[0, 1, 2], [3, 4], [5, 6]], [[0]], []]
    # sessions fill the rows from the first, behaviors the columns from the first
    assert kept[0].tolist() == [
        [True] * 3 + [False] * 2,
        [True] * 2 + [False] * 3,
        [True] * 2 + [False] * 3,
        [False] * 5,
        [False] * 5,
    ]
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
    b = random_batch(CONFIG, seed=1, H=12, L=30)  # gaps within and beyond CONFIG.session_gap (100 s)
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
        mask = torch.tensor(
            [
                [[True, True, False, False], [True, True, True, True], [False] * 4],
                [[True, False, False, False], [False] * 4, [False] * 4],
            ]
        )
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


def test_behaviors_outside_the_kept_sessions_and_the_short_window_do_not_matter():
    # The oldest behavior of a history with many sessions is outside the kept sessions and outside
    # the short_len window: it does not matter; one inside the latest session does.
    m = model(7).eval()
    ts = torch.tensor([[0, 500, 1000, 1500, 2000, 2500, 3000, 3001]]) + 1
    one = dict(
        hist_item=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]),
        hist_category=torch.ones(1, 8, dtype=torch.long),
        hist_behavior=torch.ones(1, 8, dtype=torch.long),
        hist_mask=torch.ones(1, 8, dtype=torch.bool),
        hist_index=torch.tensor([0]),
        cand_item=torch.tensor([9]),
        cand_category=torch.tensor([2]),
        hist_timestamp=ts,
    )
    with torch.no_grad():
        base = m(**one)
        one["hist_item"] = torch.tensor([[11, 2, 3, 4, 5, 6, 7, 8]])
        torch.testing.assert_close(m(**one), base, rtol=0, atol=1e-6)
        one["hist_item"] = torch.tensor([[11, 2, 3, 4, 5, 6, 7, 18]])
        assert (m(**one) - base).abs().max() > 0


def test_single_session_and_single_behavior_configs():
    for cfg in (replace(CONFIG, max_sessions=1), replace(CONFIG, session_len=1), replace(CONFIG, session_gap=10**9)):
        m = model(9, cfg).train()
        logits = m(**random_batch(CONFIG, seed=9))
        assert torch.isfinite(logits).all()
        logits.sum().backward()
