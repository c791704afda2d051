"""The random model batch shared by the model tests (a plain helper module, imported by test files)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dmqn_core.config import ModelConfig

BASE_TIME = 1_700_000_000  # unix seconds of every history's first behavior, before its first gap


def random_batch(
    config: ModelConfig,
    seed: int = 0,
    lengths: Sequence[int] | Tensor | None = None,
    H: int = 6,
    L: int | None = None,
    B: int = 12,
    distinct_items: bool = False,
) -> dict[str, Tensor]:
    """H left-aligned histories (H, L) and B candidates over them, as a model's forward takes them.

    lengths: behaviors per history; by default random in [1, L] with history 0 full, history 1
    empty and history 2 of two behaviors (H and L then default to 6 and 36). The first min(B, H)
    candidates point at histories 0, 1, ... in turn, so that every history is scored. Timestamps
    increase: the gaps are mostly within config.session_gap and one in five beyond it, so that a
    long history has several DSIN sessions. Every field is 0 at padding. distinct_items: no item
    id repeats within the batch's histories (ids 1 .. H*L, needs n_items > H*L).
    """
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        L = 36 if L is None else L
        lengths = torch.randint(1, L + 1, (H,), generator=g)
        lengths[0] = L
        lengths[1:2] = 0
        lengths[2:3] = min(2, L)
    lengths = torch.as_tensor(lengths)
    H = len(lengths)
    L = int(lengths.max()) if L is None else L
    mask = torch.arange(L)[None] < lengths[:, None]
    if distinct_items:
        assert config.n_items > H * L, "distinct_items needs n_items > H * L"
        items = torch.randperm(H * L, generator=g).view(H, L) + 1
    else:
        items = torch.randint(1, config.n_items, (H, L), generator=g)
    gap = config.session_gap
    gaps = torch.where(
        torch.rand(H, L, generator=g) < 0.2,
        torch.randint(gap + 1, 20 * gap, (H, L), generator=g),
        torch.randint(0, gap + 1, (H, L), generator=g),
    )
    gaps[:, 0] = 0
    hist_index = torch.randint(0, H, (B,), generator=g)
    hist_index[: min(B, H)] = torch.arange(min(B, H))
    return dict(
        hist_item=items * mask,
        hist_category=torch.randint(1, config.n_categories, (H, L), generator=g) * mask,
        hist_behavior=torch.randint(1, config.n_behavior_types, (H, L), generator=g) * mask,
        hist_mask=mask,
        hist_index=hist_index,
        cand_item=torch.randint(1, config.n_items, (B,), generator=g),
        cand_category=torch.randint(1, config.n_categories, (B,), generator=g),
        hist_timestamp=(BASE_TIME + gaps.cumsum(1)) * mask,
    )
