import numpy as np

from dmqn_core.batches import BatchLoader
from dmqn_core.prepared import PreparedSet


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
            assert mask[:length].all() and not mask[length:].any()      # left-aligned
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
    batch = next(iter(BatchLoader(data, "valid", batch_size=1000, max_len=100)))
    # neg_ratio 1: every history is used by exactly two samples.
    assert batch.hist_item.shape[0] * 2 == len(batch)
    assert np.bincount(batch.hist_index.numpy()).tolist() == [2] * batch.hist_item.shape[0]


def test_shuffle_is_a_function_of_seed_and_epoch(tiny_workspace):
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    a = BatchLoader(data, "train", 32, 50, shuffle=True, seed=1)
    b = BatchLoader(data, "train", 32, 50, shuffle=True, seed=1)
    assert np.array_equal(a.sample_order(), b.sample_order())
    a.set_epoch(1)
    assert not np.array_equal(a.sample_order(), b.sample_order())
    assert sorted(a.sample_order()) == list(range(len(data.split("train"))))


def test_shards_partition_the_samples(tiny_workspace):
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    parts = [BatchLoader(data, "train", 32, 50, shard=(r, 2)).sample_order() for r in range(2)]
    assert sorted(np.concatenate(parts)) == list(range(len(data.split("train"))))
