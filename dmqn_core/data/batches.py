"""Mini-batches of prepared samples, padded only to the longest history they contain.

A prepared set stores each history as an end offset into one per-user behavior array
(see ``dmqn_core.data.prepared``). A batch gathers those slices from the memory-mapped arrays
and de-duplicates them: a positive and its negatives share one history, so the model
encodes it once (``hist_index`` maps each sample to its history row).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from dmqn_core.data.prepared import PreparedSet


@dataclass
class Batch:
    hist_item: torch.Tensor  # (H, L) long, 0 at padding
    hist_category: torch.Tensor  # (H, L) long
    hist_behavior: torch.Tensor  # (H, L) long
    hist_timestamp: torch.Tensor  # (H, L) long, unix seconds, 0 at padding
    hist_mask: torch.Tensor  # (H, L) bool, True at real behaviors; left-aligned, most recent last
    hist_index: torch.Tensor  # (B,) long, row of each sample's history
    cand_item: torch.Tensor  # (B,) long
    cand_category: torch.Tensor  # (B,) long
    label: torch.Tensor  # (B,) float
    user: np.ndarray  # (B,) user index, for GAUC
    sample: np.ndarray  # (B,) position of each sample in its split
    # (B,) long: the candidates' behaviors before the sample's time (PreparedSet.popularity_before), made
    # only for a model with match features (BatchLoader's popularity).
    cand_popularity: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.label)

    def to(self, device: torch.device | str) -> Batch:
        device = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if device.type != "cuda":
                return t.to(device)
            # A plain copy to a GPU waits for the GPU to finish the work queued before it; from pinned memory
            # the copy is queued like a kernel, and the host goes on preparing the next step meanwhile.
            return t.pin_memory().to(device, non_blocking=True)

        moved: dict[str, Any] = {
            f.name: move(getattr(self, f.name))
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return Batch(**moved)

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of every model's ``forward`` (cand_popularity None where not made)."""
        return {
            "hist_item": self.hist_item,
            "hist_category": self.hist_category,
            "hist_behavior": self.hist_behavior,
            "hist_timestamp": self.hist_timestamp,
            "hist_mask": self.hist_mask,
            "hist_index": self.hist_index,
            "cand_item": self.cand_item,
            "cand_category": self.cand_category,
            "cand_popularity": self.cand_popularity,
        }


def history_lengths(data: PreparedSet, users: np.ndarray, hist_ends: np.ndarray, max_len: int) -> np.ndarray:
    """(H,) int64 length of each history ``[max(user_start, end - max_len), end)``."""
    user_start = np.asarray(data.user_offsets[np.asarray(users, dtype=np.int64) - 1])
    ends = np.asarray(hist_ends, dtype=np.int64)
    return ends - np.maximum(user_start, ends - max_len)


