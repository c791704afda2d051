"""``dmqn prep``: counts on real data, protocol invariants, bad input and atomic publishing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from dmqn_cli.prep import prep
from dmqn_core.data.prep import TAOBAO_TIME_RANGE, prepare
from dmqn_core.data.prep import pipeline as prep_pipeline
from dmqn_core.data.prepared import SPLITS, PreparedSet, list_prepared
from dmqn_core.errors import DmqnError
from dmqn_core.workspace import Workspace

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
TAOBAO_HEAD = SHARED / "taobao_userbehavior_head.csv"
ML_100K = SHARED / "ml-100k"
needs_shared = pytest.mark.skipif(
    not TAOBAO_HEAD.is_file() or not (ML_100K / "u.data").is_file(),
    reason="../shared/data (real Taobao head and MovieLens 100K) is not present",
)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws").ensure()


def leftovers(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.data_dir.iterdir()) if ws.data_dir.exists() else []


def synthetic_log(path: Path, users: int = 6, per_user: int = 30, bad_lines: tuple[str, ...] = ()) -> Path:
    """A small Taobao-format log: user u has per_user behaviors, every third one a purchase."""
    rows = []
    for u in range(1, users + 1):
        for k in range(per_user):
            item = 100 + (u * 7 + k * 3) % 40
            behavior = "buy" if k % 3 == 2 else "pv"
            rows.append(f"{u},{item},{item % 5},{behavior},{TAOBAO_TIME_RANGE[0] + 60 * k + u}")
    path.write_text("\n".join(rows + list(bad_lines)) + "\n", encoding="utf-8")
    return path


def check_invariants(ps: PreparedSet, click_names: list[str]) -> None:
    offsets = ps.user_offsets
    assert offsets[0] == 0 and np.all(np.diff(offsets) > 0)
    ts = np.asarray(ps.beh_timestamp)
    for u in range(1, ps.n_users + 1):  # sorted by time within each user
        assert np.all(np.diff(ts[offsets[u - 1] : offsets[u]]) >= 0)
    click_ids = [ps.behavior_names.index(n) + 1 for n in click_names if n in ps.behavior_names]
    beh_user = np.repeat(np.arange(1, ps.n_users + 1), np.diff(offsets))
    is_click = np.isin(ps.beh_behavior, click_ids)
    clicked = set(zip(beh_user[is_click].tolist(), np.asarray(ps.beh_item)[is_click].tolist()))
    last_ts: dict[str, np.ndarray] = {}
    for name in SPLITS:
        s = ps.split(name)
        assert len(s) > 0
        start, end = offsets[s.user - 1], offsets[s.user]
        # the history is a non-empty slice of the right user, strictly before the target
        assert np.all(s.hist_end > start) and np.all(s.hist_end <= end)
        assert np.all(ts[s.hist_end - 1] < s.timestamp)
        after = s.hist_end < end
        assert np.all(ts[s.hist_end[after]] >= s.timestamp[after])
        pos, neg = s.label == 1, s.label == 0
        ratio = ps.meta["protocol"]["neg_ratio"]
        assert neg.sum() == ratio * pos.sum()  # no user here clicked every item
        assert all((u, i) in clicked for u, i in zip(s.user[pos].tolist(), s.item[pos].tolist()))
        assert not any((u, i) in clicked for u, i in zip(s.user[neg].tolist(), s.item[neg].tolist()))
        assert np.array_equal(s.category[neg], ps.item_category[s.item[neg]])
        per_user_max = np.zeros(ps.n_users + 1, dtype=np.int64)
        np.maximum.at(per_user_max, s.user, s.timestamp)
        per_user_min = np.full(ps.n_users + 1, np.iinfo(np.int64).max)
        np.minimum.at(per_user_min, s.user, s.timestamp)
        last_ts[name] = (per_user_min, per_user_max)
    # time split: train <= valid <= test within every user
    assert np.all(last_ts["train"][1][1:] <= last_ts["valid"][0][1:])
    assert np.all(last_ts["valid"][1][1:] <= last_ts["test"][0][1:])
    assert np.all(np.bincount(ps.split("test").user[ps.split("test").label == 1])[1:] == 1)
    # vocabularies round-trip
    users = np.arange(1, ps.n_users + 1)
    assert np.array_equal(ps.user_index(ps.raw_user(users)), users)
    items = np.arange(1, ps.n_items + 1)
    assert np.array_equal(ps.item_index(ps.raw_item(items)), items)
    assert ps.item_popularity.sum() == len(ps.beh_item) and ps.item_popularity[0] == 0
    counts = ps.meta["counts"]
    assert counts["behaviors"] == len(ps.beh_item) and counts["users"] == ps.n_users


@needs_shared
def test_taobao_head_counts_and_invariants(ws: Workspace) -> None:
    result = prepare(TAOBAO_HEAD, "taobao", "tb", workspace=ws)
    counts = result.meta["counts"]
    with open(TAOBAO_HEAD, newline="") as fh:
        distinct_users = len({row[0] for row in csv.reader(fh)})
    assert counts["rows_read"] == 4321
    assert counts["rows_bad"]["out_of_time_range"] == 1 and sum(counts["rows_bad"].values()) == 1
    assert (
        counts["users"] + counts["users_dropped_min_behaviors"] + counts["users_dropped_few_clicks"] == distinct_users
    )
    ps = PreparedSet.open(result.path)
    check_invariants(ps, ["pv"])
    assert ps.behavior_names == ["buy", "cart", "fav", "pv"]
    assert result.meta["protocol"]["time_range"] == list(TAOBAO_TIME_RANGE)
    assert len(result.meta["source"]["sha256"]) == 64
    assert list_prepared(ws)[0][0] == "tb"


@needs_shared
def test_movielens_100k(ws: Workspace) -> None:
    result = prepare(ML_100K, "movielens", "ml", workspace=ws, neg_ratio=2, train_targets=5)
    counts = result.meta["counts"]
    assert result.meta["source"]["variant"] == "ml-100k"
    assert counts["rows_read"] == 100003 and sum(counts["rows_bad"].values()) == 0
    # 943 users plus the extra user 0, who has 3 ratings and falls under --min-behaviors
    assert counts["users"] + counts["users_dropped_min_behaviors"] + counts["users_dropped_few_clicks"] == 944
    ps = PreparedSet.open(result.path)
    assert ps.user_index([0])[0] == 0
    assert ps.behavior_names == ["click", "rate_low"]
    assert counts["categories"] <= 19
    check_invariants(ps, ["click"])


def test_determinism_and_seed(ws: Workspace, tmp_path: Path) -> None:
    log = synthetic_log(tmp_path / "log.csv")
    kw = dict(workspace=ws, min_behaviors=5, neg_ratio=3)
    a = PreparedSet.open(prepare(log, "taobao", "a", **kw).path)
    b = PreparedSet.open(prepare(log, "taobao", "b", threads=1, **kw).path)
    c = PreparedSet.open(prepare(log, "taobao", "c", seed=7, **kw).path)
    check_invariants(a, ["pv"])
    for name in SPLITS:
        for field in ("user", "item", "label", "hist_end"):
            assert np.array_equal(getattr(a.split(name), field), getattr(b.split(name), field))
    assert not np.array_equal(a.split("train").item, c.split("train").item)


def test_history_is_strictly_earlier_with_equal_timestamps(ws: Workspace, tmp_path: Path) -> None:
    t = TAOBAO_TIME_RANGE[0]
    rows = [f"1,{10 + k},1,pv,{t + (k // 2) * 10}" for k in range(12)]  # pairs share a timestamp
    log = tmp_path / "ties.csv"
    log.write_text("\n".join(rows) + "\n")
    ps = PreparedSet.open(
        prepare(log, "taobao", "ties", workspace=ws, min_behaviors=1, neg_ratio=0, valid_targets=1).path
    )
    for name in SPLITS:
        s = ps.split(name)
        assert np.all(ps.beh_timestamp[s.hist_end - 1] < s.timestamp)
        assert np.all(ps.beh_timestamp[s.hist_end] == s.timestamp)
    assert len(ps.split("train")) == 12 - 2 - 2  # the first two clicks have no history; 1 test, 1 valid


def test_max_len_cuts_history_at_read_time(ws: Workspace, tmp_path: Path) -> None:
    ps = PreparedSet.open(
        prepare(synthetic_log(tmp_path / "l.csv"), "taobao", "s", workspace=ws, min_behaviors=5, max_len=4).path
    )
    s = ps.split("test")
    window = ps.history(int(s.user[0]), int(s.hist_end[0]))
    assert window.stop - window.start == 4


def test_skipped_rows_are_counted_and_strict_fails(ws: Workspace, tmp_path: Path) -> None:
    bad = ("1,2,3", "x,2,3,pv,1511539300", "1,2,3,click,1511539300", "1,2,3,pv,soon", "1,2,3,pv,1400000000")
    log = tmp_path / "log.csv"
    synthetic_log(log, bad_lines=bad)
    with open(log, "ab") as fh:
        fh.write(b"1,\xff\xfe,3,pv,1511539300\n")
    counts = prepare(log, "taobao", "ok", workspace=ws, min_behaviors=5).meta["counts"]
    assert counts["rows_bad"] == {
        "bad_encoding": 1,
        "bad_columns": 1,
        "bad_id": 1,
        "bad_behavior": 1,
        "bad_timestamp": 1,
        "out_of_time_range": 1,
        "duplicate": 0,
    }
    assert counts["rows_read"] == 6 * 30 + 6
    with pytest.raises(DmqnError, match=r"--strict: line 181 of log.csv is bad_columns: '1,2,3'"):
        prepare(log, "taobao", "strict", workspace=ws, min_behaviors=5, strict=True)
    assert leftovers(ws) == ["ok"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (b"1,2,3\n4,5,6\n", "taobao expects 5 comma-separated columns, line 1 of log.csv has 3"),
        (b"a,b,c,pv,1511539300\n" * 5 + b"1,2,3,pv,1511539300\n" * 2, "mostly bad_id"),
        (b"1,2,3,like,1511539300\n" * 5, "no valid row, mostly bad_behavior"),
        (b"1,2,3,pv,1400000000\n" * 5, "check --time-range"),
        ("1,2,3,pv,1511539300\n".encode("utf-16"), "not UTF-8 text"),
        (b"1,2,3,pv,1511539300\n" * 3, "no user is left"),
    ],
)
def test_bad_files(ws: Workspace, tmp_path: Path, content: bytes, message: str) -> None:
    log = tmp_path / "log.csv"
    log.write_bytes(content)
    with pytest.raises(DmqnError, match=message):
        prepare(log, "taobao", "bad", workspace=ws)
    assert leftovers(ws) == []


def test_missing_source_and_existing_set(ws: Workspace, tmp_path: Path) -> None:
    with pytest.raises(DmqnError, match="does not exist"):
        prepare(tmp_path / "nope.csv", "taobao", "x", workspace=ws)
    with pytest.raises(DmqnError, match="not a MovieLens folder"):
        prepare(tmp_path, "movielens", "x", workspace=ws)
    log = synthetic_log(tmp_path / "log.csv")
    prepare(log, "taobao", "x", workspace=ws, min_behaviors=5)
    with pytest.raises(DmqnError, match="already exists"):
        prepare(log, "taobao", "x", workspace=ws, min_behaviors=5)
    prepare(log, "taobao", "x", workspace=ws, min_behaviors=5, overwrite=True, seed=3)
    assert PreparedSet.open(ws.dataset_path("x")).meta["protocol"]["seed"] == 3
    assert leftovers(ws) == ["x"]


def test_killed_writer_publishes_nothing(ws: Workspace, tmp_path: Path, monkeypatch) -> None:
    log = synthetic_log(tmp_path / "log.csv")
    original = prep_pipeline.write_set

    def dying_write(ctx, names):
        original(ctx, names)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep_pipeline, "write_set", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(log, "taobao", "k", workspace=ws, min_behaviors=5)
    assert leftovers(ws) == []


def test_stale_temporary_of_dead_writer_is_removed(ws: Workspace, tmp_path: Path) -> None:
    stale = ws.data_dir / ".k.tmp-999999999"
    (stale / "behaviors").mkdir(parents=True)
    prepare(synthetic_log(tmp_path / "log.csv"), "taobao", "k", workspace=ws, min_behaviors=5)
    assert leftovers(ws) == ["k"]


def _movielens_folder(root: Path, variant: str) -> Path:
    root.mkdir()
    t0 = 978300000
    ratings = [
        (u, m, 5 if (u + m + k) % 3 else 2, t0 + 100 * k + u)
        for u in (1, 2, 3)
        for k, m in enumerate([1, 2, 3, 4, 5, 6, 1, 2, 3, 4])
    ]
    if variant == "1m":
        (root / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ratings))
        movies = [
            "1::Toy Story (1995)::Animation|Children's|Comedy",
            "2::Amélie (2001)::Comedy|Romance",
            "3::Heat (1995)::Action|Crime|Thriller",
            "4::Stalker (1979)::Sci-Fi",
            "5::Foo (2000)::Children|Drama",
            "6::Bar (2001)::Zeitgeist",
        ]
        (root / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    else:
        (root / "ratings.csv").write_text(
            "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r - 0.5},{t}\n" for u, m, r, t in ratings)
        )
        movies = [
            '1,"Toy Story, the (1995)",Animation|Children|Comedy',
            "2,Amélie (2001),Comedy|Romance",
            "3,Heat (1995),Action|Crime|Thriller",
            "4,Stalker (1979),(no genres listed)",
            "5,Foo (2000),IMAX",
            "6,Bar (2001),Drama",
        ]
        (root / "movies.csv").write_text("movieId,title,genres\n" + "\n".join(movies))
    return root


@pytest.mark.parametrize(
    "variant, categories",
    [
        ("1m", {1: 3, 2: 5, 3: 1, 4: 15, 5: 4, 6: 21}),
        ("latest", {1: 3, 2: 5, 3: 1, 4: 20, 5: 19, 6: 8}),
    ],
)
def test_movielens_1m_and_latest(ws: Workspace, tmp_path: Path, variant: str, categories: dict) -> None:
    folder = _movielens_folder(tmp_path / f"ml-{variant}", variant)
    result = prepare(folder, "movielens", variant, workspace=ws, min_behaviors=3, neg_ratio=0)
    ps = PreparedSet.open(result.path)
    assert result.meta["counts"]["rows_read"] == 30 and ps.n_users == 3
    raw_items = ps.raw_item(np.arange(1, ps.n_items + 1))
    got = dict(zip(raw_items.tolist(), ps.raw_category(ps.item_category[1:]).tolist()))
    assert got == {k: v for k, v in categories.items() if k in got}


def test_csv_format_with_column_mapping(ws: Workspace, tmp_path: Path) -> None:
    lines = ["when;who;what;kind"]
    for u in (5, 9):
        for k in range(8):
            lines.append(f"2020-01-0{1 + k % 8}T10:0{k}:00;{u};{300 + k};{'view' if k % 2 else 'like'}")
    log = tmp_path / "log.txt"
    log.write_text("\n".join(lines) + "\n")
    cols = {"user": "who", "item": "what", "timestamp": "when", "behavior": "kind"}
    result = prepare(
        log,
        "csv",
        "c",
        workspace=ws,
        columns=cols,
        delimiter=";",
        min_behaviors=3,
        click_behaviors=["view"],
        neg_ratio=0,
    )
    ps = PreparedSet.open(result.path)
    assert ps.n_users == 2 and ps.behavior_names == ["like", "view"]
    assert ps.beh_timestamp[0] == 1577872800  # 2020-01-01T10:00:00Z
    assert ps.n_categories == 1
    with pytest.raises(DmqnError, match="no such column"):
        prepare(log, "csv", "d", workspace=ws, columns={**cols, "user": "nobody"}, delimiter=";")
    with pytest.raises(DmqnError, match="is not a behavior"):
        prepare(log, "csv", "d", workspace=ws, columns=cols, delimiter=";", click_behaviors=["buy"])
    assert leftovers(ws) == ["c"]


def test_prepared_set_open_errors(ws: Workspace, tmp_path: Path) -> None:
    with pytest.raises(DmqnError, match="no prepared set"):
        PreparedSet.open(tmp_path / "missing")
    path = prepare(synthetic_log(tmp_path / "log.csv"), "taobao", "p", workspace=ws, min_behaviors=5).path
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DmqnError, match="format_version 99"):
        PreparedSet.open(path)
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "samples" / "test_label.npy").unlink()
    with pytest.raises(DmqnError, match="incomplete: samples/test_label.npy"):
        PreparedSet.open(path)


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("prep")(prep)
    app.command("other")(lambda: None)
    return app


def test_cli_success_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    log = synthetic_log(tmp_path / "log.csv")
    ws = str(tmp_path / "ws")
    ok = runner.invoke(
        _cli(), ["prep", str(log), "--format", "taobao", "--out", "s", "--workspace", ws, "--min-behaviors", "5"]
    )
    assert ok.exit_code == 0, ok.output
    assert "rows read" in ok.output and "samples train" in ok.output
    again = runner.invoke(_cli(), ["prep", str(log), "--format", "taobao", "--out", "s", "--workspace", ws])
    assert again.exit_code == 1 and "already exists" in again.output
    assert len(again.output.strip().splitlines()) == 1
    (tmp_path / "empty.csv").write_text("")
    empty = runner.invoke(_cli(), ["prep", str(tmp_path / "empty.csv"), "-f", "taobao", "-o", "e", "-w", ws])
    assert empty.exit_code == 1 and "is empty" in empty.output
    unknown = runner.invoke(_cli(), ["prep", str(log), "--format", "parquet", "--out", "u", "-w", ws])
    assert unknown.exit_code == 2
    bad_range = runner.invoke(
        _cli(), ["prep", str(log), "-f", "taobao", "-o", "r", "-w", ws, "--time-range", "tomorrow,later"]
    )
    assert bad_range.exit_code == 1 and "--time-range" in bad_range.output
    assert sorted(p.name for p in (tmp_path / "ws" / "data").iterdir()) == ["s"]


def test_line_numbers_in_messages_skip_undecodable_lines(ws: Workspace, tmp_path: Path) -> None:
    # Rejected (undecodable) lines are not rows of DuckDB's table; messages still give file lines.
    t_out = 1400000000
    lines = [
        b"1,\xff,3,pv,1511539300",
        b"1,2,3,pv,1511539300",
        b"2,\xfe,3,pv,1511539300",
        f"1,2,3,pv,{t_out}".encode(),
        f"1,2,3,pv,{t_out}".encode(),
        f"1,2,3,pv,{t_out}".encode(),
        f"1,2,3,pv,{t_out}".encode(),
    ]
    log = tmp_path / "log.csv"
    log.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DmqnError, match=r"mostly out_of_time_range \(4\), e\.g\. line 4 of log\.csv has timestamp"):
        prepare(log, "taobao", "x", workspace=ws)
    with pytest.raises(DmqnError, match=r"--strict: line 1 of log\.csv is not valid UTF-8 \(6 bad row"):
        prepare(log, "taobao", "x", workspace=ws, strict=True)


def test_memory_limit_setting() -> None:
    from dmqn_core.data.prep import MEMORY_FRACTION, memory_limit_setting

    default = memory_limit_setting(None)
    assert default.endswith("MB") or default == "4GB"
    half = memory_limit_setting("50%")
    if default.endswith("MB"):
        assert int(half[:-2]) == pytest.approx(int(default[:-2]) * 0.5 / MEMORY_FRACTION, rel=0.01)
    assert memory_limit_setting(" 3GB ") == "3GB"
    for bad in ("lots%", "0%", "150%"):
        with pytest.raises(DmqnError, match="--memory-limit"):
            memory_limit_setting(bad)


def test_temp_dir_holds_the_work_and_is_emptied(ws: Workspace, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    stale = scratch / ".dmqn-prep-t.tmp-999999999"  # left by a killed run
    stale.mkdir()
    log = synthetic_log(tmp_path / "log.csv")
    reports: list[float] = []
    a = prepare(
        log,
        "taobao",
        "t",
        workspace=ws,
        min_behaviors=5,
        temp_dir=scratch,
        memory_limit="25%",
        threads=1,
        on_progress=reports.append,
    )
    assert list(scratch.iterdir()) == []
    b = prepare(log, "taobao", "u", workspace=ws, min_behaviors=5)
    for name in SPLITS:
        assert np.array_equal(PreparedSet.open(a.path).split(name).item, PreparedSet.open(b.path).split(name).item)
    assert all(0 <= p <= 100 for p in reports)
    with pytest.raises(DmqnError, match="--temp-dir .* is not a directory"):
        prepare(log, "taobao", "v", workspace=ws, temp_dir=tmp_path / "missing")
    with pytest.raises(DmqnError, match="check --memory-limit"):
        prepare(log, "taobao", "v", workspace=ws, memory_limit="plenty")
    assert leftovers(ws) == ["t", "u"]


def test_cli_resource_flags(tmp_path: Path) -> None:
    log = synthetic_log(tmp_path / "log.csv")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ok = CliRunner().invoke(
        _cli(),
        [
            "prep",
            str(log),
            "-f",
            "taobao",
            "-o",
            "s",
            "-w",
            str(tmp_path / "ws"),
            "--min-behaviors",
            "5",
            "--memory-limit",
            "30%",
            "--threads",
            "1",
            "--temp-dir",
            str(scratch),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert list(scratch.iterdir()) == []
    bad = CliRunner().invoke(
        _cli(), ["prep", str(log), "-f", "taobao", "-o", "t", "-w", str(tmp_path / "ws"), "--memory-limit", "x%"]
    )
    assert bad.exit_code == 1 and "--memory-limit" in bad.output
