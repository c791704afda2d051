"""A synthetic behavior log in the Taobao UserBehavior format, with the statistics of the real one.

The log has the five columns of the Taobao release (``user_id,item_id,category_id,
behavior_type,timestamp``, no header), behaviors ``pv``/``cart``/``fav``/``buy`` and timestamps
inside the Taobao window, 2017-11-25 00:00:00 to 2017-12-03 23:59:59 China time. Ids are sparse
integers drawn from the id ranges of the real release, so downstream code must remap them exactly
as it would for Taobao.

Two ways to build a log, one user model:

* ``tiny``, ``small``, ``medium``: the whole log from one random stream, in memory, sorted by
  (user id, timestamp), every row well-formed and inside the window. Their bytes are pinned.
* ``taobao`` (and any scale with ``block_users``): the full release's shape, about 100M rows.
  Users come in blocks, block b drawn from (seed, b) alone and written as soon as it is made,
  so memory stays bounded (a few hundred MB) and the bytes do not depend on how blocks are
  scheduled. Like the real file, users are listed by id sorted as text (1, 100, 1000, ...),
  then by time; a few rows carry a timestamp outside the window (up to 90 days before or
  after) and about one in a million is malformed (a line cut short, a lost id, behavior or
  timestamp), so ``dmqn prep``'s time filter and bad-row counting both have work to do.

The user model takes every statistic from the real Taobao sample (the constants below, each with
the command that measured it; `dmqn synth --compare` puts the two logs side by side). It was
chosen to reproduce the data, never tuned toward any model's result:

* **Catalog.** Items belong to categories and categories to topics, with Zipf-like popularity at
  each level; popular categories hold more items. The catalog is as large as the release's on
  every scale, so that a small log, like a small sample of the release, meets most items once.
* **History lengths** are drawn from the sample's per-user quantiles, scaled to the scale's
  ``mean_length`` (the long scale ``medium`` has four times the sample's histories).
* **Categories.** Each behavior stays in the category of the one before it (41 %), returns to a
  category the user met before, at a distance back drawn from a power law, or opens a category
  new to the user, less often the longer the history (Heaps' law). Real users mostly come back
  to what they browsed recently: the last click's category is in the last 50 behaviors for 71 %
  of the sample's users and only earlier for 4 %; on the long scales the returns from far back
  grow with the histories, as the power law of distances makes them.
* **Items.** A behavior that stays in or returns to a category re-visits an item the user met in
  it before as often as in the sample; otherwise it draws a popular item of the category.
* **Time.** Behaviors come in sessions whose sizes, gaps between behaviors and starting hours
  are drawn from the sample's; sessions start at random points of the window.
* **Behavior types** (pv, cart, fav, buy) are drawn independently in the sample's mix.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from time import perf_counter

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dmqn_core.errors import DmqnError
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.workspace import new_temporary_file

WINDOW_START = 1511539200  # 2017-11-25 00:00:00 China time (UTC+8)
WINDOW_END = 1512316800  # 2017-12-04 00:00:00 China time, exclusive
WINDOW = WINDOW_END - WINDOW_START

BEHAVIORS = ("pv", "cart", "fav", "buy")

# Id ranges of the Taobao UserBehavior release (largest user, item and category id + 1).
USER_ID_RANGE = 1_018_012
ITEM_ID_RANGE = 5_163_071
CATEGORY_ID_RANGE = 5_162_430

# The statistics of the real sample the user model draws from, as printed by
#   python -c "from dmqn_core.data.log_stats import generator_constants as g; \
#              [print(k, '=', v) for k, v in g('../shared/data/taobao_userbehavior_84k.csv').items()]"
# on taobao_userbehavior_84k.csv (815 users, 84,440 rows inside the window); see log_stats for their
# definitions. A test recomputes them when the sample is present.
BEHAVIOR_MIX = (0.8981, 0.05326, 0.0279, 0.02072)  # pv, cart, fav, buy
# Quantiles at QUANTILE_LEVELS: every 5 %, and the 99th percentile, so that the heavy tails (heavy
# users, long sessions) keep their shape; sampled by inverse CDF, linear between levels.
QUANTILE_LEVELS = (*(k / 20 for k in range(20)), 0.99, 1.0)
LENGTH_QUANTILES = (
    3.0, 15.0, 19.4, 26.0, 33.0, 39.5, 46.0, 54.0, 62.0, 69.0, 78.0,
    88.0, 96.0, 106.2, 123.0, 137.0, 156.0, 182.9, 226.0, 296.1, 431.0, 539.0,
)  # fmt: skip
SESSION_SIZE_QUANTILES = (
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0,
    3.0, 4.0, 5.0, 6.0, 7.0, 9.0, 11.0, 15.0, 22.0, 40.02, 130.0,
)  # fmt: skip
SESSION_GAP_QUANTILES = (  # seconds between the behaviors of a session
    0.0, 6.0, 10.0, 13.0, 17.0, 21.0, 26.0, 32.0, 38.0, 46.0, 54.0,
    65.0, 77.0, 92.0, 112.0, 138.0, 176.0, 235.0, 337.0, 591.0, 1360.0, 1797.0,
)  # fmt: skip
SESSION_START_BY_HOUR = (  # share of sessions starting in each hour of the day, China time
    0.0249, 0.01192, 0.005745, 0.004894, 0.003901, 0.007447, 0.01766, 0.02915,
    0.04064, 0.04766, 0.05447, 0.05582, 0.05412, 0.05901, 0.0522, 0.05844,
    0.05419, 0.05419, 0.05376, 0.06327, 0.07121, 0.07114, 0.06008, 0.04419,
)  # fmt: skip
SAME_CATEGORY = 0.4131  # P(a behavior is in the category of the one before it)
# P(new category | not the same as the one before, at position k from 0 of a history of n) =
# a * max(k, 1) ** -b * n ** -c: Heaps' law, and heavy users open fewer categories at a given k.
NEW_CATEGORY = (2.122, 0.2885, 0.1232)
RETURN_LAG_EXPONENT = 1.63  # P(a return goes back d behaviors) ~ d ** -exponent, d >= 2
# P(an item met before | same category as the one before, at position k) = a * k ** e, and the same
# for returns: (a, e) for each.
ITEM_REPEAT = ((0.1362, 0.1713), (0.3496, 0.01194))


@dataclass(frozen=True)
class SynthScale:
    """Size of a synthetic log; the user model's statistics are the module's constants."""

    n_users: int
    n_items: int
    n_categories: int
    n_topics: int
    mean_length: float  # mean behaviors per user: the sample's length quantiles are scaled to it
    max_length: int  # caps a user's history
    min_length: int = 1
    # Popularity exponents, chosen so that `small` matches the sample's concentration (the top 1 %
    # of items and of categories, the items met once; `dmqn synth --compare`), no model involved.
    zipf_exponent: float = 1.3  # of category popularity within a topic
    item_exponent: float = 0.7  # of item popularity within a category
    # Users per independently seeded block. None: the whole log comes from one random stream and
    # is built in memory (tiny, small, medium: their bytes are pinned). Otherwise block b is drawn
    # from (seed, b) alone, so it is written block by block in bounded memory, users in the real
    # release's order (ids sorted as text), with the two quirks below.
    block_users: int | None = None
    out_of_range_rate: float = 0.0  # share of rows whose timestamp lies outside the window
    malformed_rate: float = 0.0  # share of rows written garbled, one of MALFORMED_KINDS each


# The catalog of the full release: 4,162,024 items seen, 9,439 categories. It is larger than the
# items seen because the Zipf tail of big categories is never drawn.
RELEASE_CATALOG = {"n_items": 4_550_000, "n_categories": 9_439, "n_topics": 600}

SCALES: dict[str, SynthScale] = {
    # The sample's history lengths (mean 103.6 behaviors per user).
    "tiny": SynthScale(n_users=200, mean_length=103.6, max_length=1_000, **RELEASE_CATALOG),
    "small": SynthScale(n_users=1_500, mean_length=103.6, max_length=1_000, **RELEASE_CATALOG),
    # Long histories: four times the sample's.
    "medium": SynthScale(n_users=20_000, mean_length=414.4, max_length=4_000, **RELEASE_CATALOG),
    # The shape of the full UserBehavior release: 987,994 users and 100,150,807 rows (3.67 GB of
    # CSV), 101.4 behaviors per user. Out-of-range timestamps at about the samples' rate (35 rows in
    # 84,475; 1 in 4,321).
    "taobao": SynthScale(
        n_users=987_994,
        mean_length=101.4,
        max_length=3_000,
        min_length=10,
        block_users=8_192,
        out_of_range_rate=2e-4,
        malformed_rate=1e-6,
        **RELEASE_CATALOG,
    ),
}

# How the malformed rows of a blocked log are garbled; named after dmqn prep's reasons for skipping them.
MALFORMED_KINDS = ("bad_columns", "bad_id", "bad_behavior", "bad_timestamp")
# Out-of-range timestamps fall up to this far before or after the window.
OUT_OF_RANGE_SPREAD = 90 * 86_400


@dataclass(frozen=True)
class SynthSummary:
    rows: int  # lines written, malformed ones included
    users: int
    items: int
    categories: int
    path: Path
    malformed: int = 0
    out_of_range: int = 0


@dataclass(frozen=True)
class _Catalog:
    topic_weight: np.ndarray  # (n_topics,) popularity of each topic
    topic_categories: np.ndarray  # (n_topics, max per topic) categories by popularity, -1 pads
    topic_n_categories: np.ndarray  # (n_topics,)
    category_first_item: np.ndarray  # items are laid out by category, most popular first
    category_n_items: np.ndarray


def resolve_scale(scale: str | SynthScale) -> SynthScale:
    if isinstance(scale, SynthScale):
        return scale
    if scale not in SCALES:
        raise DmqnError(f"unknown scale {scale!r} (choose one of {', '.join(SCALES)})")
    return SCALES[scale]


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
    catalog = _make_catalog(cfg, rng)
    user, time, item = _user_events(cfg, catalog, cfg.n_users, rng)
    item_category = np.repeat(np.arange(cfg.n_categories), catalog.category_n_items)
    user_ids = 1 + np.sort(rng.choice(USER_ID_RANGE - 1, cfg.n_users, replace=False))
    item_ids = 1 + rng.choice(ITEM_ID_RANGE - 1, cfg.n_items, replace=False)
    category_ids = 1 + rng.choice(CATEGORY_ID_RANGE - 1, cfg.n_categories, replace=False)
    return {
        "user_id": user_ids[user].astype(np.int64),
        "item_id": item_ids[item].astype(np.int64),
        "category_id": category_ids[item_category[item]].astype(np.int64),
        "behavior_type": _behavior_types(len(user), rng),
        "timestamp": WINDOW_START + time.astype(np.int64),
    }


def _user_events(
    cfg: SynthScale, catalog: _Catalog, n_users: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The behaviors of ``n_users`` users (indices 0..n_users-1) as (user, seconds into the window,
    item index), sorted by (user, time)."""
    lengths = _user_lengths(cfg, n_users, rng)
    user = np.repeat(np.arange(n_users), lengths)
    chain = _category_chain(cfg, catalog, lengths, rng)
    item = _items(cfg, catalog, chain, rng)
    return user, _session_times(lengths, rng), item


