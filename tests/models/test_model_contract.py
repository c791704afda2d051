"""The contract every model of the registry keeps (dmqn_core.models.registry, nn/interest_model.py).

forward(hist_item, hist_category, hist_behavior, hist_mask, hist_index, cand_item, cand_category,
hist_timestamp=None) -> (B,) logits, the same as score(encode_user(...)), and auxiliary_loss().
Most checks run on every model but 'pop' (no sequence; it has its own test here); what one model
does with the sequence is tested in its own file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.dmqn.model import DMQN
from dmqn_core.models.registry import build_model, has_codebooks, model_names
from dmqn_core.nn.interest_model import InterestModel
from dmqn_core.nn.sequence_model import SequenceModel

# Small enough for < 2 s a case, and at L = 36 every window and retrieval cuts: short_len, middle_len,
# top_k behaviors (TWIN V2: clusters of <= cluster_max_size), max_sessions x session_len.
CONFIG = ModelConfig(
    n_items=120,
    n_categories=8,
    n_behavior_types=4,
    embed_dim=8,
    n_codebooks=3,
    codebook_size=6,
    icim_layers=2,
    icim_heads=2,
    attention_heads=2,
    short_len=4,
    middle_len=12,
    top_k=5,
    simhash_bits=6,
    sdim_rounds=6,
    sdim_bits=2,
    cluster_max_size=4,
    session_gap=1800,
    max_sessions=3,
    session_len=4,
    mlp_hidden=(16,),
    usage_loss_weight=0.1,  # > 0: DMQN's auxiliary loss is not trivially zero
    # The model's own mechanism alone; match features, the DIN short term, the time embedding and the clusters'
    # categories have their own tests.
    match_features=False,
    short_term=None,
    behavior_time=False,
    cluster_categories=0,
)
MODELS = [name for name in model_names() if name != "pop"]
NEEDS_TIMESTAMPS = {"dsin"}  # sessions are cut by time
WITH_AUXILIARY_LOSS = {"dien", "dmqn", "dmqn-simple"}  # a non-zero auxiliary loss in training (with CONFIG)
HISTORY_KEYS = ("hist_item", "hist_category", "hist_behavior", "hist_mask", "hist_timestamp")


def make(name: str, seed: int = 0, perturb: bool = False) -> nn.Module:
    """Model NAME; perturb: noise on every parameter, so that zero-initialised ones (TWIN's time
    bias, ...) matter too. Padding rows of embedding tables stay zero, as training keeps them."""
    torch.manual_seed(seed)
    model = build_model(name, CONFIG)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            for module in model.modules():
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
    return model


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Not torch.testing.assert_close: its first call imports torch.distributed.tensor (~2 s).
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= 1e-5, (actual - expected).abs().max()


@pytest.fixture(scope="module")
def optimizer_imports() -> None:
    """The first optimizer step of a process imports torch._dynamo (~3 s on a busy machine): pay it
    once in this fixture's setup, not inside the first training case."""
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    torch.optim.Adam([p]).step()


@pytest.mark.parametrize("name", MODELS)
def test_logits_are_finite_with_empty_histories_and_without_timestamps(name):
    m = make(name)
    b = random_batch(CONFIG, seed=1)
    assert not b["hist_mask"][1].any() and (b["hist_index"] == 1).any()  # a candidate on the empty history
    empty = random_batch(CONFIG, seed=2, lengths=[0, 0, 0], L=5, B=4)
    for training in (True, False):
        m.train(training)
        for inputs in (b, empty):
            logits = m(**inputs)
            assert logits.shape == inputs["cand_item"].shape and torch.isfinite(logits).all()
    without = {k: v for k, v in b.items() if k != "hist_timestamp"}
    if name in NEEDS_TIMESTAMPS:
        with pytest.raises(ValueError, match="hist_timestamp"):
            m(**without)
    else:
        logits = m(**without)
        assert logits.shape == (12,) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODELS)
