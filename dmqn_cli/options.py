"""The flags of the settings, made from their declarations (dmqn_core.declaration), and how they become settings.

``setting_flags(command)`` gives a command an option for every setting of ModelConfig and TrainConfig whose
declaration offers a flag on that command, in the Model and Training panels of `--help`. Typer reads a
command's options from its signature, so the decorator writes one (``__signature__``, which inspect.signature
and so Typer honour) with the generated options where the command's SettingFlags parameter was, and hands
the command the values given as one SettingFlags.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, get_args

import typer
from rich.markup import escape

from dmqn_core.config import ModelConfig
from dmqn_core.declaration import Declared, declared
from dmqn_core.training.train import TrainConfig, read_config_file

MODEL_PANEL = "Model"
TRAIN_PANEL = "Training"
# The tables of a --config file, with the panel of their flags: the training settings come first in `--help`.
_TABLES = (("train", TrainConfig, TRAIN_PANEL), ("model", ModelConfig, MODEL_PANEL))
# The types a flag can have (a tuple, mlp_hidden, is set in a --config file).
_FLAG_TYPES = (bool, int, float, str)

R = TypeVar("R")

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="TOML file with \\[model] and \\[train] tables; flags override it (see examples/dmqn.toml).",
)


@dataclass(frozen=True)
class SettingFlags:
    """The settings given as flags, by table; a flag not given is absent."""

    model: dict[str, Any]
    train: dict[str, Any]


# The default of a command's SettingFlags parameter: where setting_flags puts the options.
SETTING_OPTIONS: Any = SettingFlags({}, {})


def flagged(command: str) -> list[tuple[str, Declared]]:
    """(table, declared setting) of every setting with a flag on ``command``, in the order of `--help`."""
    return [
        (table, item)
        for table, cls, _ in _TABLES
        for item in declared(cls)
        if item.setting.flag is not None and command in item.setting.commands
    ]


def setting_flags(command: str) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorator of the function of ``command``: its parameter ``NAME: SettingFlags = SETTING_OPTIONS`` becomes
    the options of the settings with a flag on ``command``, and the function gets the values given in NAME."""
    panels = {table: panel for table, _, panel in _TABLES}
    options = flagged(command)

    # Callable[..., R]: the decorated function takes other parameters than the function given.
    def decorate(func: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(func)
        (placeholder,) = [p.name for p in signature.parameters.values() if p.default is SETTING_OPTIONS]
        own = [p for p in signature.parameters.values() if p.name != placeholder]
        clash = {p.name for p in own} & {item.name for _, item in options}
        if clash:
            raise TypeError(f"{func.__name__}: parameters {sorted(clash)} are names of settings")
        generated = [_parameter(item, panels[table]) for table, item in options]
        at = list(signature.parameters).index(placeholder)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            given: dict[str, dict[str, Any]] = {table: {} for table, _, _ in _TABLES}
            for table, item in options:
                value = kwargs.pop(item.name, None)
                if value is not None:
                    given[table][item.name] = value
            return func(*args, **kwargs, **{placeholder: SettingFlags(**given)})

        parameters = [*own[:at], *generated, *own[at:]]
        # inspect (and so Typer) reads __signature__ from any callable; typeshed's wrapper type does not declare it.
        wrapper.__signature__ = signature.replace(parameters=parameters)  # pyright: ignore[reportAttributeAccessIssue]
        # Typer evaluates the annotations too: those of the signature it gets, not the placeholder's.
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": signature.return_annotation}
        return wrapper

    return decorate


def _parameter(item: Declared, panel: str) -> inspect.Parameter:
    """The Typer option of one setting: given or not (None), as its declaration describes it."""
    s = item.setting
    flag_type = next((t for t in _FLAG_TYPES if t is item.hint or t in get_args(item.hint)), None)
    if flag_type is None or s.flag is None:
        raise TypeError(f"setting {item.name}: no flag for a {item.hint!r}")
    declarations = f"{s.flag}/--no-{s.flag.removeprefix('--')}" if flag_type is bool else s.flag
    low, high = (s.low, s.high) if s.bounds_on_flag else (None, None)  # None: Typer's own default, no bound
    option = typer.Option(None, declarations, help=_help(item), rich_help_panel=panel, min=low, max=high)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD  # as the command's own, among which it goes
    return inspect.Parameter(item.name, kind, default=option, annotation=Optional[flag_type])


def _help(item: Declared) -> str:
    """The declaration's help with the default, as Rich markup (a '[' of the text is no markup)."""
    default = item.setting.default_text
    if default is None:
        value = item.default
        default = ("yes" if value else "no") if isinstance(value, bool) else str(value)
    return f"{escape(item.setting.help.removesuffix('.'))} \\[default: {escape(default)}]."


def collect_settings(config: Optional[Path], flags: SettingFlags) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model settings, train settings) of a --config file, overridden by the flags that were given."""
    model_settings, train_settings = read_config_file(config) if config else ({}, {})
    return {**model_settings, **flags.model}, {**train_settings, **flags.train}
