"""BehaviorEmbedding's initialisation (dmqn_core.nn.embedding): the scaled tables and nn.Embedding's default."""

import pytest
import torch

from dmqn_core.config import ModelConfig
from dmqn_core.nn.embedding import BEHAVIOR_INIT_STD, CATEGORY_INIT_STD, ITEM_INIT_STD, BehaviorEmbedding


def tables(embedding_init: str) -> BehaviorEmbedding:
    # Large tables, so that each std is estimated from >= 64 000 draws (within ~1 %).
    config = ModelConfig(n_items=4001, n_categories=2001, n_behavior_types=2001, embed_dim=32)
    torch.manual_seed(0)
    return BehaviorEmbedding(ModelConfig(**{**config.to_dict(), "embedding_init": embedding_init}))


@pytest.mark.parametrize(
    ("embedding_init", "stds"),
    [
        ("scaled", (ITEM_INIT_STD, CATEGORY_INIT_STD, BEHAVIOR_INIT_STD)),
        ("default", (1.0, 1.0, 1.0)),  # nn.Embedding's N(0, 1)
    ],
)
def test_each_table_starts_at_its_stated_std_with_a_zero_padding_row(embedding_init: str, stds: tuple):
    emb = tables(embedding_init)
    for table, std in zip((emb.item, emb.category, emb.behavior), stds, strict=True):
        assert torch.equal(table.weight[0], torch.zeros(32))
        real = table.weight[1:]
        assert abs(real.std().item() / std - 1) < 0.03, (embedding_init, real.std().item(), std)
        assert abs(real.mean().item()) < 0.03 * std


def test_the_scaled_stds_are_the_documented_ones():  # docs/model.md, "Where the paper is silent"
    assert (ITEM_INIT_STD, CATEGORY_INIT_STD, BEHAVIOR_INIT_STD) == (0.005, 0.15, 0.05)


def test_embedding_init_is_checked():
    with pytest.raises(ValueError, match="embedding_init must be one of scaled, default"):
        ModelConfig(n_items=3, n_categories=3, n_behavior_types=3, embedding_init="xavier")


def test_an_extra_table_sums_in_the_same_in_inference_and_in_training():
    """DMQN's time-gap table rides in the inference embedding_bag; training looks it up on its own: the same
    values, zero at padding, and an id past the extra table fails as nn.Embedding does."""
    config = ModelConfig(n_items=50, n_categories=7, n_behavior_types=4, embed_dim=8)
    torch.manual_seed(1)
    embedding, extra = BehaviorEmbedding(config), torch.nn.Embedding(6, 8)
    item, category = torch.randint(0, 50, (3, 9)), torch.randint(0, 7, (3, 9))
    behavior, bucket = torch.randint(0, 4, (3, 9)), torch.randint(0, 6, (3, 9))
    mask = torch.arange(9) < torch.tensor([9, 4, 0]).unsqueeze(1)
    trained = embedding.behaviors(item, category, behavior, mask, (extra, bucket))  # grad on: separate lookups
    with torch.no_grad():
        inferred = embedding.behaviors(item, category, behavior, mask, (extra, bucket))  # one embedding_bag
        plain = embedding.behaviors(item, category, behavior, mask)
        expected = (plain + extra(bucket)) * mask.unsqueeze(-1)
        # Four float32 terms, each below 5 in magnitude (N(0, 1) extra rows): three roundings of at most
        # 2^-24 of a partial sum below 20 each, so any summation order agrees within 4e-6.
        assert torch.allclose(inferred, expected, rtol=0, atol=4e-6)
        assert torch.allclose(trained, inferred, rtol=0, atol=4e-6)
        assert (inferred[~mask] == 0).all()
        with pytest.raises(IndexError):
            embedding.behaviors(item, category, behavior, mask, (extra, bucket + 6))