def test_padding_ids_timestamps_and_width_do_not_matter(name):
    m = make(name, seed=2, perturb=True).eval()
    b = random_batch(CONFIG, seed=3)
    pad = ~b["hist_mask"]
    assert pad.any()
    g = torch.Generator().manual_seed(3)
    highs = dict(
        hist_item=CONFIG.n_items,
        hist_category=CONFIG.n_categories,
        hist_behavior=CONFIG.n_behavior_types,
        hist_timestamp=2_000_000_000,
    )
    # Junk that a careless model would read: valid ids (not the padding id 0) and late timestamps.
    junk = {k: torch.randint(1, high, b[k].shape, generator=g) for k, high in highs.items()}
    noisy = dict(b, **{k: torch.where(pad, junk[k], b[k]) for k in highs})
    wide = dict(
        noisy,
        hist_mask=torch.cat([b["hist_mask"], torch.zeros(6, 9, dtype=torch.bool)], 1),
        **{k: torch.cat([noisy[k], torch.randint(1, high, (6, 9), generator=g)], 1) for k, high in highs.items()},
    )
    with torch.no_grad():
        logits = m(**b)
        assert_same(m(**noisy), logits)
        assert_same(m(**wide), logits)


@pytest.mark.parametrize("name", MODELS)
def test_logits_do_not_depend_on_the_other_histories_of_the_batch(name):
    m = make(name, seed=4, perturb=True).eval()
    b = random_batch(CONFIG, seed=4)
    with torch.no_grad():
        logits = m(**b)
        for i, u in enumerate(b["hist_index"].tolist()):
            alone = {k: b[k][u : u + 1] for k in HISTORY_KEYS}
            alone.update(
                hist_index=torch.tensor([0]),
                cand_item=b["cand_item"][i : i + 1],
                cand_category=b["cand_category"][i : i + 1],
            )
            assert_same(m(**alone), logits[i : i + 1])


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_deterministic(name):
    m = make(name, seed=5, perturb=True).eval()
    b = random_batch(CONFIG, seed=5)
    with torch.no_grad():
        assert torch.equal(m(**b), m(**b))


def test_every_model_keeps_the_contract_and_its_class_says_what_it_can():
    for name in model_names():
        m = build_model(name, CONFIG, item_popularity=np.ones(CONFIG.n_items))
        assert isinstance(m, InterestModel), name
        assert isinstance(m, SequenceModel) == (name != "pop"), name
        assert m.trainable == (name != "pop"), name
        # One source, the class: the registry reads it without building the model, and a model that says it
        # has codebooks has DMQN's codebook methods (training's codebook hooks call them).
        assert m.has_codebooks == has_codebooks(name) == isinstance(m, DMQN), name


def test_the_popularity_model_keeps_the_contract_with_no_state():
    m = build_model("pop", CONFIG, item_popularity=np.arange(CONFIG.n_items, dtype=np.float64))
    b = random_batch(CONFIG, seed=10)
    state = m.encode_user(*[b[k] for k in HISTORY_KEYS])
    assert state is None and m.codeword_counts(state) is None
    logits = m.score(state, b["cand_item"], b["cand_category"], b["hist_index"])
    assert torch.equal(logits, torch.log1p(b["cand_item"].float())) and torch.equal(m(**b), logits)
    assert float(m.auxiliary_loss()) == 0.0


@pytest.mark.parametrize("name", ["dmqn", "dmqn-simple"])
def test_a_codebook_models_codeword_counts_are_its_states_cluster_sizes(name):
    m = make(name, seed=11).eval()
    b = random_batch(CONFIG, seed=11)
    with torch.no_grad():
        state = m.encode_user(*[b[k] for k in HISTORY_KEYS])
    counts = m.codeword_counts(state)
    assert counts.shape == (CONFIG.n_codebooks, CONFIG.codebook_size)
    # Every real behavior is assigned once per codebook.
    assert torch.equal(counts.sum(dim=1), torch.full((CONFIG.n_codebooks,), float(b["hist_mask"].sum())))


