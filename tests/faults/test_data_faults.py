"""Data preparation under faults: `--out` names that would reach the workspace or a user's folder,
ids that are not integers, damaged gzip sources, duplicated rows, the set's fingerprint, and
interrupts, long names, a read-only workspace and a damaged meta.json.

Every failure the user can cause must be one DmqnError line (exit 1; 130 for an interrupt) that
leaves no set and no temporary directory behind, and nothing but the tool's own output is ever
deleted.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.data import prepared as prepared_module
from dmqn_core.data.formats import reading as format_reading
from dmqn_core.data.prep import TAOBAO_TIME_RANGE, prepare
from dmqn_core.data.prepared import FORMAT_MARKER, META_KEYS, PreparedSet, fingerprint_of
from dmqn_core.data.synth import write_log
from dmqn_core.errors import DmqnError
from dmqn_core.workspace import Workspace, publish_directory, remove_stale_temporaries

REPO = Path(__file__).resolve().parents[2]
QUICK = {"min_behaviors": 5, "train_targets": 3}
DEAD_PID = 999_999_999  # above any pid_max: never a live process


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws").ensure()


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory) -> Path:
    log = tmp_path_factory.mktemp("log") / "tiny.csv"
    write_log(log, "tiny", seed=5)
    return log


def entries(ws: Workspace) -> list[str]:
    """Everything in data/, hidden temporaries included."""
    return sorted(p.name for p in ws.data_dir.iterdir())


def set_arrays(path: Path) -> dict[str, np.ndarray]:
    return {str(f.relative_to(path)): np.load(f) for f in sorted(path.rglob("*.npy"))}


def one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


# -- item 2: what --out and --overwrite may touch ---------------------------------------------


def test_out_naming_the_workspace_its_data_or_a_folder_above_it_is_refused(
    ws: Workspace, tiny_log: Path, tmp_path: Path, monkeypatch
) -> None:
    prepare(tiny_log, "taobao", "keep", workspace=ws, **QUICK)
    (tmp_path / "mine.txt").write_text("a file next to the workspace")
    # '' named data/ itself: `--out "" --overwrite` replaced the whole data folder.
    for out in ("", "  "):
        with pytest.raises(DmqnError, match="must not be empty or blank"):
            prepare(tiny_log, "taobao", out, workspace=ws, overwrite=True, **QUICK)
    for out, message in (
        (str(ws.root), "is the workspace .* itself"),
        (str(ws.data_dir), "is the workspace's data folder"),
        (str(tmp_path), "a folder holding the workspace"),
        ("/", "a folder holding the workspace"),
    ):
        with pytest.raises(DmqnError, match=message):
            prepare(tiny_log, "taobao", out, workspace=ws, overwrite=True, **QUICK)
    monkeypatch.chdir(ws.data_dir)
    with pytest.raises(DmqnError, match="is the workspace's data folder"):
        prepare(tiny_log, "taobao", ".", workspace=ws, overwrite=True, **QUICK)
    with pytest.raises(DmqnError, match="is the workspace .* itself"):
        prepare(tiny_log, "taobao", "..", workspace=ws, overwrite=True, **QUICK)
    assert entries(ws) == ["keep"] and PreparedSet.open(ws.dataset_path("keep")).n_users > 0
    assert (tmp_path / "mine.txt").read_text() == "a file next to the workspace"

    result = CliRunner().invoke(
        app, ["prep", str(tiny_log), "--format", "taobao", "--out", "", "--overwrite", "--workspace", str(ws.root)]
    )
    assert "must not be empty or blank" in one_line_error(result)
    assert entries(ws) == ["keep"]


def test_overwrite_replaces_only_a_prepared_set(ws: Workspace, tiny_log: Path, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    monkeypatch.chdir(folder)
    # `--out . --overwrite` inside a folder deleted that folder's files.
    with pytest.raises(
        DmqnError, match=f"^{re.escape(str(folder))} exists and is not a prepared set; refusing to replace it$"
    ):
        prepare(tiny_log, "taobao", ".", workspace=ws, overwrite=True, **QUICK)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]

    lookalike = ws.data_dir / "lookalike"
    lookalike.mkdir()
    (lookalike / "meta.json").write_text(json.dumps({"name": "lookalike", "protocol": {}}))
    (ws.data_dir / "file").write_text("not a folder")
    for name in ("lookalike", "file"):
        with pytest.raises(DmqnError, match="is not a prepared set; refusing to replace it"):
            prepare(tiny_log, "taobao", name, workspace=ws, overwrite=True, **QUICK)
    assert (lookalike / "meta.json").is_file() and (ws.data_dir / "file").read_text() == "not a folder"

    # A set made before meta.json had its format marker is still recognised by its keys and arrays.
    old = prepare(tiny_log, "taobao", "old", workspace=ws, **QUICK).path
    meta = json.loads((old / "meta.json").read_text())
    assert meta["format"] == FORMAT_MARKER
    del meta["format"], meta["fingerprint"]
    (old / "meta.json").write_text(json.dumps(meta))
    replaced = prepare(tiny_log, "taobao", "old", workspace=ws, overwrite=True, seed=4, **QUICK)
    assert replaced.meta["protocol"]["seed"] == 4
    assert entries(ws) == ["file", "lookalike", "old"]


def test_publish_directory_replaces_only_what_it_is_told_it_may(tmp_path: Path) -> None:
    new, final = tmp_path / ".x.tmp-1", tmp_path / "x"
    new.mkdir()
    final.mkdir()
    (final / "precious").write_text("keep")
    with pytest.raises(DmqnError, match="exists and is not a thing of ours; refusing to replace it"):
        publish_directory(new, final, True, replaceable=lambda path: False, what="a thing of ours")
    assert (final / "precious").read_text() == "keep" and new.is_dir()
    publish_directory(new, final, True, replaceable=lambda path: True, what="a thing of ours")
    assert list(final.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_stale_cleanup_deletes_only_the_tools_leftovers(ws: Workspace, tiny_log: Path) -> None:
    foreign_tmp = ws.data_dir / f".k.tmp-{DEAD_PID}"
    foreign_tmp.mkdir()
    (foreign_tmp / "notes.txt").write_text("mine")
    foreign_old = ws.data_dir / f".k.old-{DEAD_PID}"
    (foreign_old / "photos").mkdir(parents=True)
    own_tmp = ws.data_dir / f".k.tmp-{DEAD_PID - 1}"  # what a killed prep leaves
    (own_tmp / "behaviors").mkdir(parents=True)
    np.save(own_tmp / "behaviors" / "item.npy", np.arange(3, dtype=np.int32))
    (own_tmp / ".work" / "spill").mkdir(parents=True)
    (own_tmp / ".work" / "prep.duckdb").write_bytes(b"")
    prepare(tiny_log, "taobao", "k", workspace=ws, **QUICK)
    assert entries(ws) == [foreign_old.name, foreign_tmp.name, "k"]
    assert (foreign_tmp / "notes.txt").read_text() == "mine" and (foreign_old / "photos").is_dir()

    # A set moved aside by an overwrite that was killed is put back (a foreign folder never is).
    moved = ws.data_dir / f".m.old-{DEAD_PID}"
    ws.dataset_path("k").rename(moved)
    with pytest.raises(DmqnError, match="already exists"):
        prepare(tiny_log, "taobao", "m", workspace=ws, **QUICK)
    assert PreparedSet.open(ws.dataset_path("m")).n_users > 0 and not moved.exists()

    # Only a recogniser decides: without one, nothing is touched by its name.
    with pytest.raises(TypeError):
        remove_stale_temporaries(ws.data_dir, "k")  # type: ignore[call-arg]


# -- item 5: ids must be decimal integers -------------------------------------------------------


def test_non_integer_ids_are_bad_rows_not_rounded(ws: Workspace, tmp_path: Path) -> None:
    t0 = TAOBAO_TIME_RANGE[0]
    lines, kept = [], {}
    for u in range(1, 9):
        for k in range(30):
            item = 100 + (u * 7 + k * 3) % 40
            behavior = "buy" if k % 3 == 2 else "pv"
            # Every 7th row's user id is 'u.5', which DuckDB's cast rounded to the next user.
            user = f"{u}.5" if len(lines) % 7 == 6 else (f" +{u} " if k == 0 else str(u))
            if "." not in user:
                kept[u] = kept.get(u, 0) + 1
            lines.append(f"{user},{item},{item % 5},{behavior},{t0 + 60 * k + u}")
    n_halves = sum("." in line.split(",")[0] for line in lines)
    weird = [
        "1e3,101,1,pv",
        "0x10,101,1,pv",
        "bad_id,101,1,pv",
        "1_000,101,1,pv",
        "1,1e2,1,pv",
        "1,3056199.7,1,pv",
        "1,0b11,1,pv",
        "1,101,0x1,pv",
        "1,101,1.0,pv",
        "99999999999999999999,101,1,pv",
    ]
    lines += [f"{row},{t0 + 30}" for row in weird]
    log = tmp_path / "ids.csv"
    log.write_text("\n".join(lines) + "\n")

    result = prepare(log, "taobao", "ids", workspace=ws, min_behaviors=5, neg_ratio=0)
    counts = result.meta["counts"]
    assert counts["rows_bad"]["bad_id"] == n_halves + len(weird)
    assert counts["rows_used"] == sum(kept.values())
    ps = PreparedSet.open(result.path)
    assert ps.raw_user(np.arange(1, ps.n_users + 1)).tolist() == list(range(1, 9))  # no 1000, no 16
    per_user = np.diff(ps.user_offsets)
    assert dict(zip(range(1, 9), per_user.tolist())) == kept  # no user got another's rows
    assert set(ps.raw_item(np.arange(1, ps.n_items + 1)).tolist()) <= set(range(100, 140))
    with pytest.raises(DmqnError, match=r"--strict: line 7 of ids\.csv is bad_id: '1\.5,"):
        prepare(log, "taobao", "strict", workspace=ws, min_behaviors=5, strict=True)


def test_non_integer_ids_in_a_csv_log_are_bad_rows(ws: Workspace, tmp_path: Path) -> None:
    lines = ["user;item;cat;when"]
    for u in (5, 9):
        for k in range(8):
            lines.append(f"{u};{300 + k};{k % 2};{1577872800 + 60 * k}")
    lines += ["5.5;300;0;1577872900", "5;3e2;0;1577872900", "5;300;0x1;1577872900"]
    log = tmp_path / "log.txt"
    log.write_text("\n".join(lines) + "\n")
    counts = prepare(
        log,
        "csv",
        "c",
        workspace=ws,
        delimiter=";",
        min_behaviors=3,
        neg_ratio=0,
        columns={"user": "user", "item": "item", "category": "cat", "timestamp": "when"},
    ).meta["counts"]
    assert counts["rows_bad"]["bad_id"] == 3 and counts["rows_used"] == 16


# -- item 6: damaged gzip sources ------------------------------------------------------------


def _damage(data: bytes, how: str) -> bytes:
    if how == "flipped":
        damaged = bytearray(data)
        damaged[len(data) // 2] ^= 0xFF
        return bytes(damaged)
    if how == "truncated":
        return data[: len(data) // 2]
    damaged = bytearray(data)
    damaged[-8] ^= 0xFF  # the trailer's CRC-32: the data inflate cleanly, the check fails
    return bytes(damaged)


@pytest.mark.parametrize("head_bytes", [None, 1 << 16], ids=["damage-in-head", "damage-after-head"])
@pytest.mark.parametrize(
    "how, reason",
    [
        ("flipped", "CRC check failed|corrupt data"),
        ("truncated", r"it ends early \(truncated\?\)"),
        ("crc", "CRC check failed"),
    ],
)
def test_damaged_gzip_fails_in_one_line(
    ws: Workspace, tiny_log: Path, tmp_path: Path, monkeypatch, how: str, reason: str, head_bytes: int | None
) -> None:
    if head_bytes:
        # The format check reads the first MiB, all of the tiny log: make the damage lie beyond it,
        # where only the full decompression beside DuckDB's work (or DuckDB's own error) finds it.
        monkeypatch.setattr(format_reading, "_HEAD_BYTES", head_bytes)
    source = tmp_path / "log.csv.gz"
    source.write_bytes(_damage(gzip.compress(tiny_log.read_bytes(), 6), how))
    with pytest.raises(DmqnError, match=f"^{re.escape(str(source))} is a damaged gzip file: ({reason})$"):
        prepare(source, "taobao", "gz", workspace=ws, **QUICK)
    assert entries(ws) == []


def test_gzip_is_known_by_its_bytes_not_its_name(ws: Workspace, tiny_log: Path, tmp_path: Path) -> None:
    plain_named_gz = tmp_path / "plain.csv.gz"
    plain_named_gz.write_bytes(tiny_log.read_bytes())
    with pytest.raises(
        DmqnError,
        match=f"^{re.escape(str(plain_named_gz))} is not gzip, although its name "
        r"ends in \.gz$",
    ):
        prepare(plain_named_gz, "taobao", "p", workspace=ws, **QUICK)
    result = CliRunner().invoke(app, ["prep", str(plain_named_gz), "-f", "taobao", "-o", "p", "-w", str(ws.root)])
    assert "is not gzip" in one_line_error(result)
    assert entries(ws) == []

    gz_named_csv = tmp_path / "packed.csv"
    gz_named_csv.write_bytes(gzip.compress(tiny_log.read_bytes()))
    a = prepare(tiny_log, "taobao", "plain", workspace=ws, **QUICK)
    b = prepare(gz_named_csv, "taobao", "packed", workspace=ws, **QUICK)
    assert b.meta["counts"] == a.meta["counts"]
    assert all(np.array_equal(x, y) for x, y in zip(set_arrays(a.path).values(), set_arrays(b.path).values()))
    assert b.meta["source"]["sha256"] == hashlib.sha256(gz_named_csv.read_bytes()).hexdigest()


# -- item 7: duplicate rows ----------------------------------------------------------------


def test_a_log_concatenated_to_itself_gives_the_same_set(ws: Workspace, tiny_log: Path, tmp_path: Path) -> None:
    doubled = tmp_path / "doubled.csv"
    doubled.write_bytes(tiny_log.read_bytes() * 2)
    once = prepare(tiny_log, "taobao", "once", workspace=ws, **QUICK)
    twice = prepare(doubled, "taobao", "twice", workspace=ws, **QUICK)
    rows = once.meta["counts"]["rows_read"]
    assert twice.meta["counts"]["rows_read"] == 2 * rows
    # The synthetic log itself repeats a few rows exactly (same second, item and behavior).
    assert twice.meta["counts"]["rows_bad"]["duplicate"] == once.meta["counts"]["rows_bad"]["duplicate"] + rows
    assert twice.meta["counts"]["rows_used"] == once.meta["counts"]["rows_used"]
    a, b = set_arrays(once.path), set_arrays(twice.path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # The bug this guards against: a user's validation target the very row of the test target.
    ps = PreparedSet.open(twice.path)
    valid, test = ps.split("valid"), ps.split("test")
    v, t = valid.label == 1, test.label == 1
    test_target = dict(zip(test.user[t].tolist(), zip(test.item[t].tolist(), test.timestamp[t].tolist())))
    validation = list(zip(valid.user[v].tolist(), valid.item[v].tolist(), valid.timestamp[v].tolist()))
    assert set(test_target) == {user for user, _, _ in validation}
    assert not any(test_target[user] == (item, ts) for user, item, ts in validation)

    # Three copies are two thirds duplicates: not "more than half the rows are invalid", nor --strict's.
    tripled = tmp_path / "tripled.csv"
    tripled.write_bytes(tiny_log.read_bytes() * 3)
    thrice = prepare(tripled, "taobao", "thrice", workspace=ws, strict=True, **QUICK)
    assert thrice.meta["counts"]["rows_used"] == once.meta["counts"]["rows_used"]

    result = CliRunner().invoke(
        app, ["prep", str(doubled), "-f", "taobao", "-o", "cli", "-w", str(ws.root), "--min-behaviors", "5"]
    )
    assert result.exit_code == 0, result.output
    duplicates = twice.meta["counts"]["rows_bad"]["duplicate"]
    assert re.search(rf"skipped: duplicate\s+│\s+{duplicates:,}\s", result.output), result.output


# -- item 8: fingerprint ---------------------------------------------------------------------


def test_fingerprint_follows_source_and_protocol(ws: Workspace, tiny_log: Path, tmp_path: Path) -> None:
    def fingerprint(name: str, source: Path = tiny_log, **settings) -> str:
        return PreparedSet.open(prepare(source, "taobao", name, workspace=ws, **{**QUICK, **settings}).path).fingerprint

    base = fingerprint("a", seed=1)
    meta = PreparedSet.open(ws.data_dir / "a").meta
    protocol = json.dumps(meta["protocol"], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert base == hashlib.sha256(f"{meta['source']['sha256']}\n{protocol}".encode()).hexdigest()
    assert fingerprint("b", seed=1) == base  # another name and time, same source and protocol
    assert fingerprint("c", seed=2) != base
    assert fingerprint("d", seed=1, neg_ratio=2) != base
    other_log = tmp_path / "other.csv"
    other_log.write_bytes(tiny_log.read_bytes().replace(b",pv,", b",cart,", 1))
    assert fingerprint("e", other_log, seed=1) != base

    # A set prepared before fingerprints were stored: computed from its meta the same way.
    path = ws.dataset_path("a")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["fingerprint"] == base
    del meta["fingerprint"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert PreparedSet.open(path).fingerprint == base
    # Without the source's hash, the canonical JSON of the whole meta.json stands in.
    del meta["source"]["sha256"]
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    assert fingerprint_of(meta) == hashlib.sha256(canonical.encode()).hexdigest() != base


# -- item 11: one line instead of a traceback --------------------------------------------------


@pytest.fixture(scope="module")
def slow_log(tmp_path_factory) -> Path:
    """About 1.5M rows: prep runs for seconds, most of it inside DuckDB queries."""
    log = tmp_path_factory.mktemp("slow") / "slow.csv"
    part = log.with_name("part.csv")
    with open(log, "wb") as out:
        for seed in range(4):
            write_log(part, "small", seed=seed)
            out.write(part.read_bytes())
    part.unlink()
    return log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_prep_exits_130_in_one_line(slow_log: Path, tmp_path: Path, signum: int) -> None:
    ws = tmp_path / "ws"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dmqn_cli",
            "prep",
            str(slow_log),
            "-f",
            "taobao",
            "-o",
            "slow",
            "-w",
            str(ws),
            "--threads",
            "1",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job starts with SIGINT ignored, and Python then keeps it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        # DuckDB's database exists: the next thing prep does is run queries for seconds.
        while not list((ws / "data").glob(".slow.tmp-*/.work/prep.duckdb")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "prep did not start"
            time.sleep(0.02)
        time.sleep(0.3)
        assert process.poll() is None, "prep finished before the signal; the log is too small"
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["error: interrupted"]
    assert list((ws / "data").iterdir()) == []  # no set, no .slow.tmp-PID


@pytest.mark.parametrize("length", [300, 250])
def test_an_over_long_out_is_one_line(ws: Workspace, tiny_log: Path, length: int) -> None:
    # 300 characters are too long for any name; 250 fit, but not in the temporary ".NAME.tmp-PID".
    with pytest.raises(DmqnError, match=r"^cannot write .*: File name too long$"):
        prepare(tiny_log, "taobao", "n" * length, workspace=ws, **QUICK)
    assert entries(ws) == []
    result = CliRunner().invoke(app, ["prep", str(tiny_log), "-f", "taobao", "-o", "n" * length, "-w", str(ws.root)])
    assert "File name too long" in one_line_error(result)


def test_a_read_only_workspace_is_one_line_naming_the_path(ws: Workspace, tiny_log: Path, monkeypatch) -> None:
    # Tests run as root, where chmod does not stop writes: refuse as a read-only data/ would, in the
    # mkdir of the set's temporary directory.
    real_mkdir = Path.mkdir

    def read_only_mkdir(self: Path, *args, **kwargs) -> None:
        if self.parent == ws.data_dir and not self.exists():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    tmp = re.escape(str(ws.data_dir / f".ro.tmp-{os.getpid()}"))
    with pytest.raises(DmqnError, match=f"^cannot write {tmp}: Permission denied$"):
        prepare(tiny_log, "taobao", "ro", workspace=ws, **QUICK)
    assert entries(ws) == []


def test_a_write_failing_mid_job_is_one_line_and_leaves_nothing(ws: Workspace, tiny_log: Path, monkeypatch) -> None:
    real_write_json = prepared_module.write_json

    def full_disk(root: Path, relative: str, value) -> None:
        if relative == "meta.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / relative))
        real_write_json(root, relative, value)

    monkeypatch.setattr(prepared_module, "write_json", full_disk)
    with pytest.raises(DmqnError, match=r"^cannot write .*/\.full\.tmp-\d+/meta\.json: No space left on device$"):
        prepare(tiny_log, "taobao", "full", workspace=ws, **QUICK)
    assert entries(ws) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_data_folder(ws: Workspace, tiny_log: Path) -> None:
    ws.data_dir.chmod(0o555)
    try:
        with pytest.raises(DmqnError, match=f"^cannot write {re.escape(str(ws.data_dir))}/.*: Permission denied$"):
            prepare(tiny_log, "taobao", "ro", workspace=ws, **QUICK)
    finally:
        ws.data_dir.chmod(0o755)


def test_a_damaged_meta_json_is_one_line(ws: Workspace, tiny_log: Path) -> None:
    path = prepare(tiny_log, "taobao", "m", workspace=ws, **QUICK).path
    meta = json.loads((path / "meta.json").read_text())
    for key in META_KEYS:
        (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != key}))
        with pytest.raises(
            DmqnError, match=f"^{re.escape(str(path))} is not a complete prepared set: meta.json lacks {key}$"
        ):
            PreparedSet.open(path)
    (path / "meta.json").write_text(json.dumps({**meta, "protocol": {"seed": 1}}))
    with pytest.raises(DmqnError, match="meta.json lacks protocol.max_len$"):
        PreparedSet.open(path)
    for text, problem in (('{"format_version": 1,', "is not valid JSON"), ("[1, 2]", "is not a JSON object")):
        (path / "meta.json").write_text(text)
        with pytest.raises(
            DmqnError, match=f"^{re.escape(str(path))} is not a complete prepared set: meta.json {problem}"
        ):
            PreparedSet.open(path)
