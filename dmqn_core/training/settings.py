"""Training settings: TrainConfig, the [model] and [train] tables of a config file, and their checks.

Every setting is checked here, with its name, before a run exists: TOML and Python callers hand over
any type, and a wrong one must fail with the setting's name, not as a TypeError inside a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmqn_core.config import ModelConfig
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.declaration import COMMANDS, TRAIN_AND_BENCH, Between, check_declared, declared, setting
from dmqn_core.devices import AUTO, check_device, check_precision, resolve_device
from dmqn_core.errors import DmqnError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    # Installed there only (the dependency's marker), so a checker run on 3.11+ cannot resolve it.
    import tomli as tomllib  # pyright: ignore[reportMissingImports]


@dataclass
class TrainConfig:
    # Each field is a setting declared once (dmqn_core.declaration); "at least 1" and the like are the
    # words their messages have always used.
    epochs: int = setting(
        8,
        help="Maximum number of epochs.",
        flag="--epochs",
        commands=COMMANDS,
        low=1,
        expect="at least 1",
    )
    batch_size: int = setting(
        256,
        help="Training samples per batch.",
        flag="--batch-size",
        commands=TRAIN_AND_BENCH,
        low=1,
        expect="at least 1",
    )
    eval_batch_size: int = setting(
        1024, help="Samples per batch of validation and test.", flag=None, low=1, expect="at least 1"
    )
    lr: float = setting(
        1e-3,
        help="Adam learning rate.",
        flag="--lr",
        commands=TRAIN_AND_BENCH,
        low=0,
        low_open=True,
        expect="a positive number",
        search=Between(1e-4, 1e-2, log=True),
    )
    weight_decay: float = setting(
        0.0,
        help="Adam weight decay.",
        flag="--weight-decay",
        commands=TRAIN_AND_BENCH,
        low=0,
        expect="0 or a positive number",
        search=Between(1e-8, 1e-3, log=True, or_zero=True),
    )
    # None: the prepared set's --max-len.
    max_len: int | None = setting(
        None,
        help="Most recent behaviors kept per history.",
        flag="--max-len",
        commands=TRAIN_AND_BENCH,
        low=1,
        expect="at least 1",
        default_text="the data set's --max-len",
    )
    # 0 would stop every run after its first epoch, whatever its validation AUC.
    patience: int = setting(
        2,
        help="Stop after this many epochs without a better validation AUC.",
        flag="--patience",
        commands=TRAIN_AND_BENCH,
        low=1,
        expect="at least 1",
    )
    # NumPy's generators take seeds >= 0, the run store keeps them as BIGINT. A bench seeds its runs itself.
    seed: int = setting(
        0,
        help="Seed of initialisation, shuffling and Gumbel noise.",
        flag="--seed",
        low=0,
        high=2**63 - 1,
        expect="in 0 .. 2^63-1",
    )
    # dmqn_core.devices checks it (check_device) once resolved; a run stores the resolved device.
    device: str = setting(
        AUTO,
        help="auto, cpu, cuda or cuda:N; auto is CUDA where torch sees a GPU, else the CPU, and the run records "
        "the device it resolved to.",
        flag="--device",
        commands=COMMANDS,
    )
    # Evaluation is always fp32. Checked with the device it needs (check_precision).
    precision: str = setting(
        "fp32",
        help="fp32, or bf16: the training forward under bfloat16 autocast (CUDA only); validation and test stay fp32.",
        flag="--precision",
        commands=COMMANDS,
    )
    # For dmqn_core.runs.inspection.
    inspect_users: int = setting(
        300,
        help="dmqn/dmqn-simple: users whose codeword assignments and attention are recorded at the end for "
        "`dmqn inspect` and `dmqn report`; 0 records nothing.",
        flag="--inspect-users",
        commands=TRAIN_AND_BENCH,
        low=0,
        expect="0 or more",
        bounds_on_flag=True,
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return cls(**_checked(cls, values, "train"))

    @property
    def resolved_max_len(self) -> int:
        """max_len once resolve_configs has filled it in from the data set: what training reads."""
        if self.max_len is None:
            raise ValueError("max_len is unset: resolve_configs fills it in from the data set")
        return self.max_len


def _checked(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """``values`` with each one checked against the type of ``cls``'s field of that name.

    TOML and Python callers hand over any type; a wrong one must fail here, with the setting's
    name, not as a TypeError inside a model (or pass: True is an int to Python, 1 to range()).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise DmqnError(f"unknown [{section}] setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    return {name: _typed(value, hints[name], f"[{section}] setting {name}") for name, value in values.items()}


def _typed(value: Any, hint: Any, what: str) -> Any:
    """``value`` as a field of type ``hint`` holds it (an int given for a float becomes a float)."""
    options = typing.get_args(hint)
    if type(None) in options:  # X | None
        if value is None:
            return None
        (hint,) = [option for option in options if option is not type(None)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif hint is int:
        # Every integer setting ends up in an int64 (NumPy, torch, the run store's BIGINT): a larger
        # one would overflow there, after the run exists.
        if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            return value
        expected = "an integer" if not isinstance(value, int) or isinstance(value, bool) else "a 64-bit integer"
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    elif hint is str:
        if isinstance(value, str):
            return value
        expected = "a string"
    elif typing.get_origin(hint) is tuple:  # mlp_hidden: tuple[int, ...]
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        expected = "a list of integers"
    else:
        raise TypeError(f"{what}: no type check for {hint!r}; add one to _typed")
    try:
        shown = json.dumps(value)  # as TOML spells most values: true, "text", [1, 2]
    except (TypeError, ValueError):
        shown = repr(value)
    raise DmqnError(f"{what} must be {expected}, got {shown}")


def read_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The [model] and [train] tables of a TOML file (see examples/dmqn.toml)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise DmqnError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise DmqnError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 text; a binary file fails before the parser
        raise DmqnError(f"config file {path} is not valid TOML: not UTF-8 text (byte {exc.start})") from None
    unknown = sorted(set(document) - {"model", "train"})
    if unknown:
        raise DmqnError(f"config file {path}: unknown table(s) {', '.join(unknown)}; use [model] and [train]")
    return dict(document.get("model", {})), dict(document.get("train", {}))


def resolve_configs(
    data: PreparedSet, model_settings: dict[str, Any], train_settings: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """Defaults, overridden by the given settings; vocabulary sizes come from the data."""
    vocab_fields = {item.name for item in declared(ModelConfig) if item.setting.from_data}
    given = _checked(ModelConfig, model_settings, "model")
    if vocab_fields & set(given):
        raise DmqnError(f"{', '.join(sorted(vocab_fields & set(given)))} come(s) from the data set and cannot be set")
    try:
        model_config = ModelConfig(
            n_items=data.n_items + 1,
            n_categories=data.n_categories + 1,
            n_behavior_types=data.n_behavior_types + 1,
            **given,
        )
    except ValueError as exc:  # ModelConfig's own range checks, for library callers a ValueError
        raise DmqnError(f"invalid model setting: {exc}") from None
    train_config = TrainConfig.from_dict(train_settings)
    if train_config.max_len is None:
        train_config = dataclasses.replace(train_config, max_len=data.max_len)
    train_config = dataclasses.replace(train_config, device=resolve_device(train_config.device))
    check_train_config(train_config)
    return model_config, train_config


def check_train_config(cfg: TrainConfig) -> None:
    """A DmqnError naming the first setting out of its range; ``cfg.device`` must be resolved."""
    check_declared(cfg, DmqnError, dashed=True)
    check_device(cfg.device)  # resolved by the caller: auto is no device to train on
    check_precision(cfg.precision, cfg.device)