def _behavior_types(n: int, rng: np.random.Generator) -> np.ndarray:
    mix = np.cumsum(BEHAVIOR_MIX)
    return np.searchsorted(mix, rng.random(n) * mix[-1], side="right").astype(np.int8)


def write_log(
    path: str | os.PathLike, scale: str | SynthScale = "small", seed: int = 0, progress: Progress | None = None
) -> SynthSummary:
    """Generate a log and write it as a headerless Taobao CSV, atomically.

    A blocked scale (``block_users`` set, e.g. ``taobao``) is generated and written one block
    of users at a time, so memory stays bounded whatever the number of rows; ``progress``
    counts its users.
    """
    cfg = resolve_scale(scale)
    path = Path(path).expanduser()
    if path.is_dir():
        raise DmqnError(f"{path} is a directory, expected a CSV file path")
    if not path.parent.is_dir():
        raise DmqnError(f"directory {path.parent} does not exist")
    progress = progress or NullProgress()
    try:
        fd, tmp = new_temporary_file(path)
    except OSError as exc:
        raise DmqnError(f"cannot write {path}: {exc}") from exc
    os.close(fd)  # DuckDB and pyarrow open it again by name, and only this process knows the name
    try:
        if cfg.block_users is None:
            summary = _write_in_memory(tmp, cfg, seed, progress)
        else:
            summary = _write_blocks(tmp, cfg, seed, progress)
        os.replace(tmp, path)
    except (OSError, duckdb.IOException) as exc:
        raise DmqnError(f"cannot write {path}: {exc}") from exc
    finally:
        progress.stop()
        tmp.unlink(missing_ok=True)
    return replace(summary, path=path.resolve())