def gather_histories(
    data: PreparedSet, users: np.ndarray, hist_ends: np.ndarray, max_len: int, width: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Item, category, behavior-type, timestamp and mask arrays (H, L) of the given histories.

    Each history is the behaviors ``[max(user_start, end - max_len), end)`` of its user,
    left-aligned and padded with 0 to the longest one, or to ``width`` if that is more.
    """
    ends = np.asarray(hist_ends, dtype=np.int64)
    lengths = history_lengths(data, users, ends, max_len)
    starts = ends - lengths
    width = max(int(lengths.max()) if len(lengths) else 0, width)
    positions = np.arange(width, dtype=np.int64)
    mask = positions[None, :] < lengths[:, None]  # (H, L)
    rows = np.where(mask, starts[:, None] + positions[None, :], 0)  # (H, L)
    # Sorted unique rows keep the memory-mapped reads sequential.
    flat, inverse = np.unique(rows[mask], return_inverse=True)
    out = []
    for column in (data.beh_item, data.beh_category, data.beh_behavior, data.beh_timestamp):
        values = np.zeros(rows.shape, dtype=np.int64)
        values[mask] = np.asarray(column[flat], dtype=np.int64)[inverse]
        out.append(values)
    return out[0], out[1], out[2], out[3], mask


class BatchLoader:
    """Cuts one split of a prepared set into batches of ``batch_size`` samples, one epoch at a time.

    ``epoch(n)`` plans epoch n's batches once and hands them over (EpochBatches): the training loop
    reads them, it never calls back into the loader. With ``shuffle`` the order changes with the
    epoch but stays a function of ``seed`` and the epoch, so runs are reproducible and a resumed run
    sees the same order. Samples that share a history (a positive and its negatives) stay next to
    each other. Iterating the loader itself yields epoch 0's batches (an unshuffled split's order).

    ``popularity``: batches carry the candidates' popularity before the sample's time, which match
    features read (its index costs one sort of the behaviors, so only such a model asks for it).

    ``shard=(rank, world_size)``: every rank cuts the same global batches (the batches of one
    process with the same seed and batch size) and takes its part of each one (``shard_of``).
    """

    def __init__(
        self,
        data: PreparedSet,
        split: str,
        batch_size: int,
        max_len: int,
        shuffle: bool = False,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        popularity: bool = False,
    ) -> None:
        self.data = data
        self.popularity = popularity
        self.samples = data.split(split)
        self.batch_size = batch_size
        self.max_len = max_len
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = shard
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"shard {shard}: the rank must be in [0, world_size)")
        # Group samples by history.
        ends = np.asarray(self.samples.hist_end)
        order = np.argsort(ends, kind="stable")
        boundaries = np.flatnonzero(np.diff(ends[order])) + 1
        self.groups = np.split(order, boundaries) if len(order) else []
        self.n_samples = int(sum(len(g) for g in self.groups))
        first = np.array([g[0] for g in self.groups], dtype=np.int64)
        if len(first):
            ends = np.asarray(self.samples.hist_end[first], dtype=np.int64)
            starts = np.asarray(data.user_offsets[np.asarray(self.samples.user[first], dtype=np.int64) - 1])
            self.group_length = np.minimum(ends - starts, max_len)
        else:
            self.group_length = np.zeros(0, dtype=np.int64)

    def epoch(self, epoch: int = 0) -> EpochBatches:
        """The batches of epoch ``epoch`` (its order when shuffled), planned once."""
        indices = self._batch_indices(epoch)
        return EpochBatches(self, indices, [self.shard_of(idx) for idx in indices])

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.epoch())

    def _batch_indices(self, epoch: int) -> list[np.ndarray]:
        """The sample indices of every global batch of ``epoch``, in order.

        Shuffled training batches are drawn from length buckets: the groups are shuffled, then
        sorted by history length inside windows of 50 batches, cut into batches, and the batches
        shuffled. Padding to the longest history of a batch then wastes little (histories of
        one log range from tens to thousands of behaviors) while batches stay random.
        """
        if not self.groups:
            return []
        if not self.shuffle:
            order = np.concatenate(self.groups)
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng = np.random.default_rng([self.seed, epoch])
        permutation = rng.permutation(len(self.groups))
        groups = [self.groups[i] for i in permutation]
        lengths = self.group_length[permutation]
        per_group = max(self.n_samples / len(groups), 1.0)
        window = max(int(50 * self.batch_size / per_group), 1)
        batches: list[np.ndarray] = []
        for begin in range(0, len(groups), window):
            chunk = range(begin, min(begin + window, len(groups)))
            by_length = begin + np.argsort(lengths[chunk.start : chunk.stop], kind="stable")
            order = np.concatenate([groups[i] for i in by_length])
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def shard_of(self, idx: np.ndarray) -> np.ndarray:
        """This rank's part of the global batch ``idx`` (all of it for one process); see ``shard_cuts``."""
        if self.world_size == 1:
            return idx
        bounds = [0, *shard_cuts(np.asarray(self.samples.hist_end[idx]), self.world_size), len(idx)]
        return idx[bounds[self.rank] : bounds[self.rank + 1]]

    def make_batch(self, idx: np.ndarray) -> Batch:
        s = self.samples
        users = np.asarray(s.user[idx], dtype=np.int64)
        ends = np.asarray(s.hist_end[idx], dtype=np.int64)
        unique_ends, first, hist_index = np.unique(ends, return_index=True, return_inverse=True)
        item, category, behavior, timestamp, mask = gather_histories(self.data, users[first], unique_ends, self.max_len)
        cand_item = np.asarray(s.item[idx], dtype=np.int64)
        popularity = self.data.popularity_before(cand_item, s.timestamp[idx]) if self.popularity else None
        return Batch(
            hist_item=torch.from_numpy(item),
            hist_category=torch.from_numpy(category),
            hist_behavior=torch.from_numpy(behavior),
            hist_timestamp=torch.from_numpy(timestamp),
            hist_mask=torch.from_numpy(mask),
            hist_index=torch.from_numpy(hist_index.astype(np.int64)),
            cand_item=torch.from_numpy(cand_item),
            cand_category=torch.from_numpy(np.asarray(s.category[idx], dtype=np.int64)),
            label=torch.from_numpy(np.asarray(s.label[idx], dtype=np.float32)),
            user=users,
            sample=np.asarray(idx, dtype=np.int64),
            cand_popularity=None if popularity is None else torch.from_numpy(popularity),
        )


