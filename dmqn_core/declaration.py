"""One declaration per setting: what a field of ModelConfig or TrainConfig declares beside its type and default.

A setting is declared once, as a dataclass field whose metadata is a ``Setting`` (made by ``setting``):
its help text, its command-line flag (or none: a --config file only), the commands that offer the flag,
its valid range or choices and its search range for `dmqn tune`. Its name is the TOML key of the [model]
or [train] table, its annotation its type. From the declarations come the range and choice checks
(``check_declared``), the flags of `dmqn train`, `dmqn bench` and `dmqn tune` (dmqn_cli.options), the
search spaces (training.search_spaces) and ModelConfig's values of settings added after runs were stored.

Plain data: this base module imports neither Typer nor Optuna.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

# The commands that offer flags of settings; a flag is on `dmqn train` at least.
TRAIN = "train"
BENCH = "bench"
TUNE = "tune"
COMMANDS = (TRAIN, BENCH, TUNE)
TRAIN_AND_BENCH = (TRAIN, BENCH)


@dataclass(frozen=True)
class Between:
    """A search range: a number in [low, high], on a log scale if ``log``; ``or_zero``: 0 is a choice too."""

    low: float
    high: float
    log: bool = False
    # A log scale cannot hold 0, and "none of it" (no weight decay) is the baseline worth trying: a yes/no
    # parameter decides first, the log-scale value is searched only when it says yes.
    or_zero: bool = False


@dataclass(frozen=True, init=False)
class OneOf:
    """A search range: one of a few values (sizes that only make sense as powers of two, lengths, modes)."""

    choices: tuple[Any, ...]

    def __init__(self, *choices: Any) -> None:
        object.__setattr__(self, "choices", choices)


class _Always:
    def __repr__(self) -> str:
        return "ALWAYS"


# ``absent_means`` of a setting every stored config has: it existed when the first runs were stored.
ALWAYS: Any = _Always()


@dataclass(frozen=True)
class Setting:
    """The declaration of one setting, beside its field's name (the TOML key), type and default."""

    # What it does, one or two sentences; `--help` adds the default.
    help: str
    # The flag (a bool setting gets --no-FLAG too); None: a --config file (or Python) sets it, no flag does.
    flag: str | None
    # The commands whose flags include it (`dmqn bench` only those every model of a bench shares).
    commands: tuple[str, ...] = (TRAIN,)
    # The valid values: bounds (inclusive unless open) or choices; None is valid where the type allows it.
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    # How an error message states the valid values where it does not write the bounds (">= 1", "in [0, 1)"):
    # the words the message has always used. It is also the message for a NaN or an infinity.
    expect: str | None = None
    # The flag itself refuses a value out of bounds (a usage error, exit code 2), as it always has.
    bounds_on_flag: bool = False
    # What `--help` says the default is, where the field's default (None) does not say it.
    default_text: str | None = None
    # Its range in `dmqn tune`'s search spaces (training.search_spaces picks which settings a model searches).
    search: Between | OneOf | None = None
    # A setting added after runs were stored: the value a stored config without it means, the one that
    # builds the model of those runs (whatever today's default is).
    absent_means: Any = ALWAYS
    # Set from the prepared data set (the vocabulary sizes): neither a flag nor a --config file sets it.
    from_data: bool = False

    def __post_init__(self) -> None:
        if self.flag is None and self.commands != (TRAIN,):
            raise TypeError(f"a setting without a flag offers none on {', '.join(self.commands)}")
        if self.flag is not None and (TRAIN not in self.commands or set(self.commands) - set(COMMANDS)):
            raise TypeError(f"{self.flag}: commands must include {TRAIN} and be among {', '.join(COMMANDS)}")
        if self.flag is not None and self.from_data:
            raise TypeError(f"{self.flag}: a setting from the data set has no flag")
        if self.bounds_on_flag and (self.low_open or self.high_open):
            raise TypeError(f"{self.flag}: a flag checks closed bounds only")

    @property
    def added_later(self) -> bool:
        return self.absent_means is not ALWAYS


_KEY = "dmqn_setting"  # of a field's metadata


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None, **declaration: Any) -> Any:
    """A dataclass field with its ``Setting`` (keyword arguments: Setting's); ``flag`` is to be stated."""
    return dataclasses.field(default=default, metadata={_KEY: Setting(help=help, flag=flag, **declaration)})


class Declared(NamedTuple):
    """A declared field of a config class."""

    name: str
    setting: Setting
    hint: Any  # the field's type, evaluated
    default: Any  # dataclasses.MISSING where it has none

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.hint)


@functools.cache
def declared(cls: type) -> tuple[Declared, ...]:
    """The fields of the config dataclass ``cls``, in order; TypeError where one lacks its declaration."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if _KEY not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with dmqn_core.declaration.setting()")
        found.append(Declared(f.name, f.metadata[_KEY], hints[f.name], f.default))
    return tuple(found)


def check_declared(config: Any, error: Callable[[str], Exception] = ValueError, dashed: bool = False) -> None:
    """Raise ``error`` naming the first setting of ``config`` outside its declared range or choices.

    A float must be finite; a tuple's every entry is checked. ``dashed``: the message spells the setting
    as its flag family does (weight-decay), not as its key (weight_decay).
    """
    for item in declared(type(config)):
        value = getattr(config, item.name)
        if value is None and item.optional:
            continue
        problem = _problem(item.setting, value)
        if problem:
            name = item.name.replace("_", "-") if dashed else item.name
            raise error(f"{'each of ' if isinstance(value, tuple) else ''}{name} must be {problem}, got {value!r}")


def _problem(s: Setting, value: Any) -> str | None:
    """What ``value`` should be (the end of "must be ..."), or None where it is valid."""
    if s.choices:
        return None if value in s.choices else f"one of {', '.join(s.choices)}"
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, float) and not math.isfinite(v):
            # NaN passes no comparison at all, so every bound would let it through.
            return s.expect or "a finite number"
        if not _within(s, v):
            return s.expect or _bounds(s)
    return None


def _within(s: Setting, v: float) -> bool:
    above = s.low is None or (v > s.low if s.low_open else v >= s.low)
    below = s.high is None or (v < s.high if s.high_open else v <= s.high)
    return above and below


def _bounds(s: Setting) -> str:
    if s.low is not None and s.high is not None:
        return f"in {'(' if s.low_open else '['}{s.low}, {s.high}{')' if s.high_open else ']'}"
    if s.low is not None:
        return f"{'>' if s.low_open else '>='} {s.low}"
    return f"{'<' if s.high_open else '<='} {s.high}"
