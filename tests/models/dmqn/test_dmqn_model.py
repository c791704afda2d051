"""The assembled model (dmqn_core.models.dmqn.model), the popularity baseline, the registry and ModelConfig."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.dmqn.model import DMQN
from dmqn_core.models.popularity import PopularityModel
from dmqn_core.models.registry import build_model, model_names
from dmqn_core.nn.mlp import MLPHead

CONFIG = ModelConfig(
    n_items=60,
    n_categories=8,
    n_behavior_types=4,
    embed_dim=8,
    n_codebooks=3,
    codebook_size=6,
    icim_layers=2,
    icim_heads=2,
    short_len=5,
    mlp_hidden=(16, 8),
    # The model's own mechanism alone; match features, the DIN short term, the time embedding and the clusters'
    # categories have their own tests.
    match_features=False,
    short_term=None,
    behavior_time=False,
    cluster_categories=0,
)


def history(b: dict) -> tuple:
    return b["hist_item"], b["hist_category"], b["hist_behavior"], b["hist_mask"]


def model(seed: int = 0, config: ModelConfig = CONFIG) -> DMQN:
    torch.manual_seed(seed)
    return DMQN(config)


def test_encode_user_then_score_equals_forward():
    m = model().eval()
    b = random_batch(CONFIG)
    with torch.no_grad():
        logits = m(**b)
        state = m.encode_user(*history(b))
        split = m.score(state, b["cand_item"], b["cand_category"], b["hist_index"])
        # the same with the state's rows picked beforehand
        picked = m.score(state.index_select(b["hist_index"]), b["cand_item"], b["cand_category"])
    assert (logits - split).abs().max() <= 1e-5
    assert (logits - picked).abs().max() <= 1e-5


def test_a_compacted_reordered_state_scores_like_forward():
    m = model(1).eval()
    b = random_batch(CONFIG, seed=1, L=30)  # history 1 is empty: compacts to one empty token per codebook
    with torch.no_grad():
        logits = m(**b)
        state = m.encode_user(*history(b))
        # one user at a time, only its non-empty clusters, in reversed order: what a cache could hold
        for i, u in enumerate(b["hist_index"].tolist()):
            own = state.index_select(torch.tensor([u])).compact()
            assert own.clusters.shape[2] == max(int(state.cluster_mask[u].sum(-1).max()), 1)
            flipped = replace(
                own,
                clusters=own.clusters.flip(2),
                cluster_mask=own.cluster_mask.flip(2),
                cluster_size=own.cluster_size.flip(2),
            )
            one = m.score(flipped, b["cand_item"][i : i + 1], b["cand_category"][i : i + 1])
            torch.testing.assert_close(one, logits[i : i + 1], rtol=0, atol=1e-5)


def test_an_empty_history_has_no_cluster_and_a_zero_recent_mean():
    m = model(2).eval()
    b = random_batch(CONFIG, seed=2, lengths=[0, 0, 3, 0, 1])
    with torch.no_grad():
        state = m.encode_user(*history(b))
    assert not state.cluster_mask[0].any()
    assert torch.equal(state.recent[0], torch.zeros(CONFIG.embed_dim))


def test_training_is_seeded():
    m = model(4).train()
    b = random_batch(CONFIG, seed=4)
    torch.manual_seed(9)
    first = m(**b)
    torch.manual_seed(9)
    assert torch.equal(m(**b), first)


def test_recent_is_the_mean_of_the_last_short_len_behaviors():
    m = model(5).eval()
    b = random_batch(CONFIG, seed=5, lengths=[12, 0, 3, 40, 5])
    with torch.no_grad():
        state = m.encode_user(*history(b))
        e = m.embedding.behaviors(*history(b))
    for u, n in enumerate([12, 0, 3, 40, 5]):
        expected = e[u, max(n - CONFIG.short_len, 0) : n].mean(0) if n else torch.zeros(CONFIG.embed_dim)
        torch.testing.assert_close(state.recent[u], expected)


def test_codeword_assignments_follow_the_clusters():
    m = model(6).eval()
    b = random_batch(CONFIG, seed=6)
    z = m.codeword_assignments(*history(b))
    assert z.shape == (6, CONFIG.n_codebooks, 36) and z.dtype == torch.long
    assert bool(((z == -1) == ~b["hist_mask"][:, None, :]).all())
    with torch.no_grad():
        state = m.encode_user(*history(b))
    counts = torch.stack([(z == k).sum(-1) for k in range(CONFIG.codebook_size)], -1).float()  # (H, N, W)
    assert torch.equal(counts, state.cluster_size)


def test_auxiliary_loss():
    m = model(7).train()
    b = random_batch(CONFIG, seed=7)
    m(**b)
    assert m.auxiliary_loss().item() == 0.0
    m = model(7, replace(CONFIG, usage_loss_weight=0.5)).train()
    m(**b)
    aux = m.auxiliary_loss()
    assert aux.item() > 0 and aux.requires_grad
    aux.backward()
    assert m.quantizer.codebooks.grad.abs().sum() > 0


def test_dmqn_simple_has_no_icim_parameters():
    simple = build_model("dmqn-simple", CONFIG)
    full = build_model("dmqn", CONFIG)
    assert not [n for n, _ in simple.named_parameters() if n.startswith("icim")]
    assert [n for n, _ in full.named_parameters() if n.startswith("icim")]
    assert simple.config.icim_layers == 0 and CONFIG.icim_layers == 2


def test_popularity_model_orders_by_popularity():
    pop = np.zeros(CONFIG.n_items)
    pop[[3, 7, 11]] = [100, 5, 40]
    m = build_model("pop", CONFIG, item_popularity=pop)
    assert isinstance(m, PopularityModel) and not list(m.parameters()) and m.trainable is False
    b = random_batch(CONFIG)
    b["cand_item"] = torch.tensor([7, 3, 20, 11])
    b["cand_category"] = torch.ones(4, dtype=torch.long)
    b["hist_index"] = torch.zeros(4, dtype=torch.long)
    logits = m(**b)
    assert torch.argsort(logits, descending=True).tolist() == [1, 3, 0, 2]
    torch.testing.assert_close(logits[2], torch.tensor(0.0))


def test_build_model_rejects_unknown_names():
    assert {"dmqn", "dmqn-simple", "pop", "din-short", "din-middle", "din-full"} <= set(model_names())
    with pytest.raises(ValueError, match="dmqn-simple"):
        build_model("no-such-model", CONFIG)
    with pytest.raises(ValueError, match="item_popularity"):
        build_model("pop", CONFIG)


def test_config_round_trips_through_json():
    d = json.loads(json.dumps(CONFIG.to_dict()))
    assert d["mlp_hidden"] == [16, 8]
    assert ModelConfig.from_dict(d) == CONFIG
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="icim_heads"):
        replace(CONFIG, icim_heads=3)


def test_a_stored_config_without_the_later_settings_builds_the_model_of_then():
    """A run stored before short_term, match_features, behavior_time and cluster_categories existed loads with
    them as they were then (off), whatever today's defaults are."""
    from dmqn_core.config import SETTINGS_ADDED_LATER

    stored = {k: v for k, v in json.loads(json.dumps(CONFIG.to_dict())).items() if k not in SETTINGS_ADDED_LATER}
    loaded = ModelConfig.from_dict(stored)
    assert (loaded.short_term, loaded.match_features, loaded.behavior_time, loaded.cluster_categories) == (
        None,
        False,
        False,
        0,
    )
    assert ModelConfig.from_dict({**stored, "match_features": True}).match_features


