"""A synthetic behavior log in the Taobao UserBehavior format, with long-range interest structure.

The log has the five columns of the Taobao release (``user_id,item_id,category_id,
behavior_type,timestamp``, no header), behaviors ``pv``/``cart``/``fav``/``buy`` in roughly
Taobao's mix (89 / 5.5 / 3 / 2 %) and timestamps inside the Taobao window, 2017-11-25
00:00:00 to 2017-12-03 23:59:59 China time. Ids are sparse integers drawn from the id ranges
of the real release, so downstream code must remap them exactly as it would for Taobao.

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

How it is generated, and why:

* **Catalog.** Items belong to categories and categories to interest topics. Item popularity
  within a category and category popularity within a topic are Zipf-like; topics themselves
  are Zipf-popular, and popular categories hold more items.
* **Long-term interests** (about 55 % of the behaviors). Each user holds 7 to 11 interests: a
  topic together with a user-specific subset of 3 or 4 of its categories. Each interest is
  revisited quasi-periodically with its own period: a stationary renewal process with gamma
  gaps around the period, which follows from the interest's random share of the user's
  attention (5 to 95 % of periods: 10 hours to 5 days on ``small``, down to a couple of hours
  for heavy users). Each visit is a mini-burst of 1 to 3 behaviors a minute or two apart; the
  user works through the interest's categories in turn, so a category comes back about every
  3 or 4 visits of its interest. Now and then (15 %) a behavior returns to an item the user
  met before in that category.
* **Sessions** (about 40 %). Short-lived themes: bursts of 5 to 20 behaviors within minutes on
  a topic that is not one of the user's long-term interests. They crowd the recent past.
* **Exploration noise** (about 5 %). Popular items from anywhere in the catalog; it also tops
  up the lightest users to ``min_length`` behaviors (30; 10 on ``taobao``).
* **Daily rhythm.** Visits, sessions and noise follow a day/night activity profile.

The point of this structure: a user spreads long-term attention over some 30 categories, each
coming back only every 50 or so behaviors, while sessions fill the recent past. For about a
third of the users the category of the last click is missing from the last 50 behaviors but
present before them (and for nearly 9 in 10 it occurs somewhere in the history), so models that
read the whole history (DMQN, DIN over the full sequence) can predict what models restricted to
the recent past (DIN on the last 50) cannot.
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
BEHAVIOR_MIX = (0.895, 0.055, 0.03, 0.02)

# Id ranges of the Taobao UserBehavior release (largest user, item and category id + 1).
USER_ID_RANGE = 1_018_012
ITEM_ID_RANGE = 5_163_071
CATEGORY_ID_RANGE = 5_162_430

# Relative activity per hour of the day, China time: quiet nights, busy evenings.
HOURLY_ACTIVITY = np.array(
    [
        0.5,
        0.3,
        0.2,
        0.15,
        0.15,
        0.2,
        0.4,
        0.7,
        0.9,
        1.0,
        1.0,
        1.0,
        1.1,
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
        1.1,
        1.3,
        1.5,
        1.6,
        1.4,
        0.9,
    ]
)


@dataclass(frozen=True)
class SynthScale:
    """Size of a synthetic log and the knobs of the user model."""

    n_users: int
    n_items: int
    n_categories: int
    n_topics: int
    mean_length: float  # mean behaviors per user
    max_length: int  # cap of the long tail of heavy users
    min_length: int = 30
    length_sigma: float = 0.6  # spread of the lognormal user lengths
    min_interests: int = 7
    max_interests: int = 11
    min_interest_categories: int = 3
    max_interest_categories: int = 4
    interest_share_shape: float = 5.0  # gamma shape of the interests' attention per category
    period_regularity: float = 4.0  # gamma shape of the gaps between visits of an interest
    burst_sizes: tuple[float, ...] = (0.4, 0.35, 0.25)  # P(1), P(2), P(3) behaviors per visit
    burst_gap_s: float = 90.0  # mean seconds between behaviors of one visit
    revisit_prob: float = 0.15
    session_share: float = 0.4
    min_session: int = 5
    max_session: int = 20
    session_gap_s: float = 45.0
    noise_share: float = 0.05
    zipf_exponent: float = 1.1
    # Users per independently seeded block. None: the whole log comes from one random stream and
    # is built in memory (tiny, small, medium: their bytes are pinned). Otherwise block b is drawn
    # from (seed, b) alone, so it is written block by block in bounded memory, users in the real
    # release's order (ids sorted as text), with the two quirks below.
    block_users: int | None = None
    out_of_range_rate: float = 0.0  # share of rows whose timestamp lies outside the window
    malformed_rate: float = 0.0  # share of rows written garbled, one of MALFORMED_KINDS each


SCALES: dict[str, SynthScale] = {
    "tiny": SynthScale(n_users=200, n_items=4_000, n_categories=150, n_topics=20, mean_length=120, max_length=500),
    "small": SynthScale(
        n_users=1_500, n_items=20_000, n_categories=400, n_topics=40, mean_length=250, max_length=1_000
    ),
    "medium": SynthScale(
        n_users=20_000, n_items=200_000, n_categories=1_500, n_topics=100, mean_length=400, max_length=1_300
    ),
    # The shape of the full UserBehavior release: 987,994 users, 4,162,024 items, 9,439
    # categories, 100,150,807 rows (3.67 GB of CSV), about 101 behaviors per user (median near 80
    # in the head sample). The catalog is larger than the items seen because the Zipf tail of
    # big categories is never drawn: 4.55M gives 4.23M distinct items in the log (seed 0, which
    # has 99.7M rows, 3.65 GB). Out-of-range timestamps at about the head sample's rate (1 row
    # in 4,321).
    "taobao": SynthScale(
        n_users=987_994,
        n_items=4_550_000,
        n_categories=9_439,
        n_topics=600,
        mean_length=99.75,
        max_length=3_000,
        min_length=10,
        length_sigma=0.75,
        block_users=8_192,
        out_of_range_rate=2e-4,
        malformed_rate=1e-6,
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
    interests = _make_interests(cfg, catalog, n_users, rng)
    i_user, i_time, i_item = _interest_events(cfg, catalog, interests, lengths, rng)
    s_user, s_time, s_item = _session_events(cfg, catalog, interests, lengths, rng)
    n_so_far = np.bincount(np.concatenate([i_user, s_user]), minlength=n_users)
    n_user, n_time, n_item = _noise_events(cfg, catalog, lengths, n_so_far, rng)
    user = np.concatenate([i_user, s_user, n_user])
    time = np.minimum(np.concatenate([i_time, s_time, n_time]), WINDOW - 1)
    item = np.concatenate([i_item, s_item, n_item])
    # One integer key (user, then millisecond) sorts much faster than a lexsort on floats.
    order = np.argsort(user * (WINDOW * 1000) + (time * 1000).astype(np.int64), kind="stable")
    return user[order], time[order], item[order]


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
    if cfg.n_categories < cfg.max_interest_categories * cfg.n_topics:
        raise DmqnError("every topic needs at least max_interest_categories categories")
    if cfg.n_topics <= cfg.max_interests:
        raise DmqnError("sessions need topics outside the long-term interests: raise n_topics")
    if cfg.n_items < cfg.n_categories:
        raise DmqnError("every category needs at least one item")

    topic_weight = np.arange(1, cfg.n_topics + 1) ** -0.8
    topic_weight /= topic_weight.sum()
    spare = cfg.n_categories - cfg.max_interest_categories * cfg.n_topics
    topic_n = cfg.max_interest_categories + rng.multinomial(spare, rng.dirichlet(np.full(cfg.n_topics, 2.0)))
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
    rank = _zipf_rank(catalog.category_n_items[category], cfg.zipf_exponent, rng)
    return catalog.category_first_item[category] + rank


def _popular_category(cfg: SynthScale, catalog: _Catalog, topic: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rank = _zipf_rank(catalog.topic_n_categories[topic], cfg.zipf_exponent, rng)
    return catalog.topic_categories[topic, rank]


def _user_lengths(cfg: SynthScale, n_users: int, rng: np.random.Generator) -> np.ndarray:
    mu = np.log(cfg.mean_length) - cfg.length_sigma**2 / 2  # so that the mean is mean_length
    raw = rng.lognormal(mu, cfg.length_sigma, n_users)
    return np.clip(np.round(raw), cfg.min_length, cfg.max_length).astype(np.int64)


def _top_k_by_gumbel(log_weight: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, k distinct columns sampled without replacement in proportion to exp(log_weight)."""
    # Negated scores, computed in place (the matrix is users x topics on big scales); negation
    # is exact, so the result is the same as ranking log_weight + gumbel in descending order.
    negated = rng.gumbel(size=log_weight.shape)
    negated += log_weight
    np.negative(negated, out=negated)
    top = np.argpartition(negated, k - 1, axis=1)[:, :k]
    # Sorted by score, every prefix of a row is itself a weighted sample without replacement.
    by_score = np.argsort(np.take_along_axis(negated, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, by_score, axis=1)


def _activity_clock(activity_time: np.ndarray) -> np.ndarray:
    """Map evenly spread activity time (seconds) to wall-clock seconds with a day/night rhythm."""
    hours = WINDOW // 3600
    per_hour = np.resize(HOURLY_ACTIVITY, hours)
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
# the three sources of behaviors


@dataclass(frozen=True)
class _Interests:
    user: np.ndarray  # (n,) owner of each long-term interest
    topic: np.ndarray  # (n,)
    categories: np.ndarray  # (n, max_interest_categories) the first n_categories are used
    n_categories: np.ndarray  # (n,)


def _make_interests(cfg: SynthScale, catalog: _Catalog, n_users: int, rng: np.random.Generator) -> _Interests:
    """Each user's long-term interests: distinct topics, each with a subset of its categories."""
    n_interests = rng.integers(cfg.min_interests, cfg.max_interests + 1, n_users)
    topic_scores = np.broadcast_to(np.log(catalog.topic_weight), (n_users, cfg.n_topics))
    topics = _top_k_by_gumbel(topic_scores, cfg.max_interests, rng)
    topic = topics[np.arange(cfg.max_interests) < n_interests[:, None]]

    width = catalog.topic_categories.shape[1]
    valid = np.arange(width) < catalog.topic_n_categories[topic][:, None]
    rank_scores = np.where(valid, -cfg.zipf_exponent * np.log(np.arange(1.0, width + 1)), -np.inf)
    ranks = _top_k_by_gumbel(rank_scores, cfg.max_interest_categories, rng)
    return _Interests(
        user=np.repeat(np.arange(n_users), n_interests),
        topic=topic,
        categories=catalog.topic_categories[topic[:, None], ranks],
        n_categories=rng.integers(cfg.min_interest_categories, cfg.max_interest_categories + 1, len(topic)),
    )


def _interest_events(
    cfg: SynthScale, catalog: _Catalog, interests: _Interests, lengths: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quasi-periodic mini-bursts on each user's long-term interests, with item revisits."""
    n = len(interests.user)
    # Attention shares decide the number of visits, hence each interest's own revisit period.
    share = rng.gamma(cfg.interest_share_shape, size=n) * interests.n_categories
    share /= np.bincount(interests.user, weights=share)[interests.user]
    burst_p = np.asarray(cfg.burst_sizes) / np.sum(cfg.burst_sizes)
    mean_burst = float(np.dot(np.arange(1, len(burst_p) + 1), burst_p))
    budget = lengths[interests.user] * (1.0 - cfg.session_share - cfg.noise_share)
    expected_visits = np.maximum(share * budget / mean_burst, 1.0)
    period = WINDOW / expected_visits

    # A stationary renewal process with gamma gaps around the period: the window opens at a
    # uniform point of a length-biased gap, so visits are as likely at the window's end as
    # anywhere else (the last click must not be biased away from long-term interests).
    # Twice the expected number of gaps plus a margin covers the window with certainty.
    k = cfg.period_regularity
    n_gaps = np.ceil(2 * expected_visits).astype(np.int64) + 10
    gaps = rng.gamma(k, 1.0 / k, size=int(n_gaps.sum()))
    first = np.cumsum(n_gaps) - n_gaps
    gaps[first] = rng.gamma(k + 1, 1.0 / k, size=n) * rng.random(n)
    visit_time = _segment_cumsum(gaps, n_gaps) * np.repeat(period, n_gaps)
    inside = visit_time < WINDOW
    visit_interest = np.repeat(np.arange(n), n_gaps)[inside]
    visit_time = _activity_clock(visit_time[inside])

    burst = 1 + rng.choice(len(burst_p), size=len(visit_time), p=burst_p)
    interest = np.repeat(visit_interest, burst)
    time = _burst_times(visit_time, burst, cfg.burst_gap_s, rng)
    # The user works through the interest's categories in turn, so consecutive behaviors of an
    # interest (within a visit too) are in different categories.
    start = rng.integers(0, cfg.max_interest_categories, n)
    turn = start[interest] + _segment_offsets(np.bincount(interest, minlength=n))
    pick = turn % interests.n_categories[interest]
    item = _popular_item(cfg, catalog, interests.categories[interest, pick], rng)
    # Revisits stay within the category in turn, so they do not disturb the rotation.
    slot = interest * cfg.max_interest_categories + pick
    item = _revisit_items(slot, item, cfg.revisit_prob, rng)
    return interests.user[interest], time, item


def _burst_times(start: np.ndarray, sizes: np.ndarray, mean_gap: float, rng: np.random.Generator) -> np.ndarray:
    """Times of the behaviors of bursts beginning at ``start``, exponential gaps inside a burst."""
    gaps = rng.exponential(mean_gap, int(sizes.sum()))
    gaps[_segment_offsets(sizes) == 0] = 0.0
    return np.repeat(start, sizes) + _segment_cumsum(gaps, sizes)


def _revisit_items(group: np.ndarray, item: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
    """Replace some items by an item met earlier in the same group.

    Behaviors come in time order within a group (bar bursts overlapping the next visit), so a
    stable sort by group keeps that order.
    """
    order = np.argsort(group, kind="stable")
    sizes = np.bincount(group, minlength=group.max() + 1)
    pos = _segment_offsets(sizes)
    # The first behavior of a group is always fresh, so every revisit has a candidate.
    revisit = (pos > 0) & (rng.random(len(order)) < prob)
    fresh_rank = np.cumsum(~revisit) - ~revisit  # fresh behaviors strictly before each one
    group_first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    n_candidates = fresh_rank - fresh_rank[group_first]
    choice = fresh_rank[group_first] + (rng.random(len(order)) * n_candidates).astype(np.int64)
    sorted_item = item[order]
    sorted_item[revisit] = sorted_item[np.flatnonzero(~revisit)[choice[revisit]]]
    out = np.empty_like(item)
    out[order] = sorted_item
    return out


def _session_events(
    cfg: SynthScale, catalog: _Catalog, interests: _Interests, lengths: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Short bursts of many behaviors on a topic outside the user's long-term interests."""
    mean_size = (cfg.min_session + cfg.max_session) / 2
    n_sessions = rng.poisson(lengths * cfg.session_share / mean_size)
    user = np.repeat(np.arange(len(lengths)), n_sessions)
    member = np.zeros((len(lengths), cfg.n_topics), dtype=bool)
    member[interests.user, interests.topic] = True
    topic = rng.choice(cfg.n_topics, size=len(user), p=catalog.topic_weight)
    # Redraw until no session falls on one of its user's long-term topics.
    clash = np.flatnonzero(member[user, topic])
    while len(clash):
        topic[clash] = rng.choice(cfg.n_topics, size=len(clash), p=catalog.topic_weight)
        clash = clash[member[user[clash], topic[clash]]]

    size = rng.integers(cfg.min_session, cfg.max_session + 1, len(user))
    start = _activity_clock(rng.uniform(0, WINDOW, len(user)))
    session = np.repeat(np.arange(len(user)), size)
    time = _burst_times(start, size, cfg.session_gap_s, rng)
    category = _popular_category(cfg, catalog, topic[session], rng)
    return user[session], time, _popular_item(cfg, catalog, category, rng)


def _noise_events(
    cfg: SynthScale, catalog: _Catalog, lengths: np.ndarray, n_so_far: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exploration: popular items from anywhere in the catalog, at random times.

    Light users whose interests and sessions came out short are topped up to min_length.
    """
    n_noise = np.maximum(rng.poisson(lengths * cfg.noise_share), cfg.min_length - n_so_far)
    user = np.repeat(np.arange(len(lengths)), n_noise)
    topic = rng.choice(cfg.n_topics, size=len(user), p=catalog.topic_weight)
    category = _popular_category(cfg, catalog, topic, rng)
    time = _activity_clock(rng.uniform(0, WINDOW, len(user)))
    return user, time, _popular_item(cfg, catalog, category, rng)
