"""What a prep is asked for: the checked settings every stage reads, and the parsing of the options
that need it (``--time-range``, ``--memory-limit``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dmqn_core.data.formats import Format
from dmqn_core.errors import DmqnError

TAOBAO_TIME_RANGE = (1511539200, 1512316800)
MIN_CLICKS = 3  # one test, one validation and at least one training target
# How a negative is drawn among the items its user never clicked (dmqn_core.data.prep, protocol step 5).
NEGATIVE_PROTOCOLS = ("popularity", "uniform", "same-category")
MEMORY_FRACTION = 0.25  # default DuckDB memory limit, of the machine's (or the cgroup's) memory

TimeRange = tuple[int, int] | None | Literal["default"]


@dataclass(frozen=True)
class PrepSettings:
    """The options of one prep (prepare's arguments of the same names): the protocol of the set, which
    meta.json records, and the resources DuckDB works with. ``checked`` gives them resolved."""

    source: Path
    fmt: Format
    max_len: int
    neg_ratio: int
    negatives: str
    train_targets: int
    valid_targets: int
    min_behaviors: int
    time_range: TimeRange
    columns: dict[str, str]
    delimiter: str
    click_behaviors: list[str] | None
    strict: bool
    seed: int
    memory_limit: str | None  # DuckDB's memory_limit once checked (memory_limit_setting)
    threads: int | None
    temp_dir: Path | None  # where DuckDB works instead of the set's temporary directory

    def checked(self) -> PrepSettings:
        """These settings with the source, the time range, the memory limit and the scratch folder resolved;
        a DmqnError for the first that is out of range."""
        if self.negatives not in NEGATIVE_PROTOCOLS:
            raise DmqnError(f"--negatives must be one of {', '.join(NEGATIVE_PROTOCOLS)}, got {self.negatives!r}")
        for name, value, low in (
            ("--max-len", self.max_len, 1),
            ("--neg-ratio", self.neg_ratio, 0),
            ("--train-targets", self.train_targets, 1),
            ("--valid-targets", self.valid_targets, 1),
            ("--min-behaviors", self.min_behaviors, 1),
            ("--seed", self.seed, 0),
        ):
            if value < low:
                raise DmqnError(f"{name} must be >= {low}, got {value}")
        if self.threads is not None and self.threads < 1:
            raise DmqnError(f"--threads must be >= 1, got {self.threads}")
        memory_limit = memory_limit_setting(self.memory_limit)
        scratch = None if self.temp_dir is None else self.temp_dir.expanduser().resolve()
        if scratch is not None and not scratch.is_dir():
            raise DmqnError(f"--temp-dir {scratch} is not a directory")
        source = self.source.expanduser().resolve()
        if not source.exists():
            raise DmqnError(f"{source} does not exist")
        time_range = self.time_range
        if time_range == "default":
            time_range = TAOBAO_TIME_RANGE if self.fmt is Format.taobao else None
        return dataclasses.replace(
            self, source=source, time_range=time_range, memory_limit=memory_limit, temp_dir=scratch
        )


def parse_time_range(text: str | None) -> TimeRange:
    """``START,END`` (unix seconds or ISO date-times, UTC unless offset given) -> [START, END).

    ``None`` or ``default`` keeps the format's default, ``all`` disables the filter.
    """
    if text is None or text.strip().lower() == "default":
        return "default"
    if text.strip().lower() == "all":
        return None
    parts = text.split(",")
    if len(parts) != 2:
        raise DmqnError(f"--time-range: expected START,END, got {text!r}")
    start, end = (_parse_instant(part.strip()) for part in parts)
    if start >= end:
        raise DmqnError(f"--time-range: START must be before END, got {text!r}")
    return start, end


def _parse_instant(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise DmqnError(f"--time-range: {text!r} is neither unix seconds nor an ISO date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return int(moment.timestamp())


def memory_limit_setting(text: str | None) -> str:
    """The DuckDB ``memory_limit`` for ``--memory-limit``: None gives MEMORY_FRACTION of memory,
    ``N%`` that share of it, anything else (``4GB``, ``500MB``) is passed to DuckDB as is."""
    if text is None:
        return _share_of_memory(MEMORY_FRACTION)
    text = text.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise DmqnError(f"--memory-limit: expected a size like 4GB or a share like 25%, got {text!r}") from None
        if not 0 < percent <= 100:
            raise DmqnError(f"--memory-limit: a share must be in (0, 100]%, got {text!r}")
        return _share_of_memory(percent / 100)
    return text


def _share_of_memory(fraction: float) -> str:
    total = _memory_bytes()
    if total is None:
        return "4GB"
    return f"{max(256, int(total * fraction) >> 20)}MB"


def _memory_bytes() -> int | None:
    """Physical memory, or the cgroup's limit where that is lower (containers)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total