def _write_in_memory(tmp: Path, cfg: SynthScale, seed: int, progress: Progress) -> SynthSummary:
    progress.start("generating the synthetic log", total=None)
    log = generate_log(cfg, seed)
    names = ", ".join(f"'{b}'" for b in BEHAVIORS)
    with duckdb.connect() as con:
        con.execute("SET enable_progress_bar = false")  # the CLI shows its own progress
        con.register("log", log)
        con.execute(
            f"COPY (SELECT user_id, item_id, category_id, [{names}][behavior_type + 1], timestamp "
            f"FROM log) TO '{_sql_string(tmp)}' (FORMAT csv, HEADER false)"
        )
    return SynthSummary(
        rows=len(log["user_id"]),
        users=_n_distinct(log["user_id"]),
        items=_n_distinct(log["item_id"]),
        categories=_n_distinct(log["category_id"]),
        path=tmp,
    )


def _write_blocks(tmp: Path, cfg: SynthScale, seed: int, progress: Progress) -> SynthSummary:
    log = BlockedLog(cfg, seed)
    seen_users = np.zeros(USER_ID_RANGE, dtype=bool)
    seen_items = np.zeros(ITEM_ID_RANGE, dtype=bool)
    seen_categories = np.zeros(CATEGORY_ID_RANGE, dtype=bool)
    rows = malformed = out_of_range = 0
    started = perf_counter()
    progress.start("generating the synthetic log (users)", total=cfg.n_users)
    # DuckDB's COPY writes a whole file at once; Arrow's CSV writer appends batch by batch, in
    # the same text format (no quotes: no field needs them).
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with (
        pa.OSFile(str(tmp), "wb") as sink,
        pacsv.CSVWriter(sink, _ARROW_SCHEMA, write_options=options) as writer,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        # Arrow formats and writes a block (without the GIL) while numpy generates the next one;
        # at most two blocks are held.
        writing: Future | None = None
        for index in range(log.n_blocks):
            block = log.block(index)
            if writing is not None:
                writing.result()
            writing = pool.submit(block.write, writer, sink)
            columns = block.columns
            seen_users[columns["user_id"]] = True
            seen_items[columns["item_id"]] = True
            seen_categories[columns["category_id"]] = True
            rows += len(columns["user_id"])
            malformed += len(block.malformed)
            out_of_range += block.out_of_range
            progress.advance(block.n_users, rows=rows, rows_per_s=rows / max(perf_counter() - started, 1e-9))
        if writing is not None:
            writing.result()
    return SynthSummary(
        rows=rows,
        users=int(seen_users.sum()),
        items=int(seen_items.sum()),
        categories=int(seen_categories.sum()),
        path=tmp,
        malformed=malformed,
        out_of_range=out_of_range,
    )


_ARROW_SCHEMA = pa.schema(
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
            schema=_ARROW_SCHEMA,
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
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        # The catalog and its ids come first, so scales differing only in n_users share them.
        self.catalog = _make_catalog(cfg, rng)
        self.item_ids = 1 + rng.choice(ITEM_ID_RANGE - 1, cfg.n_items, replace=False)
        self.category_ids = 1 + rng.choice(CATEGORY_ID_RANGE - 1, cfg.n_categories, replace=False)
        user_ids = 1 + np.sort(rng.choice(USER_ID_RANGE - 1, cfg.n_users, replace=False))
        # The release lists its users by id sorted as text: 1, 100, 1000, 1000001, ...
        self.user_ids = user_ids[np.argsort(user_ids.astype(str), kind="stable")]
        self.item_category = np.repeat(np.arange(cfg.n_categories), self.catalog.category_n_items)
        self.n_blocks = -(-cfg.n_users // cfg.block_users)

    def block(self, index: int) -> LogBlock:
        cfg = self.cfg
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} of {self.n_blocks}")
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, index)))
        users = self.user_ids[index * cfg.block_users : (index + 1) * cfg.block_users]
        user, time, item = _user_events(cfg, self.catalog, len(users), rng)
        behavior = _behavior_types(len(user), rng)
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


