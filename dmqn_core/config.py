"""ModelConfig: every hyper-parameter of the CTR models, as one json-friendly dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# MCQM's training-path options (see dmqn_core.models.dmqn.mcqm.MultiCodebookQuantizer); the first of
# each is the original behaviour and the default.
ASSIGN_NOISES = ("gumbel", "none")
TAU_PLACEMENTS = ("after_noise", "before_noise")
STRAIGHT_THROUGH = ("plain", "centred")
CODEBOOK_INITS = ("random", "kmeans")
# BehaviorEmbedding's initialisation (dmqn_core.nn.embedding); "scaled" is the default.
EMBEDDING_INITS = ("scaled", "default")
# The short-term signal beside a long-sequence module (dmqn_core.nn.short_term).
SHORT_TERMS = ("din", "mean", "none")


# Settings added after runs were first stored, with the value that builds the model those runs trained (what
# a stored config without the key means), whatever today's default is.
SETTINGS_ADDED_LATER: dict[str, Any] = {
    "short_term": None,
    "match_features": False,
    "behavior_time": False,
    "cluster_categories": 0,
}


@dataclass
class ModelConfig:
    # Vocabulary sizes INCLUDING index 0, which is padding in every table.
    n_items: int
    n_categories: int
    n_behavior_types: int
    embed_dim: int = 32  # D
    n_codebooks: int = 4  # N
    # W. N*W = 128 clusters, the paper's "approximately a hundred" (section 2.2).
    codebook_size: int = 32
    tau: float = 1.0  # softmax temperature (eq. 6) of the first epoch: it shapes the straight-through gradient
    # How MCQM picks a behavior's codeword while training (inference always takes the noise-free argmax):
    # "gumbel" = argmax of scores + Gumbel noise (eq. 6-7, the paper's); "none" = argmax of the scores (plain
    # straight-through). "none" is the default: it had the best mean validation AUC over MovieLens 100K and
    # the synthetic `small` set (docs/model.md "The training-path assignment"), and trains on the clusters that
    # evaluation, the cache and `dmqn inspect` use.
    assign_noise: str = "none"
    # Where tau acts: "after_noise" = (s + g) / tau as eq. 6 writes it, so tau only shapes the gradient;
    # "before_noise" = s / tau + g, a sample of softmax(s / tau): a lower tau makes it nearer the argmax.
    tau_placement: str = "after_noise"
    # Temperature schedule: epoch e (1, 2, ...) trains at max(tau_min, tau * tau_decay^(e-1)); 1.0 = constant.
    tau_decay: float = 1.0
    tau_min: float = 0.0
    # Gradient of the mean pool (eq. 9) into the assignment probabilities: "plain" = e_l / n_k,
    # "centred" = (e_l - r_k) / n_k.
    straight_through: str = "plain"
    # Codewords at the start: "random" (the initialisation of mcqm.py) or "kmeans" = k-means centres of
    # the behavior embeddings of the first training batches (per codebook, in its projected space).
    codebook_init: str = "random"
    # After each epoch, move codewords no validation behavior was assigned to onto behaviors of the
    # busiest clusters (dead-codeword reset), so that every codeword gets used again.
    dead_codeword_reset: bool = False
    icim_layers: int = 1  # stacked HSTU layers (eq. 11-13); 0 = DMQN-simple (Table 3)
    icim_heads: int = 2
    short_len: int = 50  # most recent behaviors mean-pooled into the MLP input
    # The short-term interest of DMQN, DMQN-simple, SIM, ETA, SDIM, TWIN and TWIN V2 (nn/short_term.py):
    # "din" = a DIN over the short_len most recent behaviors and their mean in the MLP input; "mean" = the
    # mean only; "none" = neither. "din" for every model: it is what the baselines had, and it was DMQN's
    # better choice on both real sets (docs/experiments.md). None = each model's own from before the
    # setting existed (din for the baselines, mean for DMQN and DMQN-simple): what a run stored before it
    # reads as. The DIN variants, DIEN and DSIN keep their own structure and ignore it.
    short_term: str | None = "din"
    # Target-match features for every model (nn/match_features.py): counts of the candidate's category and
    # item in the history (all, recent), the gap since the latest of each, and the candidate's popularity
    # before the sample's time, as seven MLP inputs. On: every model gets the signal that SIM's exact
    # search reads, so a comparison measures the interest modules (docs/experiments.md).
    match_features: bool = True
    # DMQN and DMQN-simple: add SIM's and TWIN's time-gap embedding (log2 buckets of the gap to the
    # history's latest behavior) to every behavior before MCQM, so that clusters can tell old interests
    # from recent ones. The baselines that have it (SIM, TWIN, TWIN V2) always do; the others ignore it.
    # On: +0.005 test AUC [+0.003, +0.007] for DMQN on the Taobao 84k sample (docs/experiments.md).
    behavior_time: bool = True
    mlp_hidden: tuple[int, ...] = (200, 80)
    dropout: float = 0.0
    # Weight of the optional codebook-usage regulariser (anti-collapse, see quantizer.usage_loss).
    usage_loss_weight: float = 0.0
    # Add log(cluster size) to the CTAM logits (see attention.ClusterTargetAttention).
    ctam_size_bias: bool = True
    # DMQN's exact category matching (models/dmqn/cluster_categories.py): every cluster keeps its T most
    # frequent categories with their shares; CTAM adds the candidate category's share to its logits and
    # gives the MLP its attention-pooled share per codebook. 0 = off (the paper's CTAM). 4: +0.008 test AUC
    # [+0.006, +0.009] for DMQN on the Taobao 84k sample, +0.024 without match features (docs/experiments.md).
    cluster_categories: int = 4
    # ---- the project's other additions beyond the paper (docs/model.md "The paper's plain model"); all off
    # (False, "default") gives the paper's plain DMQN (examples/dmqn-paper.toml) ----
    # Give the MLP CTAM's log-normaliser per codebook (a soft count of matching behaviors, see ctam.py).
    ctam_match_scalars: bool = True
    # Give the MLP c * interest and c * recent besides c, the interests and recent (see nn/mlp.py);
    # only DMQN's head reads it, the baselines always have them.
    mlp_products: bool = True
    # CTAM's projections start as scaled identities (first logits = c . y); False = nn.Linear's uniform init.
    ctam_identity_init: bool = True
    # Embedding tables at start: "scaled" = item std 0.005, category 0.15, behavior type 0.05;
    # "default" = nn.Embedding's N(0, 1) for all three. Applies to every model (they share BehaviorEmbedding).
    embedding_init: str = "scaled"

    # ---- baselines (Table 2); ignored by DMQN ----
    middle_len: int = 200  # behaviors seen by din-middle (din-short sees short_len, din-full all)
    attention_heads: int = 2  # heads of the multi-head target attention of SIM, ETA, TWIN, TWIN V2
    top_k: int = 50  # behaviors (clusters for TWIN V2) a two-stage model keeps for its exact search
    simhash_bits: int = 32  # ETA: bits of each SimHash signature
    sdim_rounds: int = 48  # SDIM: independent hash functions (m)
    sdim_bits: int = 3  # SDIM: bits per hash function (tau in the SDIM paper)
    cluster_max_size: int = 16  # TWIN V2: hierarchical clustering splits until clusters are this small
    session_gap: int = 1800  # DSIN: seconds of inactivity that start a new session
    max_sessions: int = 5  # DSIN: most recent sessions kept
    session_len: int = 10  # DSIN: most recent behaviors kept per session
    dien_aux_weight: float = 1.0  # DIEN: weight of the next-behavior auxiliary loss

    def __post_init__(self) -> None:
        # from_dict hands lists from json; a tuple keeps the config hashable and immutable-looking.
        self.mlp_hidden = tuple(int(h) for h in self.mlp_hidden)
        # NaN passes every `<` and `<=` test below (all comparisons with NaN are false).
        for name in ("tau", "tau_decay", "tau_min", "dropout", "usage_loss_weight", "dien_aux_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("n_items", "n_categories", "n_behavior_types"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (index 0 is padding), got {getattr(self, name)}")
        for name in (
            "embed_dim",
            "n_codebooks",
            "codebook_size",
            "icim_heads",
            "short_len",
            "middle_len",
            "attention_heads",
            "top_k",
            "simhash_bits",
            "sdim_rounds",
            "sdim_bits",
            "cluster_max_size",
            "session_gap",
            "max_sessions",
            "session_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.cluster_categories <= 255:
            raise ValueError(f"cluster_categories must be in [0, 255], got {self.cluster_categories}")
        if self.icim_layers < 0:
            raise ValueError(f"icim_layers must be >= 0, got {self.icim_layers}")
        if self.embed_dim % self.icim_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by icim_heads ({self.icim_heads})")
        if self.embed_dim % self.attention_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by attention_heads ({self.attention_heads})"
            )
        if self.sdim_bits > 16:
            raise ValueError(f"sdim_bits must be <= 16, got {self.sdim_bits}")
        if self.dien_aux_weight < 0:
            raise ValueError(f"dien_aux_weight must be >= 0, got {self.dien_aux_weight}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.short_term is not None and self.short_term not in SHORT_TERMS:
            raise ValueError(f"short_term must be one of {', '.join(SHORT_TERMS)}, got {self.short_term!r}")
        for name, choices in (
            ("assign_noise", ASSIGN_NOISES),
            ("tau_placement", TAU_PLACEMENTS),
            ("straight_through", STRAIGHT_THROUGH),
            ("codebook_init", CODEBOOK_INITS),
            ("embedding_init", EMBEDDING_INITS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not 0.0 < self.tau_decay <= 1.0:
            raise ValueError(f"tau_decay must be in (0, 1], got {self.tau_decay}")
        if not 0.0 <= self.tau_min <= self.tau:
            raise ValueError(f"tau_min must be in [0, tau = {self.tau}], got {self.tau_min}")
        if self.tau_decay < 1.0 and self.tau_min == 0.0:
            # Without a floor tau would underflow to 0 after enough epochs and the logits divide by it.
            raise ValueError("tau_decay < 1 needs tau_min > 0, the temperature the schedule stops at")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.usage_loss_weight < 0:
            raise ValueError(f"usage_loss_weight must be >= 0, got {self.usage_loss_weight}")
        if any(h < 1 for h in self.mlp_hidden):
            raise ValueError(f"mlp_hidden sizes must be >= 1, got {self.mlp_hidden}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mlp_hidden"] = list(self.mlp_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A stored config (a run's). A key it lacks was added after the run was made: it takes the value
        that reproduces the model of then (SETTINGS_ADDED_LATER), not today's default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        return cls(**{**SETTINGS_ADDED_LATER, **d})

    def tau_at(self, epoch: int) -> float:
        """The temperature of training epoch ``epoch`` (1 = the first) under the tau schedule."""
        return max(self.tau_min, self.tau * self.tau_decay ** (epoch - 1))
