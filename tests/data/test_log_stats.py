"""The statistics `dmqn synth --compare` prints, on hand-made logs with known answers, and the
constants measured on the real Taobao sample."""

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from dmqn_cli.synth import synth
from dmqn_core.data import synth as synth_module
from dmqn_core.data.log_stats import (
    FIGURES,
    TAOBAO_84K,
    compare,
    generator_constants,
    log_statistics,
    synthetic_log_statistics,
)
from dmqn_core.errors import DmqnError

W0 = synth_module.WINDOW_START + 86_400  # a day into the window
REAL_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "taobao_userbehavior_84k.csv"


def hand_made_log(path: Path) -> Path:
    """Three users whose every figure is counted by hand in the tests below.

    1: 60 pv a minute apart; category 7 first, then 58 behaviors in category 8, then the last click
       back in category 7 on the first row's item: in the history, but not in the last 50.
    2: 29 pv in category 9 a minute apart, then a buy in category 99: the last click is the 29th row.
    3: 5 pv an hour apart on one item (category 50): too short a history for a last click.
    Plus a line cut short and a row before the window, which are not counted.
    """
    rows = [(1, 100, 7, "pv", W0)]
    rows += [(1, 100 + k, 8, "pv", W0 + 60 * k) for k in range(1, 59)]
    rows += [(1, 100, 7, "pv", W0 + 60 * 59)]
    rows += [(2, 200 + k, 9, "pv", W0 + 60 * k) for k in range(29)] + [(2, 229, 99, "buy", W0 + 60 * 29)]
    rows += [(3, 500, 50, "pv", W0 + 3600 * k) for k in range(5)]
    lines = [",".join(map(str, row)) for row in rows]
    lines.insert(10, "1,2,3,pv")
    lines.append(f"3,501,50,pv,{synth_module.WINDOW_START - 10}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_log_statistics_on_a_hand_made_log(tmp_path):
    stats = log_statistics(hand_made_log(tmp_path / "log.csv"))
    assert (stats.rows, stats.users, stats.items, stats.categories) == (95, 3, 90, 5)
    assert stats.last_clicks == 2  # user 3's history is shorter than 20
    expected = {
        "pv_share": 94 / 95,
        "cart_share": 0.0,
        "fav_share": 0.0,
        "buy_share": 1 / 95,
        "top_item_share": 5 / 95,  # 1 % of 90 items rounds up to one: item 500, 5 rows
        "single_item_share": 88 / 90,  # items 100 (twice) and 500 (five times) are not
        "top_category_share": 58 / 95,  # category 8
        "length_p10": 5 + 0.2 * 25,  # lengths 5, 30, 60
        "length_median": 30,
        "length_mean": 95 / 3,
        "length_p90": 30 + 0.8 * 30,
        "categories_median": 2,
        "categories_mean": 5 / 3,
        "item_repeat_share": 5 / 95,  # user 1's last click, user 3's four repeats
        "same_category_share": (57 + 28 + 4) / 92,
        "gap_median_s": 60,
        "session_break_share": 4 / 92,
        "sessions_median": 1,
        "last_category_anywhere": 1.0,
        "last_category_recent": 0.5,  # user 2 only
        "last_item_anywhere": 0.5,  # user 1 only
    }
    assert set(stats.figures) == {f.key for f in FIGURES}
    assert stats.figures == pytest.approx(expected)


def test_the_process_constants_need_enough_rows_to_fit(tmp_path):
    with pytest.raises(DmqnError, match="too few behaviors"):
        generator_constants(hand_made_log(tmp_path / "log.csv"))


def test_the_generator_reproduces_the_process_constants_it_draws_from(tmp_path):
    log = tmp_path / "small.csv"
    synth_module.write_log(log, "small", seed=1)
    measured = generator_constants(log)
    assert measured["BEHAVIOR_MIX"] == pytest.approx(synth_module.BEHAVIOR_MIX, abs=0.005)
    assert measured["SAME_CATEGORY"] == pytest.approx(synth_module.SAME_CATEGORY, abs=0.02)
    for name in ("LENGTH_QUANTILES", "SESSION_SIZE_QUANTILES", "SESSION_GAP_QUANTILES"):
        middle = slice(4, 19)  # the 20th to 90th percentiles; the extremes of 1,500 users vary more
        assert measured[name][middle] == pytest.approx(getattr(synth_module, name)[middle], rel=0.15, abs=1.5), name
    (same_a, same_e), (return_a, return_e) = measured["ITEM_REPEAT"]
    (want_same_a, want_same_e), (want_return_a, want_return_e) = synth_module.ITEM_REPEAT
    assert same_a * 64**same_e == pytest.approx(want_same_a * 64**want_same_e, abs=0.03)
    assert return_a * 64**return_e == pytest.approx(want_return_a * 64**want_return_e, abs=0.03)
    # About 1,000 last clicks in a category met before: a standard error of 0.016. A fresh draw
    # that happens to hit an item met before adds a little.
    assert measured["LAST_CLICK_ITEM_REPEAT"] == pytest.approx(synth_module.LAST_CLICK_ITEM_REPEAT, abs=0.05)


def test_comparison_applies_the_share_and_count_tolerances(tmp_path):
    stats = log_statistics(hand_made_log(tmp_path / "log.csv"))
    moved = dict(
        stats.figures, pv_share=stats.figures["pv_share"] - 0.06, length_mean=stats.figures["length_mean"] * 1.19
    )
    other = type(stats)(**{**stats.__dict__, "figures": moved})
    misses = {row.figure.key for row in compare(stats, other) if not row.within_target}
    assert misses == {"pv_share"}
    moved["length_mean"] = stats.figures["length_mean"] * 0.79
    other = type(stats)(**{**stats.__dict__, "figures": moved})
    misses = {row.figure.key for row in compare(stats, other) if not row.within_target}
    assert misses == {"pv_share", "length_mean"}


def test_a_log_without_valid_rows_is_a_dmqn_error(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(f"1,2,3,pv,{synth_module.WINDOW_START - 10}\n")
    with pytest.raises(DmqnError, match="no well-formed Taobao row"):
        log_statistics(log)
    with pytest.raises(DmqnError, match="not a file"):
        log_statistics(tmp_path / "missing.csv")


def test_small_scale_meets_the_targets_against_the_taobao_sample():
    synthetic = synthetic_log_statistics("small", seed=0)
    real = type(synthetic)(0, 0, 0, 0, 0, TAOBAO_84K)
    assert [row.figure.key for row in compare(real, synthetic) if not row.within_target] == []


@pytest.mark.skipif(not REAL_SAMPLE.exists(), reason=f"the real Taobao sample is not at {REAL_SAMPLE}")
def test_the_constants_are_what_the_real_sample_measures():
    stats = log_statistics(REAL_SAMPLE)
    assert stats.figures == pytest.approx(TAOBAO_84K, rel=1e-3)
    for name, value in generator_constants(REAL_SAMPLE).items():
        flat = np.ravel(value)  # ITEM_REPEAT is a pair of pairs
        assert np.ravel(getattr(synth_module, name)) == pytest.approx(flat, rel=1e-3), name


def cli_app() -> typer.Typer:
    # Two commands, so that Typer keeps the "synth" subcommand instead of collapsing into it.
    app = typer.Typer()
    app.command("synth")(synth)
    app.command("noop")(lambda: None)
    return app


def test_cli_compare_prints_a_table_that_fits_80_columns(tmp_path):
    log = hand_made_log(tmp_path / "log.csv")
    result = CliRunner().invoke(cli_app(), ["synth", "--compare", str(log), str(log)], terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "21 of 21 figures within target" in result.output
    row = next(line for line in lines if line.startswith("behaviors that are buy"))
    assert row.split()[-4:] == ["0.011", "0.011", "±0.05", "yes"]


def test_cli_compare_json_against_a_generated_log(tmp_path):
    log = hand_made_log(tmp_path / "log.csv")
    result = CliRunner().invoke(cli_app(), ["synth", "--compare", str(log), "--scale", "tiny", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["real"]["rows"] == 95 and doc["synthetic"]["users"] == 200
    assert doc["synthetic"]["log"] == "synth --scale tiny --seed 1"
    assert [f["key"] for f in doc["figures"]] == [f.key for f in FIGURES]
    assert doc["within_target"] == sum(f["within_target"] for f in doc["figures"])
    assert list(tmp_path.iterdir()) == [log]  # the generated log was temporary and elsewhere


def test_cli_synth_needs_an_output_and_json_needs_compare(tmp_path):
    result = CliRunner().invoke(cli_app(), ["synth"])
    assert result.exit_code == 1 and "give the CSV file to write" in result.output
    result = CliRunner().invoke(cli_app(), ["synth", str(tmp_path / "log.csv"), "--json"])
    assert result.exit_code == 1 and "--json goes with --compare" in result.output
    assert not (tmp_path / "log.csv").exists()
