"""A synthetic log as columns (``generate_log``), and the blocked logs of the large scales: block b of users
drawn from (seed, b) alone, with its stray timestamps and malformed rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dmqn_core.data.synth.scales import (
    BEHAVIORS,
    CATEGORY_ID_RANGE,
    ITEM_ID_RANGE,
    MALFORMED_KINDS,
    OUT_OF_RANGE_SPREAD,
    USER_ID_RANGE,
    WINDOW,
    WINDOW_END,
    WINDOW_START,
    SynthScale,
    resolve_scale,
)
from dmqn_core.data.synth.users import make_catalog, user_events
from dmqn_core.errors import DmqnError


def generate_log(scale: str | SynthScale, seed: int = 0) -> dict[str, np.ndarray]:
    """Generate a log as columns in file order; behavior_type holds codes into BEHAVIORS.

    For a blocked scale, the concatenated blocks: users in text order of their ids, stray
    timestamps included; its malformed rows exist only as text, in the CSV (see LogBlock).
    """
    cfg = resolve_scale(scale)
    if cfg.block_users is not None:
        log = BlockedLog(cfg, seed)
        blocks = [log.block(index).columns for index in range(log.n_blocks)]
        return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
    rng = np.random.default_rng(seed)
    catalog = make_catalog(cfg, rng)
    user, time, item, behavior = user_events(cfg, catalog, cfg.n_users, rng)
    item_category = np.repeat(np.arange(cfg.n_categories), catalog.category_n_items)
    user_ids = 1 + np.sort(rng.choice(USER_ID_RANGE - 1, cfg.n_users, replace=False))
    item_ids = 1 + rng.choice(ITEM_ID_RANGE - 1, cfg.n_items, replace=False)
    category_ids = 1 + rng.choice(CATEGORY_ID_RANGE - 1, cfg.n_categories, replace=False)
    return {
        "user_id": user_ids[user].astype(np.int64),
        "item_id": item_ids[item].astype(np.int64),
        "category_id": category_ids[item_category[item]].astype(np.int64),
        "behavior_type": behavior,
        "timestamp": WINDOW_START + time.astype(np.int64),
    }


ARROW_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("category_id", pa.int64()),
        ("behavior_type", pa.dictionary(pa.int8(), pa.string())),
        ("timestamp", pa.int64()),
    ]
)


@dataclass(frozen=True)
class LogBlock:
    """The rows of one block of users of a blocked log, in file order."""

    columns: dict[str, np.ndarray]  # as generate_log returns them
    malformed: np.ndarray  # ascending positions of the rows written garbled
    malformed_kind: np.ndarray  # per malformed row, an index into MALFORMED_KINDS
    n_users: int

    @property
    def out_of_range(self) -> int:
        """Rows whose timestamp lies outside the window (none of them is garbled)."""
        ts = self.columns["timestamp"]
        return int(np.count_nonzero((ts < WINDOW_START) | (ts >= WINDOW_END)))

    def write(self, writer: pacsv.CSVWriter, sink: pa.NativeFile) -> None:
        """Append the block's lines: Arrow writes the clean runs, the garbled lines go in between."""
        c = self.columns
        table = pa.table(
            {
                "user_id": c["user_id"],
                "item_id": c["item_id"],
                "category_id": c["category_id"],
                "behavior_type": pa.DictionaryArray.from_arrays(c["behavior_type"], _BEHAVIOR_NAMES),
                "timestamp": c["timestamp"],
            },
            schema=ARROW_SCHEMA,
        )
        start = 0
        for row, kind in zip(self.malformed.tolist(), self.malformed_kind.tolist()):
            writer.write_table(table.slice(start, row - start))
            sink.write(self._garbled_line(row, MALFORMED_KINDS[kind]))
            start = row + 1
        writer.write_table(table.slice(start))

    def _garbled_line(self, row: int, kind: str) -> bytes:
        c = self.columns
        fields = [
            str(c["user_id"][row]),
            str(c["item_id"][row]),
            str(c["category_id"][row]),
            BEHAVIORS[c["behavior_type"][row]],
            str(c["timestamp"][row]),
        ]
        if kind == "bad_columns":
            fields = fields[:4]  # a line cut short
        else:
            fields[{"bad_id": 1, "bad_behavior": 3, "bad_timestamp": 4}[kind]] = ""  # a field lost
        return (",".join(fields) + "\n").encode()


