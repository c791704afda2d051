"""The user model of the synthetic log: the catalog (topics, categories, items with Zipf-like popularity), each
user's history length, chain of categories, items and session times, and the behavior types (the package
docstring describes each step and the statistic it reproduces)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmqn_core.data.synth.scales import (
    BEHAVIOR_MIX,
    ITEM_REPEAT,
    LAST_CLICK_ITEM_REPEAT,
    LENGTH_QUANTILES,
    NEW_CATEGORY,
    QUANTILE_LEVELS,
    RETURN_LAG_EXPONENT,
    SAME_CATEGORY,
    SESSION_GAP_QUANTILES,
    SESSION_SIZE_QUANTILES,
    SESSION_START_BY_HOUR,
    WINDOW,
    SynthScale,
)
from dmqn_core.errors import DmqnError


@dataclass(frozen=True)
class _Catalog:
    topic_weight: np.ndarray  # (n_topics,) popularity of each topic
    topic_categories: np.ndarray  # (n_topics, max per topic) categories by popularity, -1 pads
    topic_n_categories: np.ndarray  # (n_topics,)
    category_first_item: np.ndarray  # items are laid out by category, most popular first
    category_n_items: np.ndarray


def user_events(
    cfg: SynthScale, catalog: _Catalog, n_users: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The behaviors of ``n_users`` users (indices 0..n_users-1) as (user, seconds into the window,
    item index, behavior type: a code into BEHAVIORS), sorted by (user, time)."""
    lengths = _user_lengths(cfg, n_users, rng)
    user = np.repeat(np.arange(n_users), lengths)
    chain = _category_chain(cfg, catalog, lengths, rng)
    # The types come before the items: the user's last click (last pv) draws its item its own way.
    behavior = _behavior_types(len(user), rng)
    item = _items(cfg, catalog, chain, _last_clicks(user, behavior), rng)
    return user, _session_times(lengths, rng), item, behavior


def _behavior_types(n: int, rng: np.random.Generator) -> np.ndarray:
    mix = np.cumsum(BEHAVIOR_MIX)
    return np.searchsorted(mix, rng.random(n) * mix[-1], side="right").astype(np.int8)


def _last_clicks(user: np.ndarray, behavior: np.ndarray) -> np.ndarray:
    """Whether each row is its user's last pv (rows sorted by user, then time)."""
    clicks = np.flatnonzero(behavior == 0)  # BEHAVIORS[0] is pv
    last = clicks[np.r_[user[clicks][1:] != user[clicks][:-1], True]]
    out = np.zeros(len(user), dtype=bool)
    out[last] = True
    return out


# ---------------------------------------------------------------------------------------------
# catalog and users


def _zipf_rank(n: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """A rank in [0, n) per entry of n, P(rank r) roughly proportional to (r + 1) ** -exponent."""
    u = rng.random(np.shape(n))
    # Inverse CDF of the continuous density x ** -exponent on [1, n + 1].
    top = (np.asarray(n, dtype=np.float64) + 1.0) ** (1.0 - exponent)
    x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - exponent))
    return np.minimum(x.astype(np.int64) - 1, np.asarray(n) - 1)


def make_catalog(cfg: SynthScale, rng: np.random.Generator) -> _Catalog:
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


def _items(
    cfg: SynthScale, catalog: _Catalog, chain: _Chain, last_click: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A popular item of each behavior's category, or (as often as in the sample) an item the user
    met before in it; a user's last click, in a category met before, returns to an item met in it
    as often as the sample's last clicks do, which is more often than other clicks at its depth."""
    item = _popular_item(cfg, catalog, chain.category, rng)
    (same_a, same_e), (return_a, return_e) = ITEM_REPEAT
    k = np.maximum(chain.position, 1)
    prob = np.minimum(1.0, np.where(chain.same, same_a * k**same_e, return_a * k**return_e))
    prob = np.where(chain.opened, 0.0, np.where(last_click, LAST_CLICK_ITEM_REPEAT, prob))
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
