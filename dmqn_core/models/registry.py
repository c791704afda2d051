"""Model registry: build_model(name, config) for every model the toolkit trains.

Every model takes ModelConfig and implements forward(hist_item, hist_category, hist_behavior,
hist_mask, hist_index, cand_item, cand_category, hist_timestamp=None) -> (B,) logits and
auxiliary_loss(). Sequence models are InterestModels (nn/interest_model.py): they share
BehaviorEmbedding, the short-term mean and MLPHead, split at the candidate into encode_user and
score, and differ only in their sequence module; to add one, write its module and register a
builder in MODEL_BUILDERS (and its name in CODEBOOK_MODELS if its class sets has_codebooks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch.nn as nn
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

Builder = Callable[[ModelConfig, "np.ndarray | Tensor | None"], nn.Module]


def _build_pop(config: ModelConfig, item_popularity: np.ndarray | Tensor | None) -> nn.Module:
    if item_popularity is None:
        raise ValueError("model 'pop' needs item_popularity (training-set count of every item id)")
    return PopularityModel(config, item_popularity)


MODEL_BUILDERS: dict[str, Builder] = {
    "pop": _build_pop,
    "din-short": lambda config, _: DIN(config, window=config.short_len),
    "din-middle": lambda config, _: DIN(config, window=config.middle_len),
    "din-full": lambda config, _: DIN(config, window=None),
    "dien": lambda config, _: DIEN(config),
    "dsin": lambda config, _: DSIN(config),
    "sim": lambda config, _: SIM(config),
    "eta": lambda config, _: ETA(config),
    "sdim": lambda config, _: SDIM(config),
    "twin": lambda config, _: TWIN(config),
    "twin-v2": lambda config, _: TWINV2(config),
    "dmqn": lambda config, _: DMQN(config),
    # Table 3 ablation: no ICIM, target attention directly on the cluster means.
    "dmqn-simple": lambda config, _: DMQN(replace(config, icim_layers=0)),
}


# Models whose user state is a set of codebook clusters (MCQM): the ones `dmqn export-cache`,
# `dmqn inspect` and `dmqn report` work on, and whose codeword use training records. By name, so
# that it is known without building the model; their classes say has_codebooks = True.
CODEBOOK_MODELS = frozenset({"dmqn", "dmqn-simple"})


def model_names() -> list[str]:
    return list(MODEL_BUILDERS)


def has_codebooks(name: str) -> bool:
    """Whether model NAME quantizes histories into codebook clusters (DMQN and its ablation)."""
    return name in CODEBOOK_MODELS


def build_model(name: str, config: ModelConfig, item_popularity: np.ndarray | Tensor | None = None) -> nn.Module:
    """A fresh model NAME; item_popularity (n_items,) is needed by 'pop' only."""
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_BUILDERS)}") from None
    return builder(config, item_popularity)
