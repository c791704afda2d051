"""``short_term`` (nn/short_term.py, issue 19 item 4): one short-term interest for DMQN, DMQN-simple, SIM,
ETA, SDIM, TWIN and TWIN V2, each model's earlier one when unset, and DMQN's cached state carrying what a
DIN short-term interest needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmqn_core.config import ModelConfig
from dmqn_core.models.registry import build_model
from dmqn_core.nn.short_term import ShortTermDIN
from dmqn_core.serving.state_codec import VERSION, VERSION_WITH_SHORT, decode_state, encode_states, stack_states

LONG_SEQUENCE_MODELS = ("sim", "eta", "sdim", "twin", "twin-v2", "dmqn", "dmqn-simple")
BASELINES_WITH_DIN = ("sim", "eta", "sdim", "twin", "twin-v2")


# The short term alone; the other shared inputs and DMQN's additions have their own tests.
OTHERS_OFF = {"match_features": False, "behavior_time": False, "cluster_categories": 0}


def config(short_term: str | None, **settings) -> ModelConfig:
    return ModelConfig(
        n_items=60, n_categories=9, n_behavior_types=5, embed_dim=8, n_codebooks=2, codebook_size=4,
        short_len=5, short_term=short_term, **{**OTHERS_OFF, **settings},
    )  # fmt: skip


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, L, B = 3, 20, 6
    mask = torch.arange(L).unsqueeze(0) < torch.tensor([[20], [7], [1]])  # left-aligned lengths 20, 7, 1
    return {
        "hist_item": torch.randint(1, 60, (H, L), generator=g) * mask,
        "hist_category": torch.randint(1, 9, (H, L), generator=g) * mask,
        "hist_behavior": torch.randint(1, 5, (H, L), generator=g) * mask,
        "hist_mask": mask,
        "hist_index": torch.tensor([0, 1, 2, 0, 1, 2]),
        "cand_item": torch.randint(1, 60, (B,), generator=g),
        "cand_category": torch.randint(1, 9, (B,), generator=g),
        "hist_timestamp": torch.arange(L).repeat(H, 1) * 600 * mask,
    }


@pytest.mark.parametrize("name", LONG_SEQUENCE_MODELS)
def test_unset_short_term_is_each_models_earlier_one_and_is_stored_resolved(name):
    model = build_model(name, config(None))
    expected = "din" if name in BASELINES_WITH_DIN else "mean"
    assert model.config.short_term == expected
    assert (getattr(model, "short", None) is not None) == (expected == "din")
    # The same model as asking for it by name: same parameters, same initialisation.
    torch.manual_seed(0)
    unset = build_model(name, config(None)).state_dict()
    torch.manual_seed(0)
    named = build_model(name, config(expected)).state_dict()
    assert unset.keys() == named.keys() and all(torch.equal(unset[k], named[k]) for k in unset)


@pytest.mark.parametrize("name", LONG_SEQUENCE_MODELS)
def test_the_three_short_terms_feed_the_head_what_they_say(name):
    inputs = batch()
    logits = {}
    for short_term in ("din", "mean", "none"):
        torch.manual_seed(0)
        model = build_model(name, config(short_term)).eval()
        assert isinstance(getattr(model, "short", None), ShortTermDIN) == (short_term == "din")
        assert model.head.recent == (short_term != "none")
        with torch.no_grad():
            logits[short_term] = model(**inputs)
        assert logits[short_term].shape == (6,) and torch.isfinite(logits[short_term]).all()
        if short_term == "none":
            # Without a short-term signal the recent behaviors matter only through the long-term module:
            # a recent mean of anything else changes nothing.
            state = model.encode_user(
                inputs["hist_item"], inputs["hist_category"], inputs["hist_behavior"], inputs["hist_mask"],
                inputs["hist_timestamp"],
            )  # fmt: skip
            state.recent = torch.randn_like(state.recent)
            with torch.no_grad():
                again = model.score(state, inputs["cand_item"], inputs["cand_category"], inputs["hist_index"])
            assert torch.equal(again, logits["none"])


def test_a_bad_short_term_is_refused():
    with pytest.raises(ValueError, match="short_term must be one of din, mean, none"):
        config("lstm")


def test_dmqn_din_state_round_trips_through_the_cache_layout():
    """A DIN DMQN's state holds its users' last short_len embeddings; the codec's version 2 carries them, and
    scoring the decoded state gives the logits of the full forward pass."""
    torch.manual_seed(0)
    model = build_model("dmqn", config("din")).eval()
    inputs = batch()
    with torch.no_grad():
        state = model.encode_user(
            inputs["hist_item"], inputs["hist_category"], inputs["hist_behavior"], inputs["hist_mask"]
        )
        full = model(**{k: v for k, v in inputs.items() if k != "hist_timestamp"})
    assert state.short.shape == (3, 5, 8) and state.short_mask.sum(dim=1).tolist() == [5, 5, 1]
    values = encode_states(state)
    assert {value[4] for value in values} == {VERSION_WITH_SHORT}
    decoded = [decode_state(value) for value in values]
    assert [len(d.short) for d in decoded] == [5, 5, 1]
    cached = stack_states(decoded)
    with torch.no_grad():
        scored = model.score(cached, inputs["cand_item"], inputs["cand_category"], inputs["hist_index"])
    # Exact but for summation order: the compact state drops empty clusters (float32 sums of D = 8 terms).
    assert torch.allclose(scored, full, rtol=0, atol=1e-5)

    mean_model = build_model("dmqn", config("mean")).eval()
    with torch.no_grad():
        mean_state = mean_model.encode_user(
            inputs["hist_item"], inputs["hist_category"], inputs["hist_behavior"], inputs["hist_mask"]
        )
    plain = encode_states(mean_state)
    assert {value[4] for value in plain} == {VERSION} and mean_state.short is None
    assert all(decode_state(value).short is None for value in plain)
    with pytest.raises(ValueError, match="mix layouts"):
        stack_states([decode_state(values[0]), decode_state(plain[0])])
    assert np.array_equal(decode_state(values[2]).short, state.short[2, :1].numpy())
