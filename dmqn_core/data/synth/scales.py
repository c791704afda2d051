"""What a synthetic log looks like: the statistics measured on the Taobao sample (each with the command that
measured it) and the scales built on them."""

from __future__ import annotations

from dataclasses import dataclass

from dmqn_core.errors import DmqnError

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
# P(the last click's item was met before | its category was), over the last clicks (a user's last pv,
# the target prep holds out) after at least 20 behaviors. The last click returns to an item met
# before more often than the clicks before it (the sample: 0.320 of last clicks, about 0.27 of the
# clicks at the same depth), so the generator gives a last click in a category met before an item
# met in it with this probability instead of ITEM_REPEAT's.
LAST_CLICK_ITEM_REPEAT = 0.4257


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


def resolve_scale(scale: str | SynthScale) -> SynthScale:
    if isinstance(scale, SynthScale):
        return scale
    if scale not in SCALES:
        raise DmqnError(f"unknown scale {scale!r} (choose one of {', '.join(SCALES)})")
    return SCALES[scale]
