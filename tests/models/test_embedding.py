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
