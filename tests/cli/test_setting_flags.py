"""Every setting is declared once (dmqn_core.declaration): every field of ModelConfig and TrainConfig has a flag
or is declared without one, every flag of the Model and Training panels is a field's, and a flag's value
reaches the settings under the field's name."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from dmqn_cli import bench as bench_command
from dmqn_cli import train as train_command
from dmqn_cli import tune as tune_command
from dmqn_cli.main import app
from dmqn_cli.options import MODEL_PANEL, TRAIN_PANEL, flagged
from dmqn_core.config import ModelConfig
from dmqn_core.declaration import COMMANDS, Declared, declared
from dmqn_core.errors import DmqnError
from dmqn_core.training.train import TrainConfig

SETTINGS = {item.name: item for cls in (ModelConfig, TrainConfig) for item in declared(cls)}


def options_in_panels(command: str) -> dict[str, tuple[str, ...]]:
    """Parameter name -> option strings of the command's options in the Model and Training panels."""
    click_command = typer.main.get_command(app).commands[command]
    return {
        p.name: (*p.opts, *p.secondary_opts)
        for p in click_command.params
        if getattr(p, "rich_help_panel", None) in (MODEL_PANEL, TRAIN_PANEL)
    }


def test_every_field_is_declared_with_a_flag_or_explicitly_without():
    fields = {f for cls in (ModelConfig, TrainConfig) for f in cls.__dataclass_fields__}
    assert set(SETTINGS) == fields  # declared() refuses a field without its declaration
    assert all(item.setting.help.strip() for item in SETTINGS.values())
    flags = [item.setting.flag for item in SETTINGS.values() if item.setting.flag]
    assert len(flags) == len(set(flags))
    # The vocabulary sizes come from the data set: neither a flag nor a --config file sets them.
    assert {name for name, item in SETTINGS.items() if item.setting.from_data} == {
        "n_items",
        "n_categories",
        "n_behavior_types",
    }
    without = {name for name, item in SETTINGS.items() if item.setting.flag is None and not item.setting.from_data}
    # Config-file only: the baselines' niche settings, the MLP's sizes, the paper's plain-model switches.
    assert {"simhash_bits", "session_gap", "mlp_hidden", "ctam_size_bias", "eval_batch_size"} <= without


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_a_field_and_every_offered_field_a_flag(command):
    options = options_in_panels(command)
    offered = {item.name: item for _, item in flagged(command)}
    assert set(options) == set(offered)
    for name, item in offered.items():
        flag = item.setting.flag
        expected = (flag, f"--no-{flag[2:]}") if item.hint is bool else (flag,)
        assert options[name] == expected, name
    # Every option of the command has its own strings: no flag of a setting shadows one of the command's.
    every = [s for p in typer.main.get_command(app).commands[command].params for s in getattr(p, "opts", [])]
    assert len(every) == len(set(every))


def test_the_commands_offer_what_they_always_did():
    """The flags users and scripts rely on: train offers every setting with a flag, bench those every model of a
    bench shares, tune the budget of a trial."""
    with_flag = {name for name, item in SETTINGS.items() if item.setting.flag}
    assert {item.name for _, item in flagged("train")} == with_flag
    assert {item.setting.flag for _, item in flagged("bench")} == {
        *("--epochs", "--batch-size", "--lr", "--weight-decay", "--max-len", "--patience", "--device"),
        *("--precision", "--inspect-users", "--embed-dim", "--short-len", "--short-term", "--match-features"),
        *("--behavior-time", "--cluster-categories", "--middle-len", "--top-k", "--dropout"),
    }
    assert {item.setting.flag for _, item in flagged("tune")} == {"--epochs", "--device", "--precision"}


def given_value(item: Declared) -> tuple[list[str], object]:
    """Command-line words that give ``item`` a value (for a bool, the one that is not its default), and it."""
    s, flag = item.setting, item.setting.flag
    if item.hint is bool:
        return ([f"--no-{flag[2:]}"] if item.default else [flag]), not item.default
    if s.choices:
        value = next(c for c in s.choices if c != item.default)
    elif item.hint is float:
        value = 0.25
    elif item.hint is str:
        value = {"device": "cpu", "precision": "bf16"}[item.name]
    else:
        value = int(s.low or 0) + 3
    return [flag, str(value)], value


# Where each command's call into dmqn_core takes the settings: (model, train) positions, or None: keywords.
CALLS = [
    ("train", train_command, "train_model", (3, 4)),
    ("bench", bench_command, "run_bench", (4, 5)),
    ("tune", tune_command, "run_study", None),
]


@pytest.mark.parametrize("command, module, target, positions", CALLS)
def test_a_flags_value_reaches_its_setting(command, module, target, positions, monkeypatch, tmp_path):
    captured = {}

    def capture(*args, **kwargs):
        if positions:
            captured["model"], captured["train"] = args[positions[0]], args[positions[1]]
        else:
            captured["model"], captured["train"] = kwargs["model_settings"], kwargs["train_settings"]
        raise DmqnError("captured")

    monkeypatch.setattr(module, target, capture)
    words = ["data", "--model", "sim"] if command == "tune" else ["data"]
    expected: dict[str, dict] = {"model": {}, "train": {}}
    for table, item in flagged(command):
        flag_words, expected[table][item.name] = given_value(item)
        words += flag_words
    result = CliRunner().invoke(app, [command, *words, "-w", str(tmp_path)])
    assert "captured" in result.output, result.output
    assert captured == expected
