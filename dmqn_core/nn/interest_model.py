"""InterestModel[State]: the contract every model of the registry keeps, whatever its user state.

A model splits at the candidate, as DMQN does for its cache (section 2.5):

- encode_user: the histories alone -> a user state of type State (DMQN: its codebook clusters,
  UserState; the baselines: the embedded histories, Histories; the popularity scorer: None);
- score: a state and candidates -> logits;
- forward = score(encode_user(...)), what training and evaluation call.

What training and evaluation need to know about a model beyond that is stated here, as typed
members with the defaults of a model that needs nothing more: whether it learns (``trainable``),
whether its state is a set of codebook clusters (``has_codebooks``), the loss it adds to the CTR
loss, what it does at the start of an epoch and the codeword counts of a state. Training and
evaluation read these and nothing else; a model overrides the ones that differ for it.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Generic, TypeVar

import torch
import torch.nn as nn
from torch import Tensor

from dmqn_core.config import ModelConfig

State = TypeVar("State")


class InterestModel(nn.Module, Generic[State]):
    config: ModelConfig
    # False: nothing to learn (the popularity scorer); training then evaluates it once instead of fitting it.
    trainable: ClassVar[bool] = True
    # Whether the user state is a set of codebook clusters (MCQM): what evaluation counts per codeword,
    # training records and initialises, and export-cache, inspect and report work on. The one source of
    # this fact; the registry reads it from the class (registry.has_codebooks).
    has_codebooks: ClassVar[bool] = False

    def encode_user(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        hist_timestamp: Tensor | None = None,
    ) -> State:
        """(H, L) ids, mask (True = real, left-aligned) and timestamps -> the state of H users."""
        raise NotImplementedError

    def score(
        self,
        state: State,
        cand_item: Tensor,
        cand_category: Tensor,
        state_index: Tensor | None = None,
        cand_popularity: Tensor | None = None,
    ) -> Tensor:
        """(B,) candidates against state rows state_index (B,) (None = row b) -> (B,) logits.

        cand_popularity (B,): the candidates' behaviors before the sample's time, read by match features only."""
        raise NotImplementedError

    def forward(
        self,
        hist_item: Tensor,
        hist_category: Tensor,
        hist_behavior: Tensor,
        hist_mask: Tensor,
        hist_index: Tensor,
        cand_item: Tensor,
        cand_category: Tensor,
        hist_timestamp: Tensor | None = None,
        cand_popularity: Tensor | None = None,
    ) -> Tensor:
        """H de-duplicated histories (H, L), B candidates pointing at them via hist_index (B,) -> (B,) logits."""
        state = self.encode_user(hist_item, hist_category, hist_behavior, hist_mask, hist_timestamp)
        return self.score(state, cand_item, cand_category, hist_index, cand_popularity)

    def auxiliary_loss(self) -> Tensor:
        """The loss the model adds to the CTR loss in training (DIEN's L_aux, DMQN's usage regulariser), weighted.

        That of the last forward if it ran in training mode, else zero; zero for a model without one.
        Add it to the CTR loss before backward.
        """
        first = next(itertools.chain(self.parameters(), self.buffers()))
        return torch.zeros((), device=first.device)

    def set_epoch(self, epoch: int) -> None:
        """Training calls this before epoch ``epoch`` (1 = the first): for schedules (DMQN's tau)."""

    def codeword_counts(self, state: State) -> Tensor | None:
        """(N, W) behaviors assigned to each codeword, summed over the state's users; None without codebooks."""
        return None
