"""dmqn_core.declaration: the checks made from the settings' declarations, their search ranges, and the values
a stored config without a later setting means."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dmqn_core.config import SETTINGS_ADDED_LATER, ModelConfig
from dmqn_core.declaration import Between, OneOf, check_declared, declared, setting
from dmqn_core.errors import DmqnError
from dmqn_core.training.train import TrainConfig

VOCABULARY = {"n_items": 50, "n_categories": 8, "n_behavior_types": 5}


def test_a_field_without_its_declaration_is_refused():
    @dataclass
    class Half:
        declared_one: int = setting(1, help="Declared.", flag=None)
        plain: int = 2

    with pytest.raises(TypeError, match=r"Half\.plain is not declared"):
        declared(Half)


def test_a_flag_of_bench_or_tune_is_a_flag_of_train_too():
    with pytest.raises(TypeError, match="commands must include train"):
        setting(1, help="Only on the bench.", flag="--x", commands=("bench",))
    with pytest.raises(TypeError, match="without a flag"):
        setting(1, help="No flag.", flag=None, commands=("train", "bench"))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"n_codebooks": 0}, "n_codebooks must be >= 1, got 0"),
        ({"tau": 0.0}, "tau must be > 0, got 0.0"),
        ({"tau": float("inf")}, "tau must be a finite number, got inf"),
        ({"tau_decay": 1.5}, r"tau_decay must be in \(0, 1\], got 1.5"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"cluster_categories": 256}, r"cluster_categories must be in \[0, 255\], got 256"),
        ({"n_items": 1}, r"n_items must be >= 2 \(index 0 is padding\), got 1"),
        ({"mlp_hidden": (8, 0)}, r"each of mlp_hidden must be >= 1, got \(8, 0\)"),
        ({"assign_noise": "uniform"}, "assign_noise must be one of gumbel, none, got 'uniform'"),
        ({"short_term": "max"}, "short_term must be one of din, mean, none, got 'max'"),
    ],
)
def test_model_settings_are_checked_against_their_declarations(settings, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        ModelConfig(**{**VOCABULARY, **settings})


def test_none_is_valid_only_where_the_type_allows_it():
    assert ModelConfig(**VOCABULARY, short_term=None).short_term is None  # each model's own short term
    with pytest.raises(ValueError, match="assign_noise must be one of"):
        ModelConfig(**VOCABULARY, assign_noise=None)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"eval_batch_size": 0}, "eval-batch-size must be at least 1, got 0"),
        ({"lr": float("nan")}, "lr must be a positive number, got nan"),
        ({"weight_decay": -1.0}, "weight-decay must be 0 or a positive number, got -1.0"),
        ({"seed": 2**63}, r"seed must be in 0 \.\. 2\^63-1, got 9223372036854775808"),
        ({"inspect_users": -1}, "inspect-users must be 0 or more, got -1"),
    ],
)
def test_training_settings_keep_the_words_of_their_messages(settings, message):
    with pytest.raises(DmqnError, match=f"^{message}$"):
        check_declared(TrainConfig(**settings), DmqnError, dashed=True)


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
def test_every_search_range_lies_in_the_settings_valid_range(cls):
    """A trial never draws a value its setting refuses."""
    for item in declared(cls):
        search = item.setting.search
        if isinstance(search, OneOf):
            values = search.choices
        elif isinstance(search, Between):
            values = (search.low, search.high) + ((0.0,) if search.or_zero else ())
        else:
            continue
        for value in values:
            config = cls(**VOCABULARY, **{item.name: value}) if cls is ModelConfig else cls(**{item.name: value})
            check_declared(config)


def test_the_meaning_of_a_missing_later_setting_never_changes():
    """What a stored run without these keys trained with; changing a value would change old runs' models."""
    assert SETTINGS_ADDED_LATER == {
        "short_term": None,
        "match_features": False,
        "behavior_time": False,
        "cluster_categories": 0,
    }
    assert ModelConfig.from_dict(VOCABULARY).cluster_categories == 0
