"""Issue 23, items 4, 6 and 7: text from users and logs never acts on the terminal, settings that would
fail deep inside training are refused in one line before a run exists, and timestamps are as strict as ids.

A name like ``e<ESC>[2J<ESC>]0;T<BEL>`` clears the screen and retitles the window when printed raw;
every command shows it escaped (``e\\x1b[2J...``), piped or not, and refuses it where it would become
a folder name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest
import torch
from conftest import tiny_set_workspace
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_cli.progress import RichProgress
from dmqn_core.data.prep import TAOBAO_TIME_RANGE, prepare
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError, has_unsafe_characters, printable
from dmqn_core.runs.store import RunStore
from dmqn_core.training.train import _out_of_memory, read_config_file, train
from dmqn_core.workspace import Workspace

HOSTILE = "e\x1b[2J\x1b]0;T\x07"
SMALL = {"embed_dim": 8, "mlp_hidden": [16]}
QUICK = {"epochs": 1, "max_len": 50, "batch_size": 256, "inspect_users": 0}
runner = CliRunner()


def assert_no_raw_controls(text: str) -> None:
    """No character a terminal acts on, except the newlines between lines of output."""
    assert not has_unsafe_characters(text.replace("\n", "")), repr(text)


def one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return tiny_set_workspace(tmp_path_factory.mktemp("hardening") / "ws")


def run_dirs(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.runs_dir.iterdir())


# -- item 4: one sanitiser for what reaches a terminal -------------------------------------------


def test_printable_escapes_what_a_terminal_acts_on_and_keeps_the_rest() -> None:
    assert printable(HOSTILE) == "e\\x1b[2J\\x1b]0;T\\x07"
    assert printable("a\nb\tc\rd\x7f\x9b") == "a\\nb\\tc\\rd\\x7f\\x9b"
    # Bidirectional overrides reorder a line; a lone surrogate (an undecodable byte of a file name) breaks UTF-8.
    assert printable("x\u202ey\u2066z\udcff") == "x\\u202ey\\u2066z\\udcff"
    plain = "Ünïcode 日本 [red]x[/] \\x1b path/to/file.csv"
    assert printable(plain) == plain
    assert printable(printable(HOSTILE)) == printable(HOSTILE)


def test_a_set_named_with_control_characters_is_refused_before_it_becomes_a_folder(ws: Workspace) -> None:
    log = ws.root / "tiny.csv"
    before = sorted(p.name for p in ws.data_dir.iterdir())
    for name in (HOSTILE, "tab\tname", "new\nline", f"{ws.root}/sub/{HOSTILE}"):
        result = runner.invoke(app, ["prep", str(log), "--format", "taobao", "--out", name, "-w", str(ws.root)])
        line = one_line_error(result)
        assert "control characters" in line
        assert_no_raw_controls(result.output)
    assert sorted(p.name for p in ws.data_dir.iterdir()) == before
    assert not (ws.root / "sub").exists()


def test_names_read_from_a_run_store_are_escaped_in_tables_csv_and_errors(ws: Workspace) -> None:
    run_id = train(ws, "tiny", "din-short", SMALL, QUICK).run_id
    with duckdb.connect(str(ws.store_path)) as con:  # what a crafted or shared run store may hold
        con.execute("UPDATE runs SET dataset = ?, error = ? WHERE run_id = ?", [HOSTILE, HOSTILE, run_id])
    try:
        for args in (["runs"], ["runs", "--wide"], ["runs", "--csv"], ["runs", "show", run_id]):
            result = runner.invoke(app, [*args, "-w", str(ws.root)])
            assert result.exit_code == 0, result.output
            assert "e\\x1b[2J" in result.output
            assert_no_raw_controls(result.output)
        # JSON keeps the exact value, escaped by JSON itself.
        result = runner.invoke(app, ["runs", "--json", "-w", str(ws.root)])
        assert result.exit_code == 0
        assert "\x1b" not in result.output
        assert HOSTILE in [run["dataset"] for run in json.loads(result.output)]
    finally:
        with duckdb.connect(str(ws.store_path)) as con:
            con.execute("UPDATE runs SET dataset = 'tiny', error = NULL WHERE run_id = ?", [run_id])


def test_a_bad_row_quoted_under_strict_and_behavior_names_listed_in_an_error_are_escaped(
    ws: Workspace, tmp_path: Path
) -> None:
    t0 = TAOBAO_TIME_RANGE[0]
    rows = [f"{u},{100 + k},{k % 3},pv,{t0 + 60 * k + u}" for u in range(1, 6) for k in range(12)]
    log = tmp_path / "strict.csv"
    log.write_text("\n".join([*rows[:20], f"1,2,3,p\x1b[2Jv,{t0}", *rows[20:]]) + "\n")
    result = runner.invoke(
        app, ["prep", str(log), "--format", "taobao", "--out", "strict", "--strict", "-w", str(ws.root)]
    )
    assert "bad_behavior" in one_line_error(result) and "p\\x1b[2Jv" in result.output
    assert_no_raw_controls(result.output)

    csv_log = tmp_path / "behaviors.csv"
    lines = ["user,item,ts,kind"] + [
        f"{u},{100 + k},{t0 + 60 * k + u},{HOSTILE if k % 2 else 'click'}" for u in range(1, 6) for k in range(12)
    ]
    csv_log.write_text("\n".join(lines) + "\n")
    columns = "user=user,item=item,timestamp=ts,behavior=kind"
    result = runner.invoke(
        app,
        ["prep", str(csv_log), "--format", "csv", "--out", "behaviors", "--columns", columns]
        + ["--click-behaviors", "buy", "-w", str(ws.root)],
    )
    assert "--click-behaviors" in one_line_error(result) and "e\\x1b[2J" in result.output
    assert_no_raw_controls(result.output)


def test_progress_descriptions_and_lines_are_escaped() -> None:
    with RichProgress() as progress:
        progress.start(f"reading {HOSTILE}", None)
        progress.advance(1, name=HOSTILE)
        (task,) = progress._progress.tasks
        assert task.description == f"reading {printable(HOSTILE)}"
        assert task.fields["info"] == f"name {printable(HOSTILE)}"


# -- item 6: settings that would fail deep inside training, refused before the run exists --------


def test_max_len_beyond_int64_is_one_line_and_leaves_no_run(ws: Workspace) -> None:
    runs_before, dirs_before = len(RunStore(ws.store_path).list_runs()), run_dirs(ws)
    for flag, value in (("--max-len", "99999999999999999999"), ("--seed", str(2**64))):
        result = runner.invoke(app, ["train", "tiny", "--model", "din-short", flag, value, "-w", str(ws.root)])
        assert "64-bit integer" in one_line_error(result)
    assert len(RunStore(ws.store_path).list_runs()) == runs_before and run_dirs(ws) == dirs_before


def test_a_model_too_large_for_memory_is_refused_before_the_run_exists(ws: Workspace) -> None:
    runs_before, dirs_before = len(RunStore(ws.store_path).list_runs()), run_dirs(ws)
    for model in ("din-short", "dmqn", "pop"):
        result = runner.invoke(
            app, ["train", "tiny", "--model", model, "--embed-dim", "1099511627776", "-w", str(ws.root)]
        )
        if model == "pop":  # nothing the size of the embeddings to allocate: it trains
            assert result.exit_code == 0, result.output
            continue
        assert "memory" in one_line_error(result)
    assert len(RunStore(ws.store_path).list_runs()) == runs_before + 1
    assert len(run_dirs(ws)) == len(dirs_before) + 1


def test_allocation_failures_are_recognised_as_out_of_memory() -> None:
    assert _out_of_memory(MemoryError())
    assert _out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    )
    assert _out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not _out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_meta_json_whose_max_len_is_not_a_positive_integer_is_one_line(ws: Workspace, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ws.data_dir / "tiny", copy)
    meta = json.loads((copy / "meta.json").read_text())
    for bad in ("200", 2.5, True, 0, 2**63, None):
        meta["protocol"]["max_len"] = bad
        (copy / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(DmqnError, match="protocol.max_len must be a positive integer"):
            PreparedSet.open(copy)
        result = runner.invoke(app, ["train", str(copy), "--model", "din-short", "-w", str(ws.root)])
        assert "protocol.max_len" in one_line_error(result)


def test_a_binary_config_file_is_one_line(ws: Workspace, tmp_path: Path) -> None:
    binary = tmp_path / "model.toml"
    binary.write_bytes(b"[model]\nembed_dim = 8\n\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00\xff")
    with pytest.raises(DmqnError, match="not UTF-8 text"):
        read_config_file(binary)
    result = runner.invoke(app, ["train", "tiny", "--config", str(binary), "-w", str(ws.root)])
    assert "not valid TOML" in one_line_error(result)


# -- item 7: timestamps follow the ids' rule -------------------------------------------------------


def test_timestamps_that_are_not_decimal_integers_are_bad_rows_not_rounded(ws: Workspace, tmp_path: Path) -> None:
    t0 = TAOBAO_TIME_RANGE[0]
    rows = [
        f"{u},{100 + k},{k % 3},{'buy' if k % 3 == 2 else 'pv'},{t0 + 60 * k + u}"
        for u in range(1, 6)
        for k in range(12)
    ]
    weird = [f"{t0}.7", "1.5e9", "0x5A1A0000", f"{t0 // 1000}_{t0 % 1000:03d}", f"{t0}s", "99999999999999999999"]
    log = tmp_path / "times.csv"
    log.write_text("\n".join(rows + [f"1,150,1,pv,{t}" for t in weird] + [f"2,151,1,pv, {t0 + 7}\r"]) + "\n")
    result = prepare(log, "taobao", "times", workspace=ws, min_behaviors=5, neg_ratio=0, overwrite=True)
    counts = result.meta["counts"]
    assert counts["rows_bad"]["bad_timestamp"] == len(weird)
    assert counts["rows_used"] == len(rows) + 1  # surrounding blanks and a CRLF's CR are not errors
    with pytest.raises(DmqnError, match=r"--strict: .*bad_timestamp"):
        prepare(log, "taobao", "times-strict", workspace=ws, min_behaviors=5, neg_ratio=0, strict=True)

    csv_log = tmp_path / "times-iso.csv"
    lines = ["user,item,ts"] + [f"{u},{100 + k},{t0 + 60 * k + u}" for u in range(1, 6) for k in range(12)]
    lines += ["1,160,2017-11-25T10:00:00Z", "1,161,1e9", f"1,162,{t0}.5"]
    csv_log.write_text("\n".join(lines) + "\n")
    result = prepare(
        csv_log,
        "csv",
        "times-csv",
        workspace=ws,
        columns={"user": "user", "item": "item", "timestamp": "ts"},
        min_behaviors=5,
        neg_ratio=0,
    )
    assert result.meta["counts"]["rows_bad"]["bad_timestamp"] == 2  # the ISO date-time is still a time