@pytest.mark.parametrize("n_scalars", [0, 3])
@pytest.mark.parametrize("products", [True, False])
def test_mlp_head_input_width(n_scalars: int, products: bool):
    """Input concat[c, interests, c*interests, recent, c*recent, scalars]: dim*(2K+3) + S;
    without the products concat[c, interests, recent, scalars]: dim*(K+2) + S."""
    dim, K, B = 8, 3, 4
    head = MLPHead(dim, K, (16, 8), n_scalars=n_scalars, products=products)
    assert head.net[0].in_features == dim * ((2 * K + 3) if products else (K + 2)) + n_scalars
    c, interests, recent = torch.randn(B, dim), torch.randn(B, K, dim), torch.randn(B, dim)
    scalars = torch.randn(B, n_scalars) if n_scalars else None
    assert head(c, interests, recent, scalars).shape == (B,)
    with pytest.raises(ValueError, match=f"built for {n_scalars} scalars, got {n_scalars + 1}"):
        head(c, interests, recent, torch.randn(B, n_scalars + 1))


def test_mlp_head_without_products_reads_exactly_c_interests_recent():
    """products=False: the first layer sees [c, interests, recent] and nothing else (checked against
    a manual first layer), so a model without them cannot use c * interest."""
    dim, K, B = 4, 2, 5
    torch.manual_seed(0)
    head = MLPHead(dim, K, (), products=False)  # no hidden layer: one Linear
    c, interests, recent = torch.randn(B, dim), torch.randn(B, K, dim), torch.randn(B, dim)
    linear = head.net[0]
    expected = torch.cat([c, interests.flatten(1), recent], 1) @ linear.weight.T + linear.bias
    torch.testing.assert_close(head(c, interests, recent), expected.squeeze(-1))


@pytest.mark.parametrize("match_scalars", [True, False])
@pytest.mark.parametrize("products", [True, False])
def test_dmqn_head_follows_match_scalars_and_products(match_scalars: bool, products: bool):
    """The DMQN head takes one match scalar per codebook and the c * features unless switched off."""
    config = replace(CONFIG, ctam_match_scalars=match_scalars, mlp_products=products)
    m = model(config=config).eval()
    K, D = CONFIG.n_codebooks, CONFIG.embed_dim
    assert m.head.n_scalars == (K if match_scalars else 0)
    assert m.head.net[0].in_features == D * ((2 * K + 3) if products else (K + 2)) + m.head.n_scalars
    b = random_batch(config)
    with torch.no_grad():
        logits = m(**b)
        state = m.encode_user(*history(b))
    assert torch.isfinite(logits).all()
    assert (logits - m.score(state, b["cand_item"], b["cand_category"], b["hist_index"])).abs().max() <= 1e-5


