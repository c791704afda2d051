"""DMQN, the Deep Multiple Quantization Network (SIGIR '25), Figure 1: MCQM -> ICIM -> CTAM -> MLP.

A SequenceModel whose user state is its codebook clusters (UserState) rather than the embedded
histories: encode_user (MCQM + ICIM + the pooled recent history) depends on the history only and
can be computed once per user and cached (section 2.5); score (CTAM + MLP) is the per-candidate
part. forward, the recent-history mean and auxiliary_loss are SequenceModel's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeGuard

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ModelConfig
from dmqn_core.models.dmqn.cluster_categories import candidate_share, top_categories
from dmqn_core.models.dmqn.ctam import ClusterTargetAttention
from dmqn_core.models.dmqn.icim import ClusterInteraction
from dmqn_core.models.dmqn.mcqm import AssignmentStats, MultiCodebookQuantizer, usage_loss
from dmqn_core.nn.embedding import BEHAVIOR_INIT_STD, BehaviorEmbedding
from dmqn_core.nn.interest_model import InterestModel
from dmqn_core.nn.match_features import MatchTable, match_width
from dmqn_core.nn.mlp import MLPHead
from dmqn_core.nn.sequence import TIME_BUCKETS, take_last, time_buckets
from dmqn_core.nn.sequence_model import SequenceModel
from dmqn_core.nn.short_term import ShortTermDIN, with_short_term


@dataclass
class UserState:
    """The candidate-independent representation of H histories (what section 2.5 caches)."""

    clusters: Tensor  # (H, N, W, D) ICIM output per cluster token, zero at empty clusters
    cluster_mask: Tensor  # (H, N, W) bool, True = non-empty cluster
    cluster_size: Tensor  # (H, N, W) float, number of behaviors assigned
    recent: Tensor  # (H, D) mean embedding of the last short_len behaviors
    # short_term = "din" only: the last short_len behavior embeddings (H, S, D), left-aligned and
    # chronological as histories are, and their mask (H, S); DIN reads them per candidate in score.
    short: Tensor | None = None
    short_mask: Tensor | None = None
    # match_features only: the histories' distinct categories and items with their features (nn/match_features.py).
    match: MatchTable | None = None
    # cluster_categories = T only: each cluster's T most frequent categories (H, N, W, T) long, 0 = none, and
    # their shares of the cluster (H, N, W, T) float (cluster_categories.py).
    category: Tensor | None = None
    category_share: Tensor | None = None

    def index_select(self, idx: Tensor) -> UserState:
        """Rows idx (B,) of every field."""
        return UserState(
            clusters=self.clusters.index_select(0, idx),
            cluster_mask=self.cluster_mask.index_select(0, idx),
            cluster_size=self.cluster_size.index_select(0, idx),
            recent=self.recent.index_select(0, idx),
            short=None if self.short is None else self.short.index_select(0, idx),
            short_mask=None if self.short_mask is None else self.short_mask.index_select(0, idx),
            match=None if self.match is None else self.match.index_select(idx),
            category=None if self.category is None else self.category.index_select(0, idx),
            category_share=None if self.category_share is None else self.category_share.index_select(0, idx),
        )

    def compact(self) -> UserState:
        """Drop empty clusters: per user and codebook the non-empty ones first, W cut to the largest count.

        score() gives the same logits for the compact state (CTAM has no per-codeword parameter),
        which is what lets a cache store only the non-empty clusters.
        """
        order = torch.argsort(self.cluster_mask.to(torch.int8), dim=-1, descending=True, stable=True)  # (H, N, W)
        keep = max(int(self.cluster_mask.sum(dim=-1).max()), 1) if self.cluster_mask.numel() else 1
        order = order[..., :keep]  # (H, N, W')
        D = self.clusters.shape[-1]
        return UserState(
            clusters=self.clusters.gather(2, order.unsqueeze(-1).expand(*order.shape, D)),
            cluster_mask=self.cluster_mask.gather(2, order),
            cluster_size=self.cluster_size.gather(2, order),
            recent=self.recent,
            short=self.short,
            short_mask=self.short_mask,
            match=self.match,
            category=None if self.category is None else _gather_clusters(self.category, order),
            category_share=None if self.category_share is None else _gather_clusters(self.category_share, order),
        )


def _gather_clusters(x: Tensor, order: Tensor) -> Tensor:
    """x (H, N, W, T) at clusters order (H, N, W') -> (H, N, W', T)."""
    return x.gather(2, order.unsqueeze(-1).expand(*order.shape, x.shape[-1]))


@dataclass
class QuantizerDiagnostics:
    """What DMQN.quantizer_diagnostics measures on a batch of histories; add batches with +."""

    assignment: AssignmentStats  # MCQM: training-path vs inference-path codewords, score margins
    icim_sums: np.ndarray  # (icim_layers, 2) ICIM: sums of [|output - input|^2, |input|^2] per layer

    def __add__(self, other: QuantizerDiagnostics) -> QuantizerDiagnostics:
        return QuantizerDiagnostics(self.assignment + other.assignment, self.icim_sums + other.icim_sums)

    @property
    def icim_norm_ratio(self) -> np.ndarray:
        """(icim_layers,) |output - input| / |input| of each layer over all non-empty clusters (NaN: none)."""
        change, size = self.icim_sums.T
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(change / size)


class DMQN(SequenceModel[UserState]):
    has_codebooks: ClassVar[bool] = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config = self.with_resolved_short_term(config)
        self.embedding = BehaviorEmbedding(c)
        self.quantizer = MultiCodebookQuantizer(
            c.n_codebooks, c.codebook_size, c.embed_dim, c.tau, c.assign_noise, c.tau_placement, c.straight_through
        )
        self.icim = ClusterInteraction(
            c.icim_layers, c.n_codebooks, c.codebook_size, c.embed_dim, c.icim_heads, c.dropout
        )
        self.ctam = ClusterTargetAttention(
            c.n_codebooks, c.embed_dim, c.ctam_size_bias, c.ctam_identity_init, share_bias=c.cluster_categories > 0
        )
        # One match scalar per codebook (CTAM's log-normaliser) unless ctam_match_scalars is off; with
        # short_term = "din" the DIN interest is one more input vector.
        self.head = MLPHead(
            c.embed_dim,
            c.n_codebooks + (c.short_term == "din"),
            c.mlp_hidden,
            c.dropout,
            n_scalars=(c.n_codebooks if c.ctam_match_scalars else 0)
            + (c.n_codebooks if c.cluster_categories else 0)
            + match_width(c),
            products=c.mlp_products,
            recent=c.short_term != "none",
        )
        # Created last, so that a "mean" DMQN (the default) initialises as it did before short_term,
        # match_features and behavior_time existed.
        self.short = ShortTermDIN(c.embed_dim, c.short_len) if c.short_term == "din" else None
        self.match = self.match_module()
        self.time = None
        if c.behavior_time:
            self.time = nn.Embedding(TIME_BUCKETS, c.embed_dim)  # SIM's e_t, added to every behavior
            nn.init.normal_(self.time.weight, std=BEHAVIOR_INIT_STD)

    def encode_user(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        hist_timestamp: Tensor | None = None,
    ) -> UserState:
        """(H, L) ids and mask (True = real, left-aligned) -> UserState of H users; the timestamps are read
        by behavior_time and match_features only."""
        e = self.behaviors(hist_item, hist_category, hist_behavior, hist_mask, hist_timestamp)  # (H, L, D)
        with_usage = self.training and self.config.usage_loss_weight > 0
        q = self.quantizer(e, hist_mask, with_usage=with_usage)  # MCQM, eq. 3-10
        # The usage regulariser, read by auxiliary_loss(); None after an eval forward.
        self._auxiliary = self.config.usage_loss_weight * usage_loss(q.mean_prob) if with_usage else None
        clusters = self.icim(q.clusters, q.cluster_mask)  # ICIM, eq. 11-13
        short, short_mask = take_last(e, hist_mask, self.config.short_len) if self.short is not None else (None, None)
        match = self.match_table(hist_item, hist_category, hist_mask, hist_timestamp)
        category = share = None
        if self.config.cluster_categories:
            codeword = q.codeword  # (H, N, L) the inference-path clusters, which training draws anew
            if codeword is None:
                codeword = self.quantizer.assign(e.detach(), hist_mask)
            category, share = top_categories(
                codeword,
                hist_category,
                self.config.codebook_size,
                self.config.cluster_categories,
                self.config.n_categories,  # the table's size: ids 0 (padding) to n_categories - 1
            )  # (H, N, W, T) each
        return UserState(
            clusters,
            q.cluster_mask,
            q.cluster_size,
            self.recent(e, hist_mask),
            short,
            short_mask,
            match,
            category,
            share,
        )

    def behaviors(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        hist_timestamp: Tensor | None,
    ) -> Tensor:
        """The behavior embeddings MCQM quantizes (H, L, D): BehaviorEmbedding's, plus the time-gap embedding
        with behavior_time."""
        extra = None
        if self.time is not None:
            if hist_timestamp is None:
                raise ValueError("behavior_time needs the histories' timestamps")
            extra = (self.time, time_buckets(hist_timestamp, hist_mask))
        return self.embedding.behaviors(hist_item, hist_category, hist_behavior, hist_mask, extra)  # (H, L, D)

    def score(
        self,
        state: UserState,
        cand_item: Tensor,
        cand_category: Tensor,
        state_index: Tensor | None = None,
        cand_popularity: Tensor | None = None,
    ) -> Tensor:
        """CTAM + MLP: (B,) candidates against state rows state_index (B,) (None = row b) -> (B,) logits.

        cand_popularity (B,) is read by match features only.
        """
        return self.score_with_weights(state, cand_item, cand_category, state_index, cand_popularity)[0]

    def score_with_weights(
        self,
        state: UserState,
        cand_item: Tensor,
        cand_category: Tensor,
        state_index: Tensor | None = None,
        cand_popularity: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """score's (B,) logits and the CTAM attention weights (B, N, W) of each candidate over the clusters."""
        # The short term and the match table read the users' rows themselves; one served user's state
        # (one row) is broadcast over the candidates instead of being copied for each of them.
        full = state
        rows = torch.arange(cand_item.shape[0], device=cand_item.device) if state_index is None else state_index
        if state_index is not None and state.clusters.shape[0] > 1:  # the rest is read from `full` by its rows
            state = replace(state, short=None, short_mask=None, match=None).index_select(state_index)
        c = self.embedding.candidate(cand_item, cand_category)  # (B, D)
        share = None
        if state.category is not None and state.category_share is not None:
            share = candidate_share(state.category, state.category_share, cand_category)  # (B, N, W)
        interest, match, weights = self.ctam(
            c, state.clusters, state.cluster_mask, state.cluster_size, share
        )  # (B, N, D), (B, N), (B, N, W)
        if self.short is not None:  # not copied per candidate: one served user's behaviors are broadcast
            assert full.short is not None and full.short_mask is not None  # encode_user sets them with self.short
            interest = with_short_term(self.short, interest, c, full.short, full.short_mask, rows)  # (B, N + 1, D)
        scalars = [match] if self.config.ctam_match_scalars else []  # (B, N)
        if share is not None:
            scalars.append((weights * share).sum(dim=-1))  # (B, N) the attended clusters' share of the category
        target_match = self.match_scalars(full.match, cand_item, cand_category, cand_popularity, rows)
        if target_match is not None:
            scalars.append(target_match)  # (B, WIDTH)
        recent = state.recent.expand(c.shape[0], -1)  # (B, D)
        logits = self.head(c, interest, recent, torch.cat(scalars, dim=1) if scalars else None)  # (B,)
        return logits, weights

    def codeword_counts(self, state: UserState) -> Tensor:
        return state.cluster_size.sum(dim=0)  # (N, W)

    @torch.no_grad()
    def codeword_assignments(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        hist_timestamp: Tensor | None = None,
    ) -> Tensor:
        """(H, N, L) long: the inference-path (noise-free argmax) codeword of every behavior, -1 at padding."""
        e = self.behaviors(hist_item, hist_category, hist_behavior, hist_mask, hist_timestamp)
        return self.quantizer.assign(e, hist_mask)

    def set_epoch(self, epoch: int) -> None:
        """Training calls this before epoch ``epoch`` (1 = the first): MCQM's temperature follows the tau schedule."""
        self.quantizer.set_tau(self.config.tau_at(epoch))

    @torch.no_grad()
    def quantizer_diagnostics(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        generator: torch.Generator | None = None,
        hist_timestamp: Tensor | None = None,
    ) -> QuantizerDiagnostics:
        """MCQM's assignment agreement and margins, and ICIM's per-layer change, on (H, L) histories.

        The training codeword is sampled as the current options and tau sample it (noise from
        ``generator``); ICIM is measured on the inference-path clusters, so the model must be in eval mode.
        """
        if self.training:
            raise RuntimeError("quantizer_diagnostics measures the inference path; call model.eval() first")
        e = self.behaviors(hist_item, hist_category, hist_behavior, hist_mask, hist_timestamp)  # (H, L, D)
        q = self.quantizer(e, hist_mask)
        return QuantizerDiagnostics(
            assignment=self.quantizer.agreement(e, hist_mask, generator),
            icim_sums=self.icim.layer_change(q.clusters, q.cluster_mask),
        )


def is_codebook_model(model: InterestModel[Any]) -> TypeGuard[DMQN]:
    """Whether the model's class says it has codebooks (InterestModel.has_codebooks); DMQN is the one class
    that does (tests/models/test_model_contract.py), so such a model has DMQN's codebook methods."""
    return model.has_codebooks
