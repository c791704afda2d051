"""ModelConfig: every hyper-parameter of the CTR models, as one json-friendly dataclass.

Each field is a setting declared once (dmqn_core.declaration): its help text, flag, range and search
range are the field's; the flags, the checks and the search spaces are made from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from dmqn_core.declaration import TRAIN_AND_BENCH, Between, OneOf, check_declared, declared, setting

# MCQM's training-path options (see dmqn_core.models.dmqn.mcqm.MultiCodebookQuantizer); the first of
# each is the original behaviour.
ASSIGN_NOISES = ("gumbel", "none")
TAU_PLACEMENTS = ("after_noise", "before_noise")
STRAIGHT_THROUGH = ("plain", "centred")
CODEBOOK_INITS = ("random", "kmeans")
# BehaviorEmbedding's initialisation (dmqn_core.nn.embedding); "scaled" is the default.
EMBEDDING_INITS = ("scaled", "default")
# The short-term signal beside a long-sequence module (dmqn_core.nn.short_term).
SHORT_TERMS = ("din", "mean", "none")


def _vocabulary(what: str) -> Any:
    return setting(
        help=f"{what} in the vocabulary, index 0 (padding) included.",
        flag=None,
        from_data=True,
        low=2,
        expect=">= 2 (index 0 is padding)",
    )


@dataclass
class ModelConfig:
    # Vocabulary sizes INCLUDING index 0, which is padding in every table.
    n_items: int = _vocabulary("Items")
    n_categories: int = _vocabulary("Categories")
    n_behavior_types: int = _vocabulary("Behavior types")
    embed_dim: int = setting(
        32,
        help="Embedding and codeword dimension D.",
        flag="--embed-dim",
        commands=TRAIN_AND_BENCH,
        low=1,
        search=OneOf(16, 32, 64),
    )
    n_codebooks: int = setting(4, help="Number of codebooks N.", flag="--codebooks", low=1, search=OneOf(2, 4, 8))
    # W. N*W = 128 clusters, the paper's "approximately a hundred" (section 2.2).
    codebook_size: int = setting(
        32, help="Codewords per codebook W.", flag="--codebook-size", low=1, search=OneOf(16, 32, 64)
    )
    # Of the first epoch: it shapes the straight-through gradient.
    tau: float = setting(
        1.0,
        help="Gumbel-softmax temperature (eq. 6) of the first epoch.",
        flag="--tau",
        low=0,
        low_open=True,
        search=Between(0.1, 2.0, log=True),
    )
    # "none" is the default: it had the best mean validation AUC over MovieLens 100K and the synthetic
    # `small` set (docs/model.md "The training-path assignment"), and trains on the clusters that
    # evaluation, the cache and `dmqn inspect` use; "gumbel" is the paper's (eq. 6-7).
    assign_noise: str = setting(
        "none",
        help=f"How MCQM picks a behavior's codeword while training: {' or '.join(ASSIGN_NOISES)}; gumbel samples "
        "argmax(scores + Gumbel noise) as eq. 6-7 do, none takes the argmax of the scores, as inference does.",
        flag="--assign-noise",
        choices=ASSIGN_NOISES,
        search=OneOf(*ASSIGN_NOISES),
    )
    # "after_noise" is eq. 6 as written, (s + g) / tau: tau only shapes the gradient.
    tau_placement: str = setting(
        "after_noise",
        help=f"Where tau acts: {' or '.join(TAU_PLACEMENTS)}; after_noise divides the noisy logits, (s + g) / tau "
        "(the sampled codeword ignores tau), before_noise samples from softmax(s / tau).",
        flag="--tau-placement",
        choices=TAU_PLACEMENTS,
        search=OneOf(*TAU_PLACEMENTS),
    )
    # 1.0 = a constant temperature.
    tau_decay: float = setting(
        1.0,
        help="Epoch e trains at max(tau-min, tau · tau-decay^(e-1)); below 1 with --tau-placement before_noise "
        "anneals toward the argmax.",
        flag="--tau-decay",
        low=0,
        low_open=True,
        high=1,
    )
    tau_min: float = setting(
        0.0,
        help="Lowest temperature of the --tau-decay schedule; needed (> 0) when tau-decay < 1.",
        flag="--tau-min",
        low=0,
    )
    straight_through: str = setting(
        "plain",
        help=f"Gradient of a cluster mean (eq. 9) into the assignment: {' or '.join(STRAIGHT_THROUGH)}; plain "
        "e_l / n_k, centred (e_l - r_k) / n_k.",
        flag="--straight-through",
        choices=STRAIGHT_THROUGH,
        search=OneOf(*STRAIGHT_THROUGH),
    )
    # "random" is the initialisation of mcqm.py.
    codebook_init: str = setting(
        "random",
        help=f"Codewords at the start of a new run: {' or '.join(CODEBOOK_INITS)} (spherical k-means of the first "
        "training batches' behavior embeddings, per codebook).",
        flag="--codebook-init",
        choices=CODEBOOK_INITS,
        search=OneOf(*CODEBOOK_INITS),
    )
    # So that every codeword gets used again.
    dead_codeword_reset: bool = setting(
        False,
        help="After each epoch, move codewords no validation behavior was assigned to onto behaviors of the "
        "busiest clusters.",
        flag="--dead-codeword-reset",
        search=OneOf(False, True),
    )
    # 0 is DMQN-simple (Table 3).
    icim_layers: int = setting(
        1, help="HSTU layers in ICIM (eq. 11-13); 0 is DMQN-simple.", flag="--icim-layers", low=0, search=OneOf(1, 2)
    )
    icim_heads: int = setting(2, help="Attention heads of each HSTU layer.", flag="--icim-heads", low=1)
    short_len: int = setting(
        50,
        help="Recent behaviors of the short-term features (DIN short, the MLP's recent mean).",
        flag="--short-len",
        commands=TRAIN_AND_BENCH,
        low=1,
        search=OneOf(20, 50, 100),
    )
    # "din" for every model: it is what the baselines had, and it was DMQN's better choice on both real
    # sets (docs/experiments.md). A run stored before the setting existed had each model's own (din for the
    # baselines, mean for DMQN and DMQN-simple): None. The DIN variants, DIEN and DSIN keep their own
    # structure and ignore it.
    short_term: str | None = setting(
        "din",
        help=f"Short-term interest of dmqn, dmqn-simple, sim, eta, sdim, twin, twin-v2: {', '.join(SHORT_TERMS)} "
        "(din: a DIN over the --short-len most recent behaviors and their mean; mean: their mean only).",
        flag="--short-term",
        commands=TRAIN_AND_BENCH,
        choices=SHORT_TERMS,
        absent_means=None,
    )
    # nn/match_features.py: seven MLP inputs. On: every model gets the signal that SIM's exact search
    # reads, so a comparison measures the interest modules (docs/experiments.md).
    match_features: bool = setting(
        True,
        help="Give every model the candidate's category and item counts in the history, the time since the "
        "latest of each and its popularity before the sample, as MLP inputs.",
        flag="--match-features",
        commands=TRAIN_AND_BENCH,
        absent_means=False,
    )
    # SIM's and TWIN's time-gap embedding (log2 buckets of the gap to the history's latest behavior), so
    # that clusters can tell old interests from recent ones. The baselines that have it (SIM, TWIN, TWIN
    # V2) always do; the others ignore it. On: +0.005 test AUC [+0.003, +0.007] for DMQN on the Taobao
    # 84k sample (docs/experiments.md).
    behavior_time: bool = setting(
        True,
        help="dmqn/dmqn-simple: add a time-gap embedding to every behavior before quantizing, as SIM and TWIN have.",
        flag="--behavior-time",
        commands=TRAIN_AND_BENCH,
        absent_means=False,
    )
    mlp_hidden: tuple[int, ...] = setting((200, 80), help="Hidden sizes of the MLP head.", flag=None, low=1)
    dropout: float = setting(
        0.0,
        help="Dropout in the MLP head.",
        flag="--dropout",
        commands=TRAIN_AND_BENCH,
        low=0,
        high=1,
        high_open=True,
        search=Between(0.0, 0.5),
    )
    # The optional anti-collapse regulariser, see quantizer.usage_loss.
    usage_loss_weight: float = setting(
        0.0,
        help="Weight of the codebook-usage (anti-collapse) regulariser.",
        flag="--usage-loss-weight",
        low=0,
    )
    ctam_size_bias: bool = setting(
        True, help="CTAM adds log(cluster size) to its logits (see attention.ClusterTargetAttention).", flag=None
    )
    # models/dmqn/cluster_categories.py. 0 is the paper's CTAM. 4: +0.008 test AUC [+0.006, +0.009] for
    # DMQN on the Taobao 84k sample, +0.024 without match features (docs/experiments.md). Bounded by the
    # uint8 the state stores a count of categories in.
    cluster_categories: int = setting(
        4,
        help="dmqn/dmqn-simple: categories every cluster keeps (its most frequent); CTAM adds the candidate "
        "category's share of a cluster to its attention and gives it to the MLP; 0 = off.",
        flag="--cluster-categories",
        commands=TRAIN_AND_BENCH,
        low=0,
        high=255,
        bounds_on_flag=True,
        absent_means=0,
    )
    # ---- the project's other additions beyond the paper (docs/model.md "The paper's plain model"); all off
    # (False, "default") gives the paper's plain DMQN (examples/dmqn-paper.toml) ----
    ctam_match_scalars: bool = setting(
        True, help="Give the MLP CTAM's log-normaliser per codebook (a soft count of matching behaviors).", flag=None
    )
    # Only DMQN's head reads it: the baselines always have them.
    mlp_products: bool = setting(
        True, help="Give DMQN's MLP c * interest and c * recent besides c, the interests and recent.", flag=None
    )
    ctam_identity_init: bool = setting(
        True,
        help="CTAM's projections start as scaled identities (first logits = c . y); false: nn.Linear's init.",
        flag=None,
    )
    # Every model shares BehaviorEmbedding, so it applies to all.
    embedding_init: str = setting(
        "scaled",
        help="Embedding tables at start: scaled = item std 0.005, category 0.15, behavior type 0.05; "
        "default = nn.Embedding's N(0, 1) for all three.",
        flag=None,
        choices=EMBEDDING_INITS,
    )

    # ---- baselines (Table 2); ignored by DMQN. Their niche settings are set in a --config file ----
    middle_len: int = setting(
        200,
        help="Behaviors seen by din-middle (din-short sees --short-len, din-full all).",
        flag="--middle-len",
        commands=TRAIN_AND_BENCH,
        low=1,
        search=OneOf(100, 200, 500),
    )
    attention_heads: int = setting(
        2, help="Heads of the multi-head target attention of SIM, ETA, TWIN, TWIN V2.", flag=None, low=1
    )
    top_k: int = setting(
        50,
        help="Behaviors (TWIN V2: clusters) kept by the retrieval of SIM, ETA, TWIN, TWIN V2.",
        flag="--top-k",
        commands=TRAIN_AND_BENCH,
        low=1,
        search=OneOf(20, 50, 100),
    )
    simhash_bits: int = setting(
        32, help="ETA: bits of each SimHash signature.", flag=None, low=1, search=OneOf(16, 32, 64)
    )
    sdim_rounds: int = setting(
        48, help="SDIM: independent hash functions (m).", flag=None, low=1, search=OneOf(16, 32, 48, 64)
    )
    sdim_bits: int = setting(
        3,
        help="SDIM: bits per hash function (tau in the SDIM paper).",
        flag=None,
        low=1,
        high=16,
        search=OneOf(2, 3, 4),
    )
    cluster_max_size: int = setting(
        16,
        help="TWIN V2: hierarchical clustering splits until clusters are this small.",
        flag=None,
        low=1,
        search=OneOf(8, 16, 32),
    )
    session_gap: int = setting(1800, help="DSIN: seconds of inactivity that start a new session.", flag=None, low=1)
    max_sessions: int = setting(5, help="DSIN: most recent sessions kept.", flag=None, low=1, search=OneOf(3, 5, 10))
    session_len: int = setting(
        10, help="DSIN: most recent behaviors kept per session.", flag=None, low=1, search=OneOf(5, 10, 20)
    )
    dien_aux_weight: float = setting(
        1.0,
        help="DIEN: weight of the next-behavior auxiliary loss.",
        flag=None,
        low=0,
        search=Between(0.1, 2.0, log=True),
    )

    def __post_init__(self) -> None:
        # from_dict hands lists from json; a tuple keeps the config hashable and immutable-looking.
        self.mlp_hidden = tuple(int(h) for h in self.mlp_hidden)
        check_declared(self)
        # The rules between settings, which no one setting's range can say.
        if self.embed_dim % self.icim_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by icim_heads ({self.icim_heads})")
        if self.embed_dim % self.attention_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by attention_heads ({self.attention_heads})"
            )
        if self.tau_min > self.tau:
            raise ValueError(f"tau_min must be in [0, tau = {self.tau}], got {self.tau_min}")
        if self.tau_decay < 1.0 and self.tau_min == 0.0:
            # Without a floor tau would underflow to 0 after enough epochs and the logits divide by it.
            raise ValueError("tau_decay < 1 needs tau_min > 0, the temperature the schedule stops at")

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


# Settings added after runs were first stored, with the value that builds the model those runs trained (what
# a stored config without the key means), whatever today's default is: each one's ``absent_means``.
SETTINGS_ADDED_LATER: dict[str, Any] = {
    item.name: item.setting.absent_means for item in declared(ModelConfig) if item.setting.added_later
}