def test_the_match_strength_reaches_the_logit_only_with_match_scalars():
    """Shifting CTAM's match output (a forward hook) moves the logits with ctam_match_scalars, not without."""
    for match_scalars in (True, False):
        config = replace(CONFIG, ctam_match_scalars=match_scalars)
        m = model(config=config).eval()
        b = random_batch(config)
        with torch.no_grad():
            before = m(**b)
            hook = m.ctam.register_forward_hook(lambda _m, _i, out: (out[0], out[1] + 5.0, out[2]))
            after = m(**b)
            hook.remove()
        assert torch.equal(before, after) != match_scalars


def test_quantizer_diagnostics_add_up_over_batches_and_need_eval_mode():
    m = model(config=replace(CONFIG, assign_noise="none")).eval()
    b = random_batch(CONFIG, H=6, L=12, seed=3)
    whole = m.quantizer_diagnostics(*history(b))
    assert whole.assignment.behaviors == int(b["hist_mask"].sum())
    assert whole.assignment.agreement.tolist() == [1.0] * CONFIG.n_codebooks  # no noise: the inference codeword
    halves = [m.quantizer_diagnostics(*(t[rows] for t in history(b))) for rows in (slice(0, 3), slice(3, 6))]
    total = halves[0] + halves[1]
    assert total.assignment.behaviors == whole.assignment.behaviors
    np.testing.assert_allclose(total.assignment.margin, whole.assignment.margin, rtol=1e-5)
    np.testing.assert_allclose(total.icim_norm_ratio, whole.icim_norm_ratio, rtol=1e-5)
    assert whole.icim_norm_ratio.shape == (CONFIG.icim_layers,) and (whole.icim_norm_ratio > 0).all()
    with pytest.raises(RuntimeError, match="eval"):
        m.train().quantizer_diagnostics(*history(b))


def test_set_epoch_follows_the_tau_schedule():
    config = replace(CONFIG, tau=1.0, tau_decay=0.5, tau_min=0.2, tau_placement="before_noise")
    assert [config.tau_at(epoch) for epoch in (1, 2, 3, 4, 10)] == [1.0, 0.5, 0.25, 0.2, 0.2]
    m = model(config=config)
    m.set_epoch(3)
    assert m.quantizer.tau == 0.25
    assert [CONFIG.tau_at(epoch) for epoch in (1, 5)] == [CONFIG.tau] * 2  # the default: a constant tau


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"assign_noise": "uniform"}, "assign_noise"),
        ({"tau_placement": "inside"}, "tau_placement"),
        ({"straight_through": "centered"}, "straight_through"),
        ({"tau_decay": 1.5}, "tau_decay"),
        ({"tau_decay": 0.9}, "tau_min > 0"),
        ({"tau_min": 2.0}, "tau_min"),
    ],
)
def test_quantizer_options_are_checked(settings: dict, message: str):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **settings)


@pytest.mark.parametrize("signals", [False, True])
def test_one_users_state_is_broadcast_over_the_candidates_as_its_copies_score(signals: bool):
    """A served user's one-row state is read in place by CTAM, the DIN short term, the clusters' categories and
    the match table; the state copied once per candidate scores the same up to float32 rounding: sums of
    D = 8 products in another order, a few roundings of 2^-24 of partial sums below 50 (< 1e-5), which the
    MLP does not amplify past 1e-4. N(0, 1) tables (embedding_init "default") make the logits feel the
    state: scaling the broadcast clusters or behaviors by 1.01 moves them by 3e-3 to 6e-3."""
    config = replace(CONFIG, embedding_init="default")
    if signals:  # every part of the state the scoring reads
        config = replace(config, match_features=True, short_term="din", behavior_time=True, cluster_categories=2)
    m = model(3, config).eval()
    b = random_batch(config, seed=4, B=40)
    timestamp = b["hist_timestamp"] if signals else None
    with torch.no_grad():
        state = m.encode_user(*history(b), timestamp)
        one = state.index_select(torch.tensor([0]))  # history 0, full
        cand = (b["cand_item"], b["cand_category"])
        popularity = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(5)) if signals else None
        broadcast = m.score(one, *cand, torch.zeros(40, dtype=torch.long), popularity)
        copies = m.score(one.index_select(torch.zeros(40, dtype=torch.long)), *cand, None, popularity)
    assert torch.allclose(broadcast, copies, rtol=0, atol=1e-4)
    assert broadcast.std() > 0  # the candidates differ