def _sql_string(path: Path) -> str:
    return str(path).replace("'", "''")


def _n_distinct(ids: np.ndarray) -> int:
    # Ids are below a few million: a bitmap is far faster than np.unique on millions of rows.
    seen = np.zeros(int(ids.max()) + 1, dtype=bool)
    seen[ids] = True
    return int(seen.sum())


# ---------------------------------------------------------------------------------------------
# catalog and users


def _zipf_rank(n: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """A rank in [0, n) per entry of n, P(rank r) roughly proportional to (r + 1) ** -exponent."""
    u = rng.random(np.shape(n))
    # Inverse CDF of the continuous density x ** -exponent on [1, n + 1].
    top = (np.asarray(n, dtype=np.float64) + 1.0) ** (1.0 - exponent)
    x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - exponent))
    return np.minimum(x.astype(np.int64) - 1, np.asarray(n) - 1)


def _make_catalog(cfg: SynthScale, rng: np.random.Generator) -> _Catalog:
    if cfg.n_categories < cfg.n_topics:
        raise DmqnError("every topic needs a category: n_categories must be at least n_topics")
    if cfg.n_items < cfg.n_categories:
        raise DmqnError("every category needs at least one item")

    topic_weight = np.arange(1, cfg.n_topics + 1) ** -_TOPIC_EXPONENT
    topic_weight /= topic_weight.sum()
    topic_n = 1 + rng.multinomial(cfg.n_categories - cfg.n_topics, rng.dirichlet(np.full(cfg.n_topics, 2.0)))
    # Categories are numbered topic by topic, most popular first within each topic.
    first = np.concatenate([[0], np.cumsum(topic_n)[:-1]])
    rank_in_topic = np.arange(cfg.n_categories) - np.repeat(first, topic_n)
    width = topic_n.max()
    topic_categories = np.full((cfg.n_topics, width), -1, dtype=np.int64)
    topic_categories[np.repeat(np.arange(cfg.n_topics), topic_n), rank_in_topic] = np.arange(cfg.n_categories)

    # Popular categories (popular topic, high rank) hold more items.
    category_weight = np.repeat(topic_weight, topic_n) * (rank_in_topic + 1.0) ** -cfg.zipf_exponent
    category_n = 1 + rng.multinomial(cfg.n_items - cfg.n_categories, category_weight / category_weight.sum())
    return _Catalog(
        topic_weight=topic_weight,
        topic_categories=topic_categories,
        topic_n_categories=topic_n,
        category_first_item=np.concatenate([[0], np.cumsum(category_n)[:-1]]),
        category_n_items=category_n,
    )


