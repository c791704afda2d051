"""Stage 6 of a prep, writing: the samples of each split and the vocabularies, from DuckDB's tables into the
set's arrays (dmqn_core.data.prepared), streamed into memory-mapped files in batches. The behavior arrays
are written in stage 4 (samples), from the NumPy arrays they are sorted in."""

from __future__ import annotations

import numpy as np

from dmqn_core.data import prepared as fmt_out
from dmqn_core.data.prep.context import PrepContext
from dmqn_core.errors import DmqnError

EXPORT_CHUNK = 1 << 20


def write_set(ctx: PrepContext, behavior_names: list[str]) -> dict:
    """Write the samples and vocabularies into ``ctx.out`` (stage 4 wrote the behaviors); the counts
    meta.json records of the set."""
    # The last user's end offset is the number of behaviors.
    n_behaviors = int(np.load(ctx.out / "behaviors" / "user_offsets.npy", mmap_mode="r")[-1])
    samples, positives = _write_samples(ctx)
    n_items, n_categories = _write_vocabularies(ctx, behavior_names)
    return {
        "items": n_items,
        "categories": n_categories,
        "behavior_types": len(behavior_names),
        "behaviors": n_behaviors,
        "samples": samples,
        "positives": positives,
    }


def _write_samples(ctx: PrepContext) -> tuple[dict[str, int], dict[str, int]]:
    """Each split's positives and negatives, in (user, time, positive first, item) order; the samples and
    the positives of each split."""
    # Every split's counts from one scan of pos and one join of neg with it (not one of each per split).
    positives = {split: 0 for split in fmt_out.SPLITS}
    positives.update(ctx.con.execute("SELECT split, count(*) FROM pos GROUP BY split").fetchall())
    samples = dict(positives)
    for split, n_neg in ctx.con.execute(
        "SELECT p.split, count(*) FROM neg JOIN pos p USING (sid) GROUP BY p.split"
    ).fetchall():
        samples[split] += n_neg
    for split in fmt_out.SPLITS:
        _export(
            ctx,
            """
            SELECT u_idx, item, cat, label, hist_end, ts FROM (
                SELECT u_idx, item, cat, CAST(1 AS TINYINT) AS label, hist_end, ts FROM pos WHERE split = ?
                UNION ALL
                SELECT p.u_idx, n.i_idx, vi.c_idx, CAST(0 AS TINYINT), p.hist_end, p.ts
                FROM neg n JOIN pos p USING (sid) JOIN vi USING (i_idx) WHERE p.split = ?
            ) ORDER BY u_idx, ts, label DESC, item
            """,
            [split, split],
            samples[split],
            [(f"samples/{split}_{name}.npy", dtype) for name, dtype in fmt_out.SAMPLE_ARRAYS.items()],
        )
    return samples, positives


def _write_vocabularies(ctx: PrepContext, behavior_names: list[str]) -> tuple[int, int]:
    """The raw id of each index, each item's category and popularity, the behavior names; how many items
    and categories."""
    con = ctx.con
    vocab = {
        "user": con.execute("SELECT user_id FROM vu ORDER BY u_idx").fetchnumpy()["user_id"],
        "item": con.execute("SELECT item_id FROM vi ORDER BY i_idx").fetchnumpy()["item_id"],
        "category": con.execute("SELECT category_id FROM vc ORDER BY c_idx").fetchnumpy()["category_id"],
    }
    for name, values in vocab.items():
        fmt_out.save_array(ctx.out, f"vocab/{name}.npy", values, np.int64)
    items = con.execute("SELECT c_idx, pop FROM vi ORDER BY i_idx").fetchnumpy()
    fmt_out.save_array(ctx.out, "vocab/item_category.npy", np.concatenate([[0], items["c_idx"]]), np.int32)
    fmt_out.save_array(ctx.out, "vocab/item_popularity.npy", np.concatenate([[0], items["pop"]]), np.int64)
    fmt_out.write_json(ctx.out, "vocab/behavior.json", behavior_names)
    return len(vocab["item"]), len(vocab["category"])


def _export(ctx: PrepContext, sql: str, params: list, n_rows: int, targets: list[tuple[str, type]]) -> None:
    """Stream a query's columns into memory-mapped .npy files, one Arrow batch at a time."""
    writers = [fmt_out.open_array_writer(ctx.out, rel, dtype, n_rows) for rel, dtype in targets]
    start = 0
    reader = ctx.con.sql(sql, params=params).to_arrow_reader(EXPORT_CHUNK)
    for batch in reader:
        stop = start + batch.num_rows
        for writer, column in zip(writers, batch.columns):
            writer[start:stop] = column.to_numpy(zero_copy_only=False)
        start = stop
    if start != n_rows:
        raise DmqnError(f"internal error: exported {start} rows, expected {n_rows}")
    for writer in writers:
        writer.flush()
