import dataclasses
import os

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from dmqn_cli.synth import synth
from dmqn_core.data import synth as synth_module
from dmqn_core.data.prep import prepare
from dmqn_core.data.synth import (
    BEHAVIOR_MIX,
    BEHAVIORS,
    MALFORMED_KINDS,
    SCALES,
    WINDOW_END,
    WINDOW_START,
    BlockedLog,
    SynthScale,
    generate_log,
    write_log,
)
from dmqn_core.errors import DmqnError
from dmqn_core.workspace import Workspace


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
    assert mix == pytest.approx(BEHAVIOR_MIX, abs=0.01)
    for column in ("user_id", "item_id", "category_id", "timestamp"):
        assert log[column].dtype == np.int64


def far_share(log) -> float:
    """Share of users (with a history of 20 or more) whose last click's category is in their history
    but not in its last 50 behaviors."""
    far = []
    for user in np.unique(log["user_id"]):
        rows = log["user_id"] == user
        pv = np.flatnonzero(log["behavior_type"][rows] == BEHAVIORS.index("pv"))
        category, ts = log["category_id"][rows], log["timestamp"][rows]
        history = category[ts < ts[pv[-1]]]
        if len(history) >= 20:
            far.append(category[pv[-1]] in history[:-50] and category[pv[-1]] not in history[-50:])
    return float(np.mean(far))


def test_long_histories_reach_further_back_than_the_last_50():
    """The long scale keeps a long-range signal where it is realistic: the same category process on
    histories four times the sample's leaves several times more last clicks whose category only an
    old part of the history holds than on the sample's lengths (`small`)."""
    medium = far_share(generate_log(dataclasses.replace(SCALES["medium"], n_users=600), seed=0))
    small = far_share(generate_log(dataclasses.replace(SCALES["small"], n_users=600), seed=0))
    assert medium >= 0.04 and medium >= 3 * small


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


# -- the blocked generator (taobao scale) ----------------------------------------------------

# A few hundred users in blocks of 64, with quirks frequent enough to appear in ~18k rows.
SMALL_BLOCKED = SynthScale(
    n_users=300,
    n_items=4_000,
    n_categories=150,
    n_topics=20,
    mean_length=60,
    max_length=300,
    min_length=10,
    block_users=64,
    out_of_range_rate=0.01,
    malformed_rate=0.002,
)


