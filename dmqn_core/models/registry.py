"""Model registry: build_model(name, config) for every model the toolkit trains.

Every model is an InterestModel (nn/interest_model.py): encode_user (histories -> a state), score
(state, candidates -> logits), forward = score(encode_user(...)), and the typed capabilities that
training and evaluation read. The sequence models share BehaviorEmbedding, the short-term mean and
MLPHead (nn/sequence_model.py) and differ only in their sequence module; to add one, write its
module and register it in MODELS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.models.dien import DIEN
from dmqn_core.models.din import DIN
from dmqn_core.models.dmqn.model import DMQN
from dmqn_core.models.dsin import DSIN
from dmqn_core.models.eta import ETA
from dmqn_core.models.popularity import PopularityModel
from dmqn_core.models.sdim import SDIM
from dmqn_core.models.sim import SIM
from dmqn_core.models.twin import TWIN
from dmqn_core.models.twin_v2 import TWINV2
from dmqn_core.nn.interest_model import InterestModel

Builder = Callable[[ModelConfig, "np.ndarray | Tensor | None"], InterestModel[Any]]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its class, which states its capabilities (has_codebooks, trainable) without
    building it, and how to build it from a config and the training-set item popularity."""

    cls: type[InterestModel[Any]]
    build: Builder


def _plain(cls: type[InterestModel[Any]]) -> ModelEntry:
    """A model its class builds from the config alone."""
    return ModelEntry(cls, lambda config, _: cls(config))


def _build_pop(config: ModelConfig, item_popularity: np.ndarray | Tensor | None) -> InterestModel[Any]:
    if item_popularity is None:
        raise ValueError("model 'pop' needs item_popularity (training-set count of every item id)")
    return PopularityModel(config, item_popularity)


MODELS: dict[str, ModelEntry] = {
    "pop": ModelEntry(PopularityModel, _build_pop),
    "din-short": ModelEntry(DIN, lambda config, _: DIN(config, window=config.short_len)),
    "din-middle": ModelEntry(DIN, lambda config, _: DIN(config, window=config.middle_len)),
    "din-full": ModelEntry(DIN, lambda config, _: DIN(config, window=None)),
    "dien": _plain(DIEN),
    "dsin": _plain(DSIN),
    "sim": _plain(SIM),
    "eta": _plain(ETA),
    "sdim": _plain(SDIM),
    "twin": _plain(TWIN),
    "twin-v2": _plain(TWINV2),
    "dmqn": _plain(DMQN),
    # Table 3 ablation: no ICIM, target attention directly on the cluster means.
    "dmqn-simple": ModelEntry(DMQN, lambda config, _: DMQN(replace(config, icim_layers=0))),
}


def model_names() -> list[str]:
    return list(MODELS)


def has_codebooks(name: str) -> bool:
    """Whether model NAME quantizes histories into codebook clusters (DMQN and its ablation), as its class
    says: what `dmqn export-cache`, `dmqn inspect` and `dmqn report` work on, known without building it."""
    entry = MODELS.get(name)  # a run of a model this version does not know has none
    return entry is not None and entry.cls.has_codebooks


def build_model(
    name: str, config: ModelConfig, item_popularity: np.ndarray | Tensor | None = None
) -> InterestModel[Any]:
    """A fresh model NAME; item_popularity (n_items,) is needed by 'pop' only."""
    return _lookup(name).build(config, item_popularity)


def _lookup(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