@pytest.mark.parametrize("name", MODELS)
def test_forward_is_score_of_encode_user(name):
    m = make(name, seed=9, perturb=True)
    b = random_batch(CONFIG, seed=9)
    history = [b[k] for k in HISTORY_KEYS]
    for training in (True, False):  # training: the same random draws (Gumbel noise, DIEN negatives)
        m.train(training)
        torch.manual_seed(9)
        logits = m(**b)
        aux = m.auxiliary_loss()
        torch.manual_seed(9)
        state = m.encode_user(*history)
        assert torch.equal(m.score(state, b["cand_item"], b["cand_category"], b["hist_index"]), logits)
        assert torch.equal(m.auxiliary_loss(), aux)
    with torch.no_grad():  # no state_index: candidate b against row b (random_batch's first H candidates)
        first = slice(0, b["hist_mask"].shape[0])
        rows = m.score(state, b["cand_item"][first], b["cand_category"][first])
    assert_same(rows, logits[first])


@pytest.mark.parametrize("name", MODELS)
def test_auxiliary_loss_is_a_finite_scalar_in_training_and_zero_after_eval(name):
    m = make(name, seed=6).train()
    b = random_batch(CONFIG, seed=6)
    m(**b)
    aux = m.auxiliary_loss()
    assert aux.shape == () and torch.isfinite(aux)
    if name in WITH_AUXILIARY_LOSS:
        assert aux.requires_grad and float(aux.detach()) > 0
    else:
        assert float(aux) == 0.0
    m.eval()
    with torch.no_grad():
        m(**b)
    assert float(m.auxiliary_loss()) == 0.0


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name):
    m = make(name, seed=7).train()
    b = random_batch(CONFIG, seed=7)
    labels = (torch.arange(12) % 2).float()
    (F.binary_cross_entropy_with_logits(m(**b), labels) + m.auxiliary_loss()).backward()
    grads = {pname: p.grad for pname, p in m.named_parameters()}
    assert {"embedding.item.weight", "embedding.category.weight", "embedding.behavior.weight"} <= set(grads)
    for pname, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", MODELS)
def test_a_few_adam_steps_learn_whether_the_candidate_is_of_the_latest_category(name, optimizer_imports):
    b = random_batch(CONFIG, seed=8, H=16, L=20, B=32)
    length = b["hist_mask"].sum(1)
    latest = b["hist_category"].gather(1, (length - 1).clamp(min=0)[:, None]).squeeze(1)  # (H,)
    b["cand_category"][::2] = latest[b["hist_index"][::2]]  # about half positive
    y = ((b["cand_category"] == latest[b["hist_index"]]) & (length[b["hist_index"]] > 0)).float()
    m = make(name, seed=8).train()
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    losses = []
    for _ in range(15):
        bce = F.binary_cross_entropy_with_logits(m(**b), y)
        opt.zero_grad()
        (bce + m.auxiliary_loss()).backward()
        opt.step()
        losses.append(bce.item())
    assert losses[-1] < 0.25 * losses[0], losses


# DMQN's paper switches that its head and CTAM read (embedding_init is shared by every model on purpose).
DMQN_ONLY_SWITCHES = {
    "ctam_size_bias": False,
    "ctam_match_scalars": False,
    "mlp_products": False,
    "ctam_identity_init": False,
}


@pytest.mark.parametrize("name", [name for name in MODELS if not has_codebooks(name)])
def test_dmqn_only_switches_leave_a_baseline_bit_for_bit(name):
    """A baseline built with DMQN's switches off has the same parameters and the same logits."""
    b = random_batch(CONFIG)
    models = []
    for config in (CONFIG, ModelConfig(**{**CONFIG.to_dict(), **DMQN_ONLY_SWITCHES})):
        torch.manual_seed(0)
        models.append(build_model(name, config).eval())
    default, switched = models
    for (key, p), (_, q) in zip(default.state_dict().items(), switched.state_dict().items(), strict=True):
        assert torch.equal(p, q), key
    with torch.no_grad():
        assert torch.equal(default(**b), switched(**b))