def test_blocked_log_is_deterministic_and_each_block_depends_only_on_seed_and_index(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    write_log(a, SMALL_BLOCKED, seed=4)
    write_log(b, SMALL_BLOCKED, seed=4)
    write_log(c, SMALL_BLOCKED, seed=5)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    # Blocks regenerated one at a time, in reverse order, by a fresh generator are the blocks of
    # the full log: the output does not depend on how many blocks are made or held at once.
    in_order = BlockedLog(SMALL_BLOCKED, seed=4)
    alone = BlockedLog(SMALL_BLOCKED, seed=4)
    assert in_order.n_blocks == 5
    blocks = [in_order.block(i) for i in range(in_order.n_blocks)]
    for index in reversed(range(alone.n_blocks)):
        block = alone.block(index)
        for name, column in block.columns.items():
            assert np.array_equal(column, blocks[index].columns[name])
        assert np.array_equal(block.malformed, blocks[index].malformed)
    # The file is exactly the blocks' lines in order (the writer thread keeps them in sequence).
    lines = a.read_text().splitlines()
    assert len(lines) == sum(len(blk.columns["user_id"]) for blk in blocks)
    first = blocks[0].columns
    assert lines[0].split(",")[0] == str(first["user_id"][0])
    last = blocks[-1].columns
    assert lines[-1] == ",".join(
        [
            str(last["user_id"][-1]),
            str(last["item_id"][-1]),
            str(last["category_id"][-1]),
            BEHAVIORS[last["behavior_type"][-1]],
            str(last["timestamp"][-1]),
        ]
    )


def test_blocked_log_has_the_real_files_order_and_quirks(tmp_path):
    out = tmp_path / "log.csv"
    summary = write_log(out, SMALL_BLOCKED, seed=2)
    lines = out.read_text().splitlines()
    assert summary.rows == len(lines) and summary.users == SMALL_BLOCKED.n_users
    fields = [line.split(",") for line in lines]
    is_good = [len(f) == 5 and all(f) and f[3] in BEHAVIORS for f in fields]
    good = [f for f, ok in zip(fields, is_good) if ok]
    garbled = [f for f, ok in zip(fields, is_good) if not ok]
    assert summary.malformed == len(garbled) > 0
    assert {len(f) for f in garbled} <= {4, 5} and any(len(f) == 4 for f in garbled)
    users = [f[0] for f in good]
    assert users == sorted(users)  # user ids in text order, as in the release
    ts = np.array([int(f[4]) for f in good])
    outside = (ts < WINDOW_START) | (ts >= WINDOW_END)
    assert summary.out_of_range == outside.sum() > 0
    assert ts[outside].min() >= WINDOW_START - 90 * 86_400 and ts[outside].max() < WINDOW_END + 90 * 86_400
    user = np.array([int(u) for u in users])
    same_user = user[1:] == user[:-1]
    assert np.all(ts[1:][same_user] >= ts[:-1][same_user])  # by time within a user, strays included
    pairs = {(f[1], f[2]) for f in good}
    assert len({item for item, _ in pairs}) == len(pairs)  # every item has one category


def test_prep_skips_exactly_the_blocked_logs_quirks(tmp_path):
    out = tmp_path / "log.csv"
    summary = write_log(out, SMALL_BLOCKED, seed=2)
    log = BlockedLog(SMALL_BLOCKED, seed=2)
    kinds = np.concatenate([log.block(i).malformed_kind for i in range(log.n_blocks)])
    ws = Workspace(tmp_path / "ws")
    counts = prepare(out, "taobao", "blocked", workspace=ws, min_behaviors=10).meta["counts"]
    assert counts["rows_read"] == summary.rows
    expected = {kind: int(np.sum(kinds == k)) for k, kind in enumerate(MALFORMED_KINDS)}
    # Rows repeated exactly (same second, item and behavior) are dropped as duplicates, once each.
    valid = [line for line in out.read_text().splitlines() if _is_valid_row(line)]
    assert counts["rows_bad"] == {
        "bad_encoding": 0,
        **expected,
        "out_of_time_range": summary.out_of_range,
        "duplicate": len(valid) - len(set(valid)),
    }
    assert counts["users"] > 0.9 * SMALL_BLOCKED.n_users


def _is_valid_row(line: str) -> bool:
    fields = line.split(",")
    return (
        len(fields) == 5
        and all(f.isdigit() for f in fields[:3] + fields[4:])
        and fields[3] in BEHAVIORS
        and WINDOW_START <= int(fields[4]) < WINDOW_END
    )


def test_taobao_scale_has_the_release_shape_per_user():
    cfg = SCALES["taobao"]
    assert (cfg.n_users, cfg.n_categories) == (987_994, 9_439) and cfg.block_users
    # Two blocks of the real catalog (no 100M rows here): ~101 behaviors per user, Taobao's mix.
    part = dataclasses.replace(cfg, n_users=2_000, block_users=1_000)
    log = generate_log(part, seed=0)
    lengths = np.unique(log["user_id"], return_counts=True)[1]
    assert len(lengths) == 2_000
    assert lengths.mean() == pytest.approx(101.4, rel=0.1)
    assert np.median(lengths) == pytest.approx(75, rel=0.2)
    mix = np.bincount(log["behavior_type"], minlength=len(BEHAVIORS)) / lengths.sum()
    assert mix == pytest.approx(BEHAVIOR_MIX, abs=0.01)


def test_cli_accepts_the_taobao_scale(tmp_path, monkeypatch):
    monkeypatch.setitem(synth_module.SCALES, "taobao", SMALL_BLOCKED)  # the CLI path, not 100M rows
    out = tmp_path / "log.csv"
    result = CliRunner().invoke(cli_app(), ["synth", str(out), "--scale", "taobao", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "300 users" in result.output and "malformed rows" in result.output
    direct = tmp_path / "direct.csv"
    write_log(direct, SMALL_BLOCKED, seed=2)
    assert out.read_bytes() == direct.read_bytes()