_BEHAVIOR_NAMES = pa.array(BEHAVIORS)


class BlockedLog:
    """A log generated one block of users at a time (scales with ``block_users``).

    The catalog and the id mappings come from the stream (seed, 0); block b from the stream
    (seed, 1, b) alone, so a block's rows do not depend on which other blocks are generated, nor
    in which order. The same user model as the in-memory scales, applied block by block.
    """

    def __init__(self, scale: str | SynthScale, seed: int = 0) -> None:
        cfg = resolve_scale(scale)
        if cfg.block_users is None or cfg.block_users < 1:
            raise DmqnError("a blocked log needs a scale with block_users >= 1")
        self.cfg, self.seed = cfg, seed
        self.block_users: int = cfg.block_users  # checked above: set
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        # The catalog and its ids come first, so scales differing only in n_users share them.
        self.catalog = make_catalog(cfg, rng)
        self.item_ids = 1 + rng.choice(ITEM_ID_RANGE - 1, cfg.n_items, replace=False)
        self.category_ids = 1 + rng.choice(CATEGORY_ID_RANGE - 1, cfg.n_categories, replace=False)
        user_ids = 1 + np.sort(rng.choice(USER_ID_RANGE - 1, cfg.n_users, replace=False))
        # The release lists its users by id sorted as text: 1, 100, 1000, 1000001, ...
        self.user_ids = user_ids[np.argsort(user_ids.astype(str), kind="stable")]
        self.item_category = np.repeat(np.arange(cfg.n_categories), self.catalog.category_n_items)
        self.n_blocks = -(-cfg.n_users // self.block_users)

    def block(self, index: int) -> LogBlock:
        cfg = self.cfg
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} of {self.n_blocks}")
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, index)))
        users = self.user_ids[index * self.block_users : (index + 1) * self.block_users]
        user, time, item, behavior = user_events(cfg, self.catalog, len(users), rng)
        timestamp = WINDOW_START + time.astype(np.int64)

        n_out = rng.binomial(len(user), cfg.out_of_range_rate)
        if n_out:
            rows = rng.choice(len(user), n_out, replace=False)
            offset = rng.integers(0, OUT_OF_RANGE_SPREAD, n_out)
            timestamp[rows] = np.where(rng.random(n_out) < 0.5, WINDOW_START - 1 - offset, WINDOW_END + offset)
            # The release is sorted by time within each user, stray timestamps included.
            lowest = WINDOW_START - OUT_OF_RANGE_SPREAD
            span = WINDOW + 2 * OUT_OF_RANGE_SPREAD
            order = np.argsort(user * span + (timestamp - lowest), kind="stable")
            user, item, behavior, timestamp = user[order], item[order], behavior[order], timestamp[order]

        inside = np.flatnonzero((timestamp >= WINDOW_START) & (timestamp < WINDOW_END))
        n_bad = rng.binomial(len(inside), cfg.malformed_rate)
        malformed = np.sort(rng.choice(inside, n_bad, replace=False))
        columns = {
            "user_id": users[user].astype(np.int64),
            "item_id": self.item_ids[item].astype(np.int64),
            "category_id": self.category_ids[self.item_category[item]].astype(np.int64),
            "behavior_type": behavior,
            "timestamp": timestamp,
        }
        return LogBlock(columns, malformed, rng.integers(0, len(MALFORMED_KINDS), n_bad), len(users))
