"""The hyper-parameter search space of every registered model, as data, for `dmqn tune`.

Each model searches the settings every trained model shares (learning rate, weight decay, dropout,
embedding size) and its own knobs (DMQN's codebooks, the two-stage models' top-k, ...). The names
are those of ``ModelConfig`` ([model]) and ``TrainConfig`` ([train]), so that a trial's settings
go to ``train()`` as they are.

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

from dmqn_core.errors import DmqnError

MODEL = "model"
TRAIN = "train"


@dataclass(frozen=True)
class Float:
    """A number in [low, high], searched on a log scale if ``log``; ``or_zero``: 0 is a choice too."""

    section: str
    name: str
    low: float
    high: float
    log: bool = False
    # A log scale cannot hold 0, and "no weight decay" is the baseline worth trying: a yes/no
    # parameter (use_NAME) decides first, the log-scale value is searched only when it says yes.
    or_zero: bool = False

    def suggest(self, trial: optuna.Trial) -> float:
        if self.or_zero and not trial.suggest_categorical(f"use_{self.name}", [False, True]):
            return 0.0
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class Choice:
    """One of a few values (sizes that only make sense as powers of two, lengths, counts, modes)."""

    section: str
    name: str
    choices: tuple[int, ...] | tuple[str, ...]

    def suggest(self, trial: optuna.Trial) -> int | str:
        return trial.suggest_categorical(self.name, list(self.choices))


Param = Float | Choice

# What every model with weights searches.
SHARED: tuple[Param, ...] = (
    Float(TRAIN, "lr", 1e-4, 1e-2, log=True),
    Float(TRAIN, "weight_decay", 1e-8, 1e-3, log=True, or_zero=True),
    Float(MODEL, "dropout", 0.0, 0.5),
    Choice(MODEL, "embed_dim", (16, 32, 64)),
)

_TOP_K = Choice(MODEL, "top_k", (20, 50, 100))
_CODEBOOKS = (
    Choice(MODEL, "codebook_size", (16, 32, 64)),  # W
    Choice(MODEL, "n_codebooks", (2, 4, 8)),  # N
    Float(MODEL, "tau", 0.1, 2.0, log=True),  # Gumbel-softmax temperature (eq. 6)
    # How the training path assigns codewords (dmqn_core.models.dmqn.mcqm): the paper's noisy
    # sampling or the plain argmax, tau where the noise sees it or not, and the straight-through form.
    Choice(MODEL, "assign_noise", ("gumbel", "none")),
    Choice(MODEL, "tau_placement", ("after_noise", "before_noise")),
    Choice(MODEL, "straight_through", ("plain", "centred")),
    # Where the codewords start and whether unused ones are moved back among the behaviors (mcqm.py).
    Choice(MODEL, "codebook_init", ("random", "kmeans")),
    Choice(MODEL, "dead_codeword_reset", (False, True)),
)

SEARCH_SPACES = ("default", "full")
MAX_OWN = 3  # settings of its own a model searches in the default space, beside SHARED

# Every model of dmqn_core.models.registry (tests/training/test_tune.py checks that none is missing).
FULL_SPACES: dict[str, tuple[Param, ...]] = {
    # Counts items in the training set: nothing it does depends on a setting.
    "pop": (),
    "din-short": (*SHARED, Choice(MODEL, "short_len", (20, 50, 100))),
    "din-middle": (*SHARED, Choice(MODEL, "middle_len", (100, 200, 500))),
    "din-full": SHARED,
    "dien": (*SHARED, Float(MODEL, "dien_aux_weight", 0.1, 2.0, log=True)),
    "dsin": (*SHARED, Choice(MODEL, "max_sessions", (3, 5, 10)), Choice(MODEL, "session_len", (5, 10, 20))),
    "sim": (*SHARED, _TOP_K),
    "eta": (*SHARED, _TOP_K, Choice(MODEL, "simhash_bits", (16, 32, 64))),
    "sdim": (*SHARED, Choice(MODEL, "sdim_rounds", (16, 32, 48, 64)), Choice(MODEL, "sdim_bits", (2, 3, 4))),
    "twin": (*SHARED, _TOP_K),
    "twin-v2": (*SHARED, _TOP_K, Choice(MODEL, "cluster_max_size", (8, 16, 32))),
    "dmqn": (*SHARED, *_CODEBOOKS, Choice(MODEL, "icim_layers", (1, 2))),
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