def _popular_item(cfg: SynthScale, catalog: _Catalog, category: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rank = _zipf_rank(catalog.category_n_items[category], cfg.item_exponent, rng)
    return catalog.category_first_item[category] + rank


def _popular_category(cfg: SynthScale, catalog: _Catalog, n: int, rng: np.random.Generator) -> np.ndarray:
    topic = rng.choice(cfg.n_topics, size=n, p=catalog.topic_weight)
    rank = _zipf_rank(catalog.topic_n_categories[topic], cfg.zipf_exponent, rng)
    return catalog.topic_categories[topic, rank]


def _from_quantiles(table: tuple[float, ...], n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws from the distribution with these quantiles at QUANTILE_LEVELS (linear in between)."""
    return np.interp(rng.random(n), QUANTILE_LEVELS, table)


def _quantile_mean(table: tuple[float, ...]) -> float:
    """The mean of _from_quantiles' distribution."""
    levels, values = np.asarray(QUANTILE_LEVELS), np.asarray(table)
    return float(np.sum(np.diff(levels) * (values[1:] + values[:-1]) / 2))


def _user_lengths(cfg: SynthScale, n_users: int, rng: np.random.Generator) -> np.ndarray:
    raw = _from_quantiles(LENGTH_QUANTILES, n_users, rng) * (cfg.mean_length / _quantile_mean(LENGTH_QUANTILES))
    return np.clip(np.round(raw), cfg.min_length, cfg.max_length).astype(np.int64)


def _activity_clock(activity_time: np.ndarray) -> np.ndarray:
    """Map evenly spread activity time (seconds) to wall-clock seconds with the sample's daily rhythm."""
    hours = WINDOW // 3600
    per_hour = np.resize(SESSION_START_BY_HOUR, hours)
    cdf = np.concatenate([[0.0], np.cumsum(per_hour)]) / per_hour.sum() * WINDOW
    return np.interp(activity_time, cdf, np.arange(hours + 1) * 3600.0)


def _segment_offsets(sizes: np.ndarray) -> np.ndarray:
    """Position of every element inside its segment, for segments of the given sizes laid end to end."""
    starts = np.cumsum(sizes) - sizes
    return np.arange(sizes.sum()) - np.repeat(starts, sizes)


def _segment_cumsum(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarted at every segment."""
    cum = np.cumsum(values)
    first = np.cumsum(sizes) - sizes
    return cum - np.repeat(cum[first] - values[first], sizes)


# ---------------------------------------------------------------------------------------------
# the sequence of each user: categories, items, times


@dataclass(frozen=True)
class _Chain:
    category: np.ndarray  # per behavior
    same: np.ndarray  # stays in the category of the behavior before it
    opened: np.ndarray  # opens a category new to the user
    opener: np.ndarray  # the behavior that opened this behavior's category (itself if it did)
    position: np.ndarray  # in the user's history, from 0


def _category_chain(cfg: SynthScale, catalog: _Catalog, lengths: np.ndarray, rng: np.random.Generator) -> _Chain:
    """Each behavior stays in the category before it, returns to one met d >= 2 behaviors back, or
    opens a new one (module docstring)."""
    position = _segment_offsets(lengths)
    n = len(position)
    same = (position > 0) & (rng.random(n) < SAME_CATEGORY)
    a, b, c = NEW_CATEGORY
    p_new = np.minimum(1.0, a * np.maximum(position, 1) ** -b * np.repeat(lengths, lengths) ** -c)
    # A return needs a distance of at least 2: the second behavior stays or opens a category.
    opened = ~same & ((position < 2) | (rng.random(n) < p_new))
    back = np.flatnonzero(~same & ~opened)
    source = np.arange(n)
    source[same] -= 1
    source[back] -= _power_law_distance(position[back], RETURN_LAG_EXPONENT, rng)
    opener = _follow(source)
    # A return lands on a category other than the one before it (landing on that one would be
    # staying, counted in SAME_CATEGORY already): redraw the distance of those that did. The few
    # that cannot (the third behavior after two in one category) stay.
    for strict in [True] * _REDRAWS + [False] * _REDRAWS:
        if strict:
            clash = back[_next_occurrence(opener)[source[back]] < back]
        else:
            clash = back[opener[back] == opener[back - 1]]
        if not len(clash):
            continue
        source[clash] = clash - _power_law_distance(position[clash], RETURN_LAG_EXPONENT, rng)
        opener = _follow(source)
    return _Chain(_opened_categories(cfg, catalog, opened, position, rng)[opener], same, opened, opener, position)


_TOPIC_EXPONENT = 1.2  # of topic popularity, chosen with zipf_exponent (SynthScale)

# Rounds of redrawing a return's distance or an opened category that broke the rule; each round
# leaves a small fraction of the last one.
_REDRAWS = 4


def _follow(source: np.ndarray) -> np.ndarray:
    """The end of each chain of ``source`` links (rows linking to themselves end one), by pointer
    doubling: log2(longest chain) passes over the array instead of a Python loop per behavior."""
    end = source
    while True:
        further = end[end]
        if np.array_equal(further, end):
            return end
        end = further


def _next_occurrence(opener: np.ndarray) -> np.ndarray:
    """Per row, the next row with the same opener (len(opener) if none)."""
    order = np.argsort(opener, kind="stable")
    later = np.full(len(opener), len(opener))
    same = opener[order[1:]] == opener[order[:-1]]
    later[order[:-1][same]] = order[1:][same]
    return later


def _opened_categories(
    cfg: SynthScale, catalog: _Catalog, opened: np.ndarray, position: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A popular category for every behavior that opens one, new to its user: a draw the user met
    before is redrawn, so that different openers of a user have different categories."""
    rows = np.flatnonzero(opened)
    user_first = rows - position[rows]  # the user's first row identifies the user
    category = np.zeros(len(opened), dtype=np.int64)
    category[rows] = _popular_category(cfg, catalog, len(rows), rng)
    for _ in range(_REDRAWS):
        order = np.lexsort((position[rows], category[rows], user_first))
        met = np.r_[False, (np.diff(user_first[order]) == 0) & (np.diff(category[rows][order]) == 0)]
        again = rows[order[met]]
        if not len(again):
            break
        category[again] = _popular_category(cfg, catalog, len(again), rng)
    return category


def _power_law_distance(longest: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Per entry, an integer d in [2, longest] with P(d) roughly proportional to d ** -exponent."""
    # Inverse CDF of the continuous density x ** -exponent on [2, longest + 1).
    low, high = 2.0 ** (1.0 - exponent), (longest + 1.0) ** (1.0 - exponent)
    x = (low + rng.random(len(longest)) * (high - low)) ** (1.0 / (1.0 - exponent))
    return np.minimum(x.astype(np.int64), longest)


def _items(cfg: SynthScale, catalog: _Catalog, chain: _Chain, rng: np.random.Generator) -> np.ndarray:
    """A popular item of each behavior's category, or (as often as in the sample) an item the user
    met before in it."""
    item = _popular_item(cfg, catalog, chain.category, rng)
    (same_a, same_e), (return_a, return_e) = ITEM_REPEAT
    k = np.maximum(chain.position, 1)
    prob = np.where(
        chain.opened, 0.0, np.minimum(1.0, np.where(chain.same, same_a * k**same_e, return_a * k**return_e))
    )
    return _revisit_items(chain.opener, item, prob, rng)


def _revisit_items(group: np.ndarray, item: np.ndarray, prob: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace, with probability ``prob``, an item by one met earlier in the same group.

    Rows come in history order within a group, so a stable sort by group keeps that order.
    """
    order = np.argsort(group, kind="stable")
    sizes = np.bincount(group, minlength=group.max() + 1)
    pos = _segment_offsets(sizes)
    # The first behavior of a group is always fresh, so every revisit has a candidate.
    revisit = (pos > 0) & (rng.random(len(order)) < prob[order])
    fresh_rank = np.cumsum(~revisit) - ~revisit  # fresh behaviors strictly before each one
    group_first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    n_candidates = fresh_rank - fresh_rank[group_first]
    choice = fresh_rank[group_first] + (rng.random(len(order)) * n_candidates).astype(np.int64)
    sorted_item = item[order]
    sorted_item[revisit] = sorted_item[np.flatnonzero(~revisit)[choice[revisit]]]
    out = np.empty_like(item)
    out[order] = sorted_item
    return out


def _session_times(lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seconds into the window of every behavior, in sessions of the sample's sizes and gaps that
    start at random points of the window; non-decreasing within each user."""
    n_users = len(lengths)
    # Twice the expected number of sessions, plus a margin: a user who still runs out (a vanishing
    # few) has a longer last session.
    n_drawn = np.ceil(2 * lengths / _quantile_mean(SESSION_SIZE_QUANTILES)).astype(np.int64) + 8
    drawn = np.maximum(np.round(_from_quantiles(SESSION_SIZE_QUANTILES, int(n_drawn.sum()), rng)), 1)
    first_row = _segment_cumsum(drawn.astype(np.int64), n_drawn) - drawn.astype(np.int64)
    used = first_row < np.repeat(lengths, n_drawn)
    n_sessions = np.add.reduceat(used, np.cumsum(n_drawn) - n_drawn).astype(np.int64)
    starts = np.zeros(int(lengths.sum()), dtype=bool)
    starts[np.repeat(np.cumsum(lengths) - lengths, n_sessions) + first_row[used]] = True
    session = np.cumsum(starts) - 1

    # The sessions' starts are the order statistics of uniform points in the window: cumulative
    # exponential spacings, normalised by each user's total (one spacing more than sessions).
    spacing = rng.exponential(size=int(n_sessions.sum()) + n_users)
    cum = _segment_cumsum(spacing, n_sessions + 1)
    total = cum[np.cumsum(n_sessions + 1) - 1]
    keep = _segment_offsets(n_sessions + 1) < np.repeat(n_sessions, n_sessions + 1)
    start = _activity_clock(cum[keep] / np.repeat(total, n_sessions + 1)[keep] * WINDOW)

    gap = _from_quantiles(SESSION_GAP_QUANTILES, len(starts), rng)
    gap[starts] = 0.0
    time = np.minimum(start[session] + _segment_cumsum(gap, np.bincount(session)), WINDOW - 1)
    # A session that runs into the next one's start pushes it later: times never go back.
    offset = np.repeat(np.arange(n_users) * 2.0 * WINDOW, lengths)
    return np.maximum.accumulate(time + offset) - offset
