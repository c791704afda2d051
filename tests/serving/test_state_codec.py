"""The cached-state byte layout: exact round trip, scoring equal to the full forward, corrupt values refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.dmqn.model import DMQN
from dmqn_core.serving.state_codec import decode_state, encode_states, stack_states

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
HISTORY = ("hist_item", "hist_category", "hist_behavior", "hist_mask")


def _model_and_batch():
    torch.manual_seed(0)
    model = DMQN(CONFIG).eval()
    return model, random_batch(CONFIG, seed=3)


def test_scores_from_decoded_states_equal_the_forward_pass():
    model, b = _model_and_batch()
    with torch.no_grad():
        expected = model(**b)
        state = model.encode_user(*(b[k] for k in HISTORY))
        decoded = [decode_state(v) for v in encode_states(state, "float32")]
        cached = stack_states(decoded)
        got = model.score(cached, b["cand_item"], b["cand_category"], b["hist_index"])
    assert float((got - expected).abs().max()) <= 1e-5
    # float16 halves the floats and stays close
    with torch.no_grad():
        half = stack_states([decode_state(v) for v in encode_states(state, "float16")])
        approx = model.score(half, b["cand_item"], b["cand_category"], b["hist_index"])
    assert float((approx - expected).abs().max()) <= 5e-2


def test_layout_holds_only_non_empty_clusters_with_their_codewords():
    model, b = _model_and_batch()
    with torch.no_grad():
        state = model.encode_user(*(b[k] for k in HISTORY))
    values = encode_states(state, "float32")
    N, D = CONFIG.n_codebooks, CONFIG.embed_dim
    for h, value in enumerate(values):
        magic, version, code, n, d = struct.unpack_from("<4sBBHH", value, 0)
        assert (magic, version, code, n, d) == (b"DMQS", 1, 0, N, D)
        decoded = decode_state(value)
        clusters = int(state.cluster_mask[h].sum())
        assert len(value) == 10 + (D + clusters * D) * 4 + 2 * N + 6 * clusters
        for j in range(N):
            ids = torch.nonzero(state.cluster_mask[h, j]).flatten().numpy()
            assert np.array_equal(decoded.codewords[j], ids)
            assert np.array_equal(decoded.sizes[j], state.cluster_size[h, j, ids].numpy().astype(np.int64))
            assert np.array_equal(decoded.tokens[j], state.clusters[h, j, ids].numpy())
    empty = decode_state(values[1])  # history 1 of random_batch is empty
    assert all(len(c) == 0 for c in empty.codewords) and not empty.recent.any()
    assert len(encode_states(state, "float16")[0]) < len(values[0])


def test_corrupt_values_are_refused():
    model, b = _model_and_batch()
    with torch.no_grad():
        value = encode_states(model.encode_user(*(b[k] for k in HISTORY)))[0]
    with pytest.raises(ValueError, match="DMQN state"):
        decode_state(b"XXXX" + value[4:])
    with pytest.raises(ValueError, match="truncated"):
        decode_state(value[:-3])
    with pytest.raises(ValueError, match="trailing"):
        decode_state(value + b"\0")
    with pytest.raises(ValueError, match="dtype"):
        encode_states(model.encode_user(*(b[k] for k in HISTORY)), "int8")


@pytest.mark.parametrize(("short_term", "cluster_categories"), [("mean", 0), ("din", 3)])
def test_a_match_table_state_is_version_3_and_scores_exactly(short_term, cluster_categories):
    """match_features (with behavior_time) and cluster_categories: the tables travel in float32 whatever the
    dtype, so scores from decoded states equal the forward pass; the flags say which optional parts follow."""
    config = ModelConfig(
        **{
            **CONFIG.to_dict(),
            "match_features": True,
            "behavior_time": True,
            "short_term": short_term,
            "cluster_categories": cluster_categories,
        }
    )
    torch.manual_seed(0)
    model = DMQN(config).eval()
    b = random_batch(config, seed=3)
    popularity = torch.arange(len(b["cand_item"])) * 7
    with torch.no_grad():
        expected = model(**b, cand_popularity=popularity)
        state = model.encode_user(*(b[k] for k in HISTORY), b["hist_timestamp"])
        values = encode_states(state, "float32")
        decoded = [decode_state(v) for v in values]
        got = model.score(stack_states(decoded), b["cand_item"], b["cand_category"], b["hist_index"], popularity)
    assert float((got - expected).abs().max()) <= 1e-5
    flags = struct.unpack_from("<B", values[0], 10)[0]
    assert struct.unpack_from("<4sB", values[0], 0) == (b"DMQS", 3) and flags == (7 if short_term == "din" else 2)
    for h, d in enumerate(decoded):
        real = state.match.item[h] >= 0
        assert np.array_equal(d.match[2], state.match.item[h, real].numpy())
        assert np.array_equal(d.match[3], state.match.item_features[h, real].numpy())
    assert len(decoded[1].match[0]) == 0  # history 1 is empty
    if cluster_categories:
        assert values[0][11] == cluster_categories  # T follows the flags
        for n in range(config.n_codebooks):
            ids = decoded[0].codewords[n]
            assert np.array_equal(decoded[0].categories[n], state.category[0, n, ids].numpy())
            assert np.array_equal(decoded[0].shares[n], state.category_share[0, n, ids].numpy())
    else:
        assert decoded[0].categories is None
    half = [decode_state(v) for v in encode_states(state, "float16")]
    assert all(np.array_equal(h.match[1], d.match[1]) for h, d in zip(half, decoded))
    with pytest.raises(ValueError, match="mix layouts"):
        stack_states(
            [decoded[0], decode_state(encode_states(DMQN(CONFIG).eval().encode_user(*(b[k] for k in HISTORY)))[0])]
        )
    bad = bytearray(values[0])
    bad[10] |= 0x80
    with pytest.raises(ValueError, match="flags"):
        decode_state(bytes(bad))
