"""``dmqn prep``: turn a behavior log into a prepared long-sequence CTR set (see dmqn_core.data.prepared).

All row work runs in DuckDB SQL (a file-backed database inside the hidden temporary output
directory or ``--temp-dir``, with ``memory_limit`` and a spill directory), so a 100M-row log is
processed in a few sorts and hash aggregates without per-row Python and without materialising any
history; no step brings all rows (nor all rejected lines) into Python, and the arrays are
streamed into memory-mapped files in batches.

Protocol
--------
1. Rows are read and classified (dmqn_core.data.formats); invalid rows are skipped and counted by
   reason (bad_encoding, bad_columns, bad_id, bad_behavior, bad_timestamp, out_of_time_range;
   an id must be a decimal integer that fits int64: ``1.5``, ``1e3``, ``0x10`` are ``bad_id``);
   ``--strict`` makes the first one fatal, and so is a log where more than half the rows are
   invalid. ``--time-range`` keeps timestamps in [START, END) (Taobao default: the published
   window 2017-11-25 00:00 to 2017-12-03 23:59:59 China time = [1511539200, 1512316800)).
   Of valid rows equal in user, item, category, behavior and timestamp (a log concatenated
   twice, a logger that retried) the first is kept and the others are counted as ``duplicate``;
   they are not invalid, so neither ``--strict`` nor the half-invalid rule counts them.
   A gzip source is decompressed in full beside the work, so that a damaged one (which DuckDB
   reads up to the damage without complaint) fails the run.
2. Each user's behaviors are sorted by (timestamp, file order). Users with fewer than
   ``--min-behaviors`` valid behaviors are dropped.
3. Targets are clicks (``--click-behaviors``: Taobao ``pv``, MovieLens ``click`` = rating >= 4).
   A target's history is every behavior of its user with a timestamp STRICTLY earlier than the
   target's, i.e. a prefix of the sorted sequence, stored as its end offset and cut at read time to
   the most recent ``--max-len``. Clicks with an empty history are not targets.
4. Split by time within each user: the last eligible click is the test target, the
   ``--valid-targets`` clicks before it (default 1) are validation targets, and up to
   ``--train-targets`` clicks immediately before those are training targets (the most recent, so
   histories are long). A user with too few clicks for all of them keeps one test target, at least
   one training target, and validation targets in between. Users with fewer than 3 eligible
   clicks are dropped.
5. Each positive gets ``--neg-ratio`` negatives sharing its history and timestamp, distinct per
   positive, among items the user never clicked at any time. ``--negatives`` says how they are
   drawn: ``popularity`` (the default) with probability proportional to popularity (behavior count
   in the prepared log), ``uniform`` with equal probability, ``same-category`` by popularity among
   the items of the positive's own category (an item's category is its most frequent one); a
   positive whose category holds fewer such items than it needs draws by popularity overall,
   counted as ``negatives_fallback``. Draw k of positive s is item ``cum_w^-1(hash(seed, s, k) mod
   total)`` over the pool's cumulative weights; the first ``neg-ratio`` valid draws are kept and
   rounds of further draws fill up the few positives still short, so the result depends only on
   the seed and the data, never on threading. A user who clicked every item gets fewer negatives
   (counted as ``negatives_short``). A negative's category is its item's category.
6. Vocabularies map raw ids to 1..n in raw-id order (0 = padding) for users, items, categories
   (over the kept users' behaviors) and behavior-type names (in name order). An item's category
   is its most frequent category in the log (ties: smallest raw id); behavior rows keep their
   own row's category.

Layout
------
``prepare`` (pipeline) checks the options into a PrepSettings (options) and runs the stages in order, each
a function of its own module taking one PrepContext (context: the settings, the one DuckDB connection,
the progress line): ``read_log`` (read), ``clean`` (clean), ``build_vocabularies`` (vocabularies),
``make_samples`` (samples), ``draw_negatives`` (negatives), ``write_set`` (write). The source is hashed
beside them (source_check); the set is written into a hidden directory and published whole (directories).
"""

from dmqn_core.data.prep.context import PROGRESS_POLL_S
from dmqn_core.data.prep.negatives import NEGATIVE_ROUNDS
from dmqn_core.data.prep.options import (
    MEMORY_FRACTION,
    MIN_CLICKS,
    NEGATIVE_PROTOCOLS,
    TAOBAO_TIME_RANGE,
    TimeRange,
    memory_limit_setting,
    parse_time_range,
)
from dmqn_core.data.prep.pipeline import PROTOCOL_VERSION, PrepResult, prepare
from dmqn_core.data.prep.read import INVALID_REASONS, ROW_REASONS
from dmqn_core.data.prep.source_check import READ_CHUNK
from dmqn_core.data.prep.write import EXPORT_CHUNK

__all__ = [
    "EXPORT_CHUNK",
    "INVALID_REASONS",
    "MEMORY_FRACTION",
    "MIN_CLICKS",
    "NEGATIVE_PROTOCOLS",
    "NEGATIVE_ROUNDS",
    "PROGRESS_POLL_S",
    "PROTOCOL_VERSION",
    "READ_CHUNK",
    "ROW_REASONS",
    "TAOBAO_TIME_RANGE",
    "PrepResult",
    "TimeRange",
    "memory_limit_setting",
    "parse_time_range",
    "prepare",
]
