"""The hyper-parameter search space of every registered model, as data, for `dmqn tune`.

Each model searches the settings every trained model shares (learning rate, weight decay, dropout,
embedding size) and its own knobs (DMQN's codebooks, the two-stage models' top-k, ...). The names
are those of ``ModelConfig`` ([model]) and ``TrainConfig`` ([train]), so that a trial's settings
go to ``train()`` as they are. A setting's search range is declared with the setting (its ``search``,
dmqn_core.declaration); this module says which settings each model searches.

Two spaces per model. ``default`` is the one comparisons use: the shared settings plus at most
MAX_OWN of the model's own, so that under one trial budget no model gets a wider search (TPE with a
handful of trials in 13 dimensions is close to random search, in 5-7 it is not); DMQN's quantizer
mechanics stay at their chosen defaults there. ``full`` adds them back, for studies of DMQN itself.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from dmqn_core.config import ModelConfig
from dmqn_core.declaration import Between, OneOf, declared
from dmqn_core.errors import DmqnError
from dmqn_core.training.train import TrainConfig

MODEL = "model"
TRAIN = "train"


@dataclass(frozen=True)
class Param:
    """A searched setting: its table, its name and the search range its declaration gives."""

    section: str
    name: str
    search: Between | OneOf

    def suggest(self, trial: optuna.Trial) -> Any:
        search = self.search
        if isinstance(search, OneOf):
            return trial.suggest_categorical(self.name, list(search.choices))
        if search.or_zero and not trial.suggest_categorical(f"use_{self.name}", [False, True]):
            return 0.0
        return trial.suggest_float(self.name, search.low, search.high, log=search.log)


_SEARCHABLE = {
    item.name: Param(section, item.name, item.setting.search)
    for section, cls in ((MODEL, ModelConfig), (TRAIN, TrainConfig))
    for item in declared(cls)
    if item.setting.search is not None
}


def _params(*names: str) -> tuple[Param, ...]:
    return tuple(_SEARCHABLE[name] for name in names)


# What every model with weights searches.
SHARED = _params("lr", "weight_decay", "dropout", "embed_dim")

_TOP_K = _params("top_k")
# The codebooks' sizes, the Gumbel-softmax temperature (eq. 6), how the training path assigns codewords
# (dmqn_core.models.dmqn.mcqm: the paper's noisy sampling or the plain argmax, tau where the noise sees it
# or not, the straight-through form), where the codewords start and whether unused ones are moved back.
_CODEBOOKS = _params(
    "codebook_size",
    "n_codebooks",
    "tau",
    "assign_noise",
    "tau_placement",
    "straight_through",
    "codebook_init",
    "dead_codeword_reset",
)

SEARCH_SPACES = ("default", "full")
MAX_OWN = 3  # settings of its own a model searches in the default space, beside SHARED

# Every model of dmqn_core.models.registry (tests/training/test_tune.py checks that none is missing).
FULL_SPACES: dict[str, tuple[Param, ...]] = {
    # Counts items in the training set: nothing it does depends on a setting.
    "pop": (),
    "din-short": (*SHARED, *_params("short_len")),
    "din-middle": (*SHARED, *_params("middle_len")),
    "din-full": SHARED,
    "dien": (*SHARED, *_params("dien_aux_weight")),
    "dsin": (*SHARED, *_params("max_sessions", "session_len")),
    "sim": (*SHARED, *_TOP_K),
    "eta": (*SHARED, *_TOP_K, *_params("simhash_bits")),
    "sdim": (*SHARED, *_params("sdim_rounds", "sdim_bits")),
    "twin": (*SHARED, *_TOP_K),
    "twin-v2": (*SHARED, *_TOP_K, *_params("cluster_max_size")),
    "dmqn": (*SHARED, *_CODEBOOKS, *_params("icim_layers")),
    # The registry fixes icim_layers = 0 for the ablation.
    "dmqn-simple": (*SHARED, *_CODEBOOKS),
}
# The codebook sizes and ICIM's depth: the quantizer's mechanics (temperature, noise, straight-through
# form, initialisation, reset) keep the defaults of ModelConfig, chosen on MovieLens 100K and synthetic.
_DMQN_SIZES = ("codebook_size", "n_codebooks", "icim_layers")
DEFAULT_SPACES: dict[str, tuple[Param, ...]] = {
    **FULL_SPACES,
    "dmqn": tuple(p for p in FULL_SPACES["dmqn"] if p in SHARED or p.name in _DMQN_SIZES),
    "dmqn-simple": tuple(p for p in FULL_SPACES["dmqn-simple"] if p in SHARED or p.name in _DMQN_SIZES),
}


def space(model_name: str, search_space: str = "default") -> Sequence[Param]:
    if search_space not in SEARCH_SPACES:
        raise DmqnError(f"unknown search space {search_space!r}; choose one of {', '.join(SEARCH_SPACES)}")
    spaces = FULL_SPACES if search_space == "full" else DEFAULT_SPACES
    try:
        return spaces[model_name]
    except KeyError:
        raise DmqnError(f"unknown model {model_name!r}; known: {', '.join(spaces)}") from None


def suggest(
    trial: optuna.Trial, model_name: str, fixed: Collection[str] = (), search_space: str = "default"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model settings, train settings) of one trial of ``model_name`` in ``search_space``.

    The settings named in ``fixed`` are left out of the search (the caller sets them), so that a
    trial's recorded parameters are the ones its run used.
    """
    settings: dict[str, dict[str, Any]] = {MODEL: {}, TRAIN: {}}
    for param in space(model_name, search_space):
        if param.name not in fixed:
            settings[param.section][param.name] = param.suggest(trial)
    return settings[MODEL], settings[TRAIN]


def split_settings(model_name: str, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Searched ``settings`` of ``model_name`` by name -> (model settings, train settings)."""
    sections = {param.name: param.section for param in space(model_name, "full")}  # holds the default space
    split: dict[str, dict[str, Any]] = {MODEL: {}, TRAIN: {}}
    for name, value in settings.items():
        split[sections[name]][name] = value
    return split[MODEL], split[TRAIN]