@dataclass(frozen=True)
class EpochBatches:
    """One epoch's batches as a BatchLoader planned them, cut once: the global batches and this rank's parts.

    Iterating yields this rank's batches (the parts that are not empty); ``steps`` yields one item per
    global batch on every rank, as multi-process training needs.
    """

    loader: BatchLoader
    indices: list[np.ndarray]  # the sample indices of every global batch, in order
    parts: list[np.ndarray]  # this rank's part of each (all of it for one process)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Batch]:
        for part in self.parts:
            if len(part):
                yield self.loader.make_batch(part)

    def steps(self) -> Iterator[tuple[Batch, int, int]]:
        """One training step per global batch, on every rank: (this rank's batch, its samples, the global batch's).

        A rank whose part is empty (only a global batch smaller than the number of ranks, at the
        end of a length window) gets a stand-in, the global batch's first sample, counted as 0
        samples: it still runs the step, so it takes part in that step's gradient all-reduce,
        and its loss weight of 0 keeps the stand-in out of the gradient.
        """
        for idx, part in zip(self.indices, self.parts):
            if len(part):
                yield self.loader.make_batch(part), len(part), len(idx)
            else:
                yield self.loader.make_batch(idx[:1]), 0, len(idx)

    def sample_order(self) -> np.ndarray:
        """This rank's samples in the order iteration yields them."""
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)

    def positions(self) -> np.ndarray:
        """(n_samples,) each sample's place in one process's order of this epoch: what puts the ranks'
        parts back together."""
        position = np.empty(self.loader.n_samples, dtype=np.int64)
        begin = 0
        for idx in self.indices:
            position[idx] = np.arange(begin, begin + len(idx))
            begin += len(idx)
        return position


def shard_cuts(hist_ends: np.ndarray, world_size: int) -> list[int]:
    """Where one global batch is cut into ``world_size`` contiguous parts, one per rank.

    ``hist_ends`` are the batch's samples' history ends; the samples of one history (a positive
    and its negatives) are next to each other. Cut k aims at k·n/world_size and moves to the
    nearest history boundary when that lies after the previous cut and before the next aim, so
    that a history is encoded by one rank only. Parts then differ from equal shares by less than
    a group: 255 samples in groups of two over 2 ranks are split 128 + 127 or 127 + 128. Where
    no boundary qualifies (a group larger than a share) the cut stays at the aim, inside the
    group, whose history both ranks then encode. Every part is non-empty when the batch has at
    least ``world_size`` samples; a smaller batch leaves the last ranks empty.
    """
    n = len(hist_ends)
    boundaries = np.flatnonzero(np.diff(hist_ends)) + 1  # first sample of every group but the first
    aims = [-(-k * n // world_size) for k in range(world_size + 1)]  # ceil: the last ranks get the smaller parts
    cuts: list[int] = []
    previous = 0
    for k in range(1, world_size):
        cut = aims[k]
        if len(boundaries):
            nearest = int(boundaries[np.argmin(np.abs(boundaries - aims[k]))])
            if previous < nearest < aims[k + 1]:
                cut = nearest
        cut = max(cut, previous)
        cuts.append(cut)
        previous = cut
    return cuts
