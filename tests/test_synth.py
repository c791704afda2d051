import os

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from dmqn_cli.synth import synth
from dmqn_core.errors import DmqnError
from dmqn_core.synth import BEHAVIORS, SCALES, WINDOW_END, WINDOW_START, generate_log, write_log


def read_csv(path):
    lines = path.read_text().splitlines()
    fields = [line.split(",") for line in lines]
    assert all(len(f) == 5 for f in fields)
    return {
        "user_id": np.array([int(f[0]) for f in fields]),
        "item_id": np.array([int(f[1]) for f in fields]),
        "category_id": np.array([int(f[2]) for f in fields]),
        "behavior": np.array([f[3] for f in fields]),
        "timestamp": np.array([int(f[4]) for f in fields]),
    }


def far_interest_fraction(log, recent=50, min_history=60):
    """Share of users whose test target's category is absent from the last `recent` history
    behaviors but present earlier, and share whose target category is anywhere in the history.

    The test target is the user's last pv after sorting by (timestamp, file order); its history
    is the behaviors strictly earlier than it, as the data preparation defines them.
    """
    user, ts, cat = log["user_id"], log["timestamp"], log["category_id"]
    is_pv = log["behavior_type"] == BEHAVIORS.index("pv")
    order = np.lexsort((np.arange(len(user)), ts, user))
    user, ts, cat, is_pv = user[order], ts[order], cat[order], is_pv[order]
    bounds = np.flatnonzero(np.diff(user)) + 1
    far = anywhere = counted = 0
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(user)]):
        target = lo + np.flatnonzero(is_pv[lo:hi])[-1]
        history = cat[lo:hi][ts[lo:hi] < ts[target]]
        if len(history) < min_history:
            continue
        counted += 1
        far += cat[target] not in history[-recent:] and cat[target] in history[:-recent]
        anywhere += cat[target] in history
    return far / counted, anywhere / counted


def test_csv_has_taobao_format(tmp_path):
    out = tmp_path / "log.csv"
    summary = write_log(out, "tiny", seed=3)
    log = read_csv(out)  # int() on every id also proves there is no header line
    assert summary.rows == len(log["user_id"])
    assert summary.users == len(np.unique(log["user_id"]))
    assert summary.items == len(np.unique(log["item_id"]))
    assert summary.categories == len(np.unique(log["category_id"]))
    assert set(log["behavior"]) == set(BEHAVIORS)
    assert log["timestamp"].min() >= WINDOW_START and log["timestamp"].max() < WINDOW_END
    assert WINDOW_START == 1511539200 and WINDOW_END == 1512316800
    key = np.lexsort((log["timestamp"], log["user_id"]))
    assert np.array_equal(key, np.arange(len(key)))  # sorted by (user_id, timestamp)
    # Every item has exactly one category.
    pairs = np.unique(np.stack([log["item_id"], log["category_id"]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    write_log(a, "tiny", seed=7)
    write_log(b, "tiny", seed=7)
    write_log(c, "tiny", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_sizes_and_behavior_mix_follow_the_scale(scale):
    cfg = SCALES[scale]
    log = generate_log(scale, seed=0)
    lengths = np.unique(log["user_id"], return_counts=True)[1]
    assert len(lengths) == cfg.n_users
    assert lengths.mean() == pytest.approx(cfg.mean_length, rel=0.1)
    assert lengths.min() >= cfg.min_length
    assert lengths.max() > 3 * cfg.mean_length  # a long tail of heavy users
    assert len(np.unique(log["item_id"])) <= cfg.n_items
    assert len(np.unique(log["category_id"])) <= cfg.n_categories
    mix = np.bincount(log["behavior_type"], minlength=len(BEHAVIORS)) / len(log["user_id"])
    assert mix == pytest.approx([0.89, 0.055, 0.03, 0.02], abs=0.01)
    for column in ("user_id", "item_id", "category_id", "timestamp"):
        assert log[column].dtype == np.int64


def test_last_click_often_returns_to_an_interest_absent_from_the_last_50():
    far, anywhere = far_interest_fraction(generate_log("small", seed=0))
    assert far >= 0.25
    # The pattern is learnable: the target's category is mostly one the user had met before.
    assert anywhere >= 0.8


def test_write_is_atomic_and_replaces_an_existing_file(tmp_path):
    out = tmp_path / "log.csv"
    out.write_text("old\n")
    write_log(out, "tiny", seed=0)
    assert out.read_text().count("\n") > 1000
    assert os.listdir(tmp_path) == ["log.csv"]


def test_bad_output_paths_and_scales_are_dmqn_errors(tmp_path):
    with pytest.raises(DmqnError, match="does not exist"):
        write_log(tmp_path / "missing" / "log.csv", "tiny")
    with pytest.raises(DmqnError, match="is a directory"):
        write_log(tmp_path, "tiny")
    with pytest.raises(DmqnError, match="unknown scale"):
        generate_log("huge")


def cli_app() -> typer.Typer:
    # Two commands, so that Typer keeps the "synth" subcommand instead of collapsing into it.
    app = typer.Typer()
    app.command("synth")(synth)
    app.command("noop")(lambda: None)
    return app


def test_cli_writes_the_log_and_prints_a_summary(tmp_path):
    out = tmp_path / "log.csv"
    result = CliRunner().invoke(cli_app(), ["synth", str(out), "--scale", "tiny", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "rows" in result.output and "200 users" in result.output
    direct = tmp_path / "direct.csv"
    write_log(direct, "tiny", seed=1)
    assert out.read_bytes() == direct.read_bytes()


def test_cli_bad_output_path_is_a_one_line_error(tmp_path):
    out = tmp_path / "missing" / "log.csv"
    result = CliRunner().invoke(cli_app(), ["synth", str(out), "--scale", "tiny"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "does not exist" in result.output
