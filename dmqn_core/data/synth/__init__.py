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
  it before as often as in the sample; otherwise it draws a popular item of the category. A user's
  last click (last pv, the target prep holds out) in a category met before re-visits an item as
  often as the sample's last clicks do, which is more often than the clicks before it.
* **Behavior types** (pv, cart, fav, buy) are drawn independently in the sample's mix, before the
  items, so that the last click is known when its item is drawn.
* **Time.** Behaviors come in sessions whose sizes, gaps between behaviors and starting hours
  are drawn from the sample's; sessions start at random points of the window.

The package: ``scales`` (the measured statistics and the scales), ``users`` (the user model), ``log``
(a log as columns, blocked logs) and ``writer`` (``write_log``).
"""

from __future__ import annotations

from dmqn_core.data.synth.log import BlockedLog, LogBlock, generate_log
from dmqn_core.data.synth.scales import (
    BEHAVIOR_MIX,
    BEHAVIORS,
    CATEGORY_ID_RANGE,
    ITEM_ID_RANGE,
    ITEM_REPEAT,
    LAST_CLICK_ITEM_REPEAT,
    LENGTH_QUANTILES,
    MALFORMED_KINDS,
    NEW_CATEGORY,
    OUT_OF_RANGE_SPREAD,
    QUANTILE_LEVELS,
    RELEASE_CATALOG,
    RETURN_LAG_EXPONENT,
    SAME_CATEGORY,
    SCALES,
    SESSION_GAP_QUANTILES,
    SESSION_SIZE_QUANTILES,
    SESSION_START_BY_HOUR,
    USER_ID_RANGE,
    WINDOW,
    WINDOW_END,
    WINDOW_START,
    SynthScale,
    resolve_scale,
)
from dmqn_core.data.synth.writer import SynthSummary, write_log

__all__ = [
    "WINDOW_START",
    "WINDOW_END",
    "WINDOW",
    "BEHAVIORS",
    "USER_ID_RANGE",
    "ITEM_ID_RANGE",
    "CATEGORY_ID_RANGE",
    "BEHAVIOR_MIX",
    "QUANTILE_LEVELS",
    "LENGTH_QUANTILES",
    "SESSION_SIZE_QUANTILES",
    "SESSION_GAP_QUANTILES",
    "SESSION_START_BY_HOUR",
    "SAME_CATEGORY",
    "NEW_CATEGORY",
    "RETURN_LAG_EXPONENT",
    "ITEM_REPEAT",
    "LAST_CLICK_ITEM_REPEAT",
    "RELEASE_CATALOG",
    "SCALES",
    "MALFORMED_KINDS",
    "OUT_OF_RANGE_SPREAD",
    "SynthScale",
    "resolve_scale",
    "BlockedLog",
    "LogBlock",
    "SynthSummary",
    "generate_log",
    "write_log",
]
