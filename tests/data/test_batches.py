import numpy as np

from dmqn_core.data.batches import BatchLoader
from dmqn_core.data.prepared import PreparedSet


def test_batches_hold_each_samples_history_left_aligned(tiny_workspace):
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    max_len = 30
    loader = BatchLoader(data, "train", batch_size=64, max_len=max_len)
    split = data.split("train")
    seen = 0
    for batch in loader:
        hist_index = batch.hist_index.numpy()
        for b in range(len(batch)):
            h = hist_index[b]
            mask = batch.hist_mask[h].numpy()
            length = int(mask.sum())
            assert mask[:length].all() and not mask[length:].any()  # left-aligned
            items = batch.hist_item[h].numpy()
            assert (items[length:] == 0).all()
            # The same history as the reference slice of that user's behaviors.
            sample = batch.sample[b]
            assert split.item[sample] == batch.cand_item[b] and split.user[sample] == batch.user[b]
            end = int(split.hist_end[sample])
            start = max(int(data.user_offsets[batch.user[b] - 1]), end - max_len)
            assert np.array_equal(items[:length], np.asarray(data.beh_item[start:end]))
            assert np.array_equal(batch.hist_category[h, :length].numpy(), np.asarray(data.beh_category[start:end]))
            assert np.array_equal(batch.hist_behavior[h, :length].numpy(), np.asarray(data.beh_behavior[start:end]))
        seen += len(batch)
        # Padded only to the longest history in the batch.
        assert batch.hist_mask.sum(1).max() == batch.hist_mask.shape[1]
    assert seen == len(split)


def test_positive_and_negative_share_one_history_row(tiny_workspace):
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    batch = next(iter(BatchLoader(data, "test", batch_size=1000, max_len=100)))
    # neg_ratio 1 and one test target per user: every history is used by exactly two samples.
    assert batch.hist_item.shape[0] * 2 == len(batch)
    assert np.bincount(batch.hist_index.numpy()).tolist() == [2] * batch.hist_item.shape[0]


def test_shuffle_is_a_function_of_seed_and_epoch(tiny_workspace):
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    a = BatchLoader(data, "train", 32, 50, shuffle=True, seed=1)
    b = BatchLoader(data, "train", 32, 50, shuffle=True, seed=1)
    assert np.array_equal(a.epoch(1).sample_order(), b.epoch(1).sample_order())
    assert not np.array_equal(a.epoch(1).sample_order(), b.epoch(0).sample_order())
    assert sorted(a.epoch(1).sample_order()) == list(range(len(data.split("train"))))


def test_shards_partition_the_samples(tiny_workspace):
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    parts = [BatchLoader(data, "train", 32, 50, shard=(r, 2)).epoch().sample_order() for r in range(2)]
    assert sorted(np.concatenate(parts)) == list(range(len(data.split("train"))))


def test_shard_cuts_follow_history_groups_and_leave_no_rank_empty():
    from dmqn_core.data.batches import shard_cuts

    pairs = np.repeat(np.arange(100), 2)  # a positive and a negative per history
    assert shard_cuts(pairs, 2) == [100]
    assert shard_cuts(pairs[1:], 2) == [99]  # 199 samples: 99 + 100, no history split
    assert shard_cuts(pairs, 3) == [66, 134]
    for n in range(3, 20):  # parts are non-empty whenever n >= world
        for world in range(2, n + 1):
            bounds = [0, *shard_cuts(pairs[:n], world), n]
            assert all(a < b for a, b in zip(bounds, bounds[1:])), (n, world, bounds)
    one_group = np.full(6, 7)
    assert shard_cuts(one_group, 2) == [3]  # a group larger than a share is cut


def test_ranks_split_the_one_process_batches(tiny_workspace):
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    one = BatchLoader(data, "train", 64, 50, shuffle=True, seed=3)
    ranks = [BatchLoader(data, "train", 64, 50, shuffle=True, seed=3, shard=(r, 2)) for r in range(2)]
    steps = [list(loader.epoch(2).steps()) for loader in ranks]
    assert len(steps[0]) == len(steps[1]) == len(one.epoch(2))  # every rank takes every step
    ends = data.split("train").hist_end
    for batch, (first, n0, total0), (second, n1, total1) in zip(one.epoch(2).indices, *steps):
        assert total0 == total1 == len(batch) == n0 + n1 and n0 > 0 and n1 > 0
        assert np.array_equal(np.concatenate([first.sample, second.sample]), batch)
        # No history is encoded by both ranks.
        assert not set(np.asarray(ends[first.sample]).tolist()) & set(np.asarray(ends[second.sample]).tolist())
    assert sorted(np.concatenate([r.epoch(2).sample_order() for r in ranks])) == list(range(len(data.split("train"))))
    # Each sample's place in one process's order, which puts the ranks' parts back together.
    order = one.epoch(2).sample_order()
    assert np.array_equal(one.epoch(2).positions()[order], np.arange(len(order)))


def test_a_rank_without_samples_gets_a_stand_in_step(tiny_workspace):
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    # A batch of 3 samples over 4 ranks: rank 3 has none but still steps, counted as 0 samples.
    loaders = [BatchLoader(data, "valid", 3, 50, shard=(r, 4)) for r in range(4)]
    first_steps = [next(loader.epoch().steps()) for loader in loaders]
    assert [n for _, n, _ in first_steps] == [1, 1, 1, 0]
    assert all(total == 3 for _, _, total in first_steps)
    assert all(len(batch) == 1 for batch, _, _ in first_steps)
